"""Stage 1 of the pipeline, its common part: what a weight matrix is and how a weight becomes one.

Each :class:`WeightMatrix` is one ESD: a stack of equally shaped slices ``(num_slices, N, M)`` with ``N >= M``
(tall orientation, ``Q = N / M``) whose eigenvalues are pooled. A ``Linear`` is one slice; a ``Conv2d`` with a
``kh x kw`` kernel is ``kh * kw`` slices ``out x in`` (one per kernel position, the method of Martin & Mahoney and of
weightwatcher), per group for grouped convolutions; fused attention and recurrent weights are split into their
q/k/v or gate blocks, each its own matrix; a mixture-of-experts stack (one ``(experts, rows, cols)`` parameter,
as ``transformers`` keeps Mixtral's or Qwen-MoE's experts) is one matrix per expert. An :class:`Entry` says how
one weight becomes matrices; the two ways of finding weights build entries: :mod:`~lightning_htsr.weights.modules`
(an ``nn.Module``) and :mod:`~lightning_htsr.weights.state_dict` (tensors by name and shape).

Nothing here computes on or copies the weights beyond the reshape a convolution needs; problems that can be seen
without touching the values (meta device, integer storage, shards, too few eigenvalues) become a ``skip_reason``.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "LAYER_TYPES",
    "AdaptError",
    "SkipKind",
    "WeightAccess",
    "WeightMatrix",
    "layer_type_of",
]


#: Layer types this stage knows, as used in ``layer_types=`` filters and the ``layer_type`` column.
LAYER_TYPES: tuple[str, ...] = (
    "linear",
    "embedding",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "transformers_conv1d",
    "attention_in_proj",
    "lstm",
    "gru",
    "rnn",
    "quantized_linear",
    "script",
    "experts",
    "other",
)


RNN_GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n")}


#: Gate names by gate count (rows of ``weight_hh`` over its columns), for weights found by name and shape.
GATES_BY_COUNT = {4: ("lstm", RNN_GATES["LSTM"]), 3: ("gru", RNN_GATES["GRU"]), 1: ("rnn", None)}


class SkipKind(str, enum.Enum):
    """Why a matrix has no (complete) analysis: the value behind the human ``skip_reason`` sentence.

    Decisions read the kind, never the sentence (which skips are warned about, which failures are retried in
    float64), so rewording a message changes nothing. Records carry it as the ``skip_kind`` column (its value).
    """

    TOO_FEW_EVALS = "too_few_evals"  #: fewer pooled eigenvalues than ``min_evals`` (routine)
    TOO_MANY_EVALS = "too_many_evals"  #: more pooled eigenvalues than ``max_evals`` (routine)
    SINGLE_COLUMN = "single_column"  #: slices with one column have no spectrum to speak of (routine)
    NOT_SELECTED = "not_selected"  #: left out by ``ww_compat``'s weightwatcher layer selection (routine)
    NOT_A_MATRIX = "not_a_matrix"  #: a weight of rank 3+ outside convolutions
    UNREADABLE = "unreadable"  #: no usable values: meta device, lazy, partitioned, empty, integer without a scale
    NON_FINITE = "non_finite"  #: NaN or Inf in the weights
    SOLVER_FAILED = "solver_failed"  #: the eigensolver failed on finite weights (float32: redone in float64)
    ALL_ZERO = "all_zero"  #: every eigenvalue is zero
    DEGENERATE = "degenerate"  #: a spectrum whose power-law fit or entropy is undefined
    UNMATCHED = "unmatched"  #: base-model delta: no partner of this name and shape in the base (routine)
    UNCHANGED = "unchanged"  #: base-model delta: the weights equal the base's (routine)
    LOW_RANK_DELTA = "low_rank_delta"  #: base-model delta of low rank (a merged LoRA): its tail would be noise

    @property
    def routine(self) -> bool:
        """Whether the skip is about the matrix's size or selection, not a problem with its weights."""
        return self in _ROUTINE_KINDS

    def __str__(self) -> str:
        return self.value


_ROUTINE_KINDS = frozenset({SkipKind.TOO_FEW_EVALS, SkipKind.TOO_MANY_EVALS, SkipKind.SINGLE_COLUMN,
                            SkipKind.NOT_SELECTED, SkipKind.UNMATCHED, SkipKind.UNCHANGED})


class AdaptError(RuntimeError):
    """An adapted weight (a LoRA or other adapter merge) could not be computed: the matrix becomes a skipped row
    with this message as its reason."""


@dataclass
class WeightMatrix:
    """One matrix (or pooled stack of slices) to analyze.

    Attributes:
        name: Dotted module path plus a suffix for split weights, e.g. ``"blocks.0.attn.in_proj.q"``.
        layer_type: One of :data:`LAYER_TYPES`.
        module_type: Class name of the module the weight belongs to.
        slices: ``(num_slices, N, M)`` tensor with ``N >= M`` on the weight's device and in its dtype, detached;
            ``None`` when the matrix is skipped.
        N: Rows of one slice after orientation (the larger side).
        M: Columns of one slice (the smaller side).
        num_slices: Number of pooled slices (kernel positions times groups for convolutions, else 1).
        dtype: The stored dtype of the weight, as a string (``"torch.bfloat16"``, ``"torch.qint8"``, ...).
        skip_reason: Why the matrix cannot be analyzed (a sentence for people), or ``None``.
        note: Anything the user should know about how the matrix was obtained (e.g. dequantized).
        aliases: Other names of a tied parameter.
        source: Name of the parameter entry the matrix comes from (``"blocks.0.attn.in_proj"`` for its q, k and
            v): the unit a distributed analysis assigns to one rank.
        skip_kind: The :class:`SkipKind` of ``skip_reason`` (what code decides on), or ``None``.
        tensors: The parameters the matrix is computed from (the weight, then any LoRA factors): what change
            detection watches.
    """

    name: str
    layer_type: str
    module_type: str
    slices: Tensor | None
    N: int
    M: int
    num_slices: int = 1
    dtype: str = ""
    skip_reason: str | None = None
    note: str = ""
    aliases: list[str] = field(default_factory=list)
    source: str = ""
    skip_kind: SkipKind | None = None
    tensors: tuple[Tensor, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_tensor(cls, name: str, weight: Tensor, layer_type: str = "other") -> WeightMatrix:
        """Wrap a bare 2-D matrix (or ``(k, rows, cols)`` stack of slices) for :func:`analyze_matrices`.

        Example:
            >>> import torch
            >>> m = WeightMatrix.from_tensor("w", torch.zeros(3, 5))
            >>> (m.N, m.M, m.Q)
            (5, 3, 1.6666666666666667)
        """
        stack = weight.detach()
        if stack.dim() == 2:
            stack = stack.unsqueeze(0)
        if stack.dim() != 3:
            raise ValueError(f"expected a 2-D matrix or 3-D stack, got shape {tuple(weight.shape)}")
        stack = tall(stack)
        k, n_rows, m_cols = stack.shape
        return cls(name, layer_type, "Tensor", stack, n_rows, m_cols, k, str(weight.dtype), source=name)

    @property
    def Q(self) -> float:  # noqa: N802 - the paper's name
        """Aspect ratio ``N / M`` (>= 1)."""
        return self.N / self.M if self.M else math.nan

    @property
    def num_evals(self) -> int:
        """Number of pooled eigenvalues, ``M * num_slices``."""
        return self.M * self.num_slices


def layer_type_of(module: nn.Module) -> str | None:
    """The :data:`LAYER_TYPES` entry for ``module``, or ``None`` if it has no weight matrix to analyze."""
    cls = type(module)
    qualname = f"{cls.__module__}.{cls.__name__}"
    if "quantized" in qualname and callable(getattr(module, "weight", None)):
        return "quantized_linear" if "Linear" in cls.__name__ else None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"conv_transpose{_conv_dims(module)}d"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"conv{_conv_dims(module)}d"
    if isinstance(module, nn.MultiheadAttention):
        return "attention_in_proj"
    if isinstance(module, nn.RNNBase):
        return {"LSTM": "lstm", "GRU": "gru"}.get(module.mode, "rnn")
    if isinstance(module, nn.RNNCellBase):
        return {nn.LSTMCell: "lstm", nn.GRUCell: "gru"}.get(cls, "rnn")
    if cls.__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 style Conv1D, weight (in, out)
        return "transformers_conv1d"
    if isinstance(module, torch.jit.ScriptModule):
        return "script"
    weight = _own_weight(module)
    if isinstance(weight, Tensor) and weight.dim() >= 2 and "norm" not in cls.__name__.lower():
        return "other"  # a weight of rank 3+ (nn.Bilinear) gets a row saying why it is not analyzed
    return None


def _own_weight(module: nn.Module) -> Tensor | None:
    """The module's own ``weight`` parameter, or ``None`` (plain dict access: no ``__getattr__`` magic)."""
    params = getattr(module, "_parameters", None)
    return params.get("weight") if isinstance(params, dict) else None


def _conv_dims(module: nn.modules.conv._ConvNd) -> int:
    return len(module.kernel_size)


class WeightAccess:
    """How this stage reads a parameter: its full shape, whether it is sharded, and its full value.

    The default reads ordinary tensors as they are and materializes DTensors (FSDP2 / tensor parallel) with
    ``full_tensor()``, a collective every rank must run. :mod:`lightning_htsr.distributed` adds DeepSpeed ZeRO-3.
    """

    def shape(self, param: Tensor) -> tuple[int, ...]:
        """Full (unsharded) shape."""
        return tuple(param.shape)

    def is_sharded(self, param: Tensor) -> bool:
        """Whether reading the full value is a collective (so every rank must do it, owner or not)."""
        return type(param).__name__ == "DTensor"

    def gather(self, param: Tensor) -> Tensor:
        """The full value (collective when :meth:`is_sharded`)."""
        full = getattr(param, "full_tensor", None)
        if callable(full) and self.is_sharded(param):
            return full()
        return param

    def problem(self, param: Tensor) -> str | None:
        """Why the parameter cannot be analyzed, seen without reading its values (``None`` if it can)."""
        if isinstance(param, nn.parameter.UninitializedParameter):
            return "lazy module not initialized yet"
        if param.device.type == "meta":
            return "weights are on the meta device (no values)"
        if hasattr(param, "ds_id") or hasattr(param, "ds_shape"):
            return "DeepSpeed ZeRO-3 partitioned parameter; gather it first (HTSRCallback does)"
        if param.numel() == 0:
            return "empty (sharded or zero-size) parameter; gather the full weight first"
        if param.is_quantized:
            return None
        if not param.is_floating_point():
            return f"integer weights ({param.dtype}) without a quantization scale cannot be analyzed"
        return None


#: Start of the ``note`` of matrices whose stored precision limits what their ESD can show (the analysis warns).
LOW_PRECISION = "low precision"


def _precision_note(weight: Tensor) -> str:
    """What the analysis did with weights stored in less than float32, for the record's ``note``.

    fp16/bf16 values are exact in float32, so upcasting them changes nothing (no warning). 8-bit floats and
    integer-quantized weights are analyzed too, but their rounding is coarse enough to blur the ESD: the note starts
    with :data:`LOW_PRECISION`, which makes the analysis warn.
    """
    dtype = weight.dtype
    if weight.is_quantized:
        return (f"{LOW_PRECISION}: dequantized from {dtype} (integer levels times scale); the small eigenvalues "
                "are blurred")
    if dtype in (torch.float16, torch.bfloat16):
        return f"upcast from {dtype} (exact)"
    if dtype.is_floating_point and torch.finfo(dtype).bits <= 8:
        mantissa = round(-math.log2(torch.finfo(dtype).eps))
        return (f"{LOW_PRECISION}: upcast from {dtype} ({mantissa} mantissa bits, rounding error up to "
                f"{100 * 2.0 ** -(mantissa + 1):.3g} % per entry); the small eigenvalues are blurred")
    return ""


def tall(stack: Tensor) -> Tensor:
    """Orient a ``(k, rows, cols)`` stack so that rows >= cols (``N >= M``)."""
    return stack.transpose(-1, -2) if stack.shape[-2] < stack.shape[-1] else stack


def conv_slices(weight: Tensor, groups: int) -> Tensor:
    """``(out, in/g, *k)`` (``(in, out/g, *k)`` when transposed) -> ``(g * prod(k), rows / g, cols)`` slices.

    The first axis is the one split into groups in both layouts, so one reshape serves both.
    """
    rows_total = weight.shape[0]
    cols = weight.shape[1]
    rows = rows_total // groups
    kernel = math.prod(weight.shape[2:])
    w = weight.reshape(groups, rows, cols, kernel)  # split the row axis into groups
    return w.permute(0, 3, 1, 2).reshape(groups * kernel, rows, cols)


@dataclass
class Entry:
    name: str
    layer_type: str
    module_type: str
    param: Tensor | None
    build: Callable[[Tensor], list[tuple[str, Tensor]]]
    tie_key: Hashable | None  # entries with equal keys hold one (tied) weight, analyzed once; None: never tied
    problem: str | None = None  # why the weight is listed but cannot be analyzed (e.g. a rank-3 weight)
    adapt: Callable[[Tensor, WeightAccess, bool], Tensor] | None = None  # the weight -> what is analyzed (LoRA)
    note: str = ""  # how the matrix was obtained (LoRA), for the record
    extra: tuple[Tensor, ...] = ()  # more tensors the matrix is computed from (LoRA factors)


def join_name(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def single_slice(w: Tensor) -> list[tuple[str, Tensor]]:
    return [("", w.unsqueeze(0))]


def split_rows(names: Sequence[str]) -> Callable[[Tensor], list[tuple[str, Tensor]]]:
    """Builder: the weight's rows cut into equal blocks named ``.<name>`` (in_proj's q/k/v, recurrent gates)."""

    def build(w: Tensor) -> list[tuple[str, Tensor]]:
        return [(f".{n}", c.unsqueeze(0)) for n, c in zip(names, w.chunk(len(names), dim=0))]

    return build


def flat_view(w: Tensor) -> list[tuple[str, Tensor]]:
    """Builder for weights that are not matrices: one ``rows x rest`` view, only to report a shape."""
    return [("", w.reshape(1, w.shape[0], -1))]


def rank_problem(weight: Tensor) -> str:
    shape = "x".join(str(d) for d in weight.shape)
    return f"weight of rank {weight.dim()} (shape {shape}) is not a matrix; not analyzed"


def is_expert_stack(name: str, shape: Sequence[int]) -> bool:
    """Whether a parameter is a stack of mixture-of-experts matrices: rank 3 and ``expert`` in its path (as in
    ``transformers``' fused ``mlp.experts.gate_up_proj`` / ``down_proj``, ``(experts, rows, cols)``).

    Example:
        >>> is_expert_stack("model.layers.0.mlp.experts.down_proj", (8, 64, 128))
        True
    """
    return len(shape) == 3 and "expert" in name.lower()


def expert_note(name: str) -> str:
    """The record note of an expert stack: a fused gate/up projection is analyzed as one matrix per expert."""
    if "gate_up" not in name:
        return ""
    return ("one matrix per expert: the fused gate and up projections together (a checkpoint in the per-expert "
            "format has them apart)")


def per_expert(w: Tensor) -> list[tuple[str, Tensor]]:
    """Builder: a ``(experts, rows, cols)`` stack as one matrix per expert, named ``.<expert index>``."""
    return [(f".{e}", w[e].unsqueeze(0)) for e in range(w.shape[0])]


def conv_builder(groups: int) -> Callable[[Tensor], list[tuple[str, Tensor]]]:
    """Builder: a convolution's kernel positions (and groups) as one pooled stack of slices."""
    return lambda w: [("", conv_slices(w, groups))]


QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Selection:
    """Which matrices are listed (names) and which of those are analyzed (sizes)."""

    include: Sequence[str] | str | None = None
    exclude: Sequence[str] | str | None = None
    min_evals: int = 0
    max_evals: int | None = None

    def kept(self, name: str) -> bool:
        """Whether a matrix of this name is listed at all."""
        return kept_by_name(name, self.include, self.exclude)

    def size_skip(self, n_rows: int, m_cols: int, evals: int) -> tuple[str, SkipKind] | None:
        """Why a readable matrix of this shape is not analyzed (reason, kind), or ``None``."""
        if m_cols < 2:
            return f"slices are {n_rows}x{m_cols}: a single column has no spectrum to speak of", SkipKind.SINGLE_COLUMN
        if evals < self.min_evals:
            return f"{evals} eigenvalues < min_evals={self.min_evals}", SkipKind.TOO_FEW_EVALS
        if self.max_evals is not None and evals > self.max_evals:
            return f"{evals} eigenvalues > max_evals={self.max_evals}", SkipKind.TOO_MANY_EVALS
        return None


def _matches(name: str, patterns: Sequence[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(re.search(p, name) for p in patterns)


def kept_by_name(name: str, include: Sequence[str] | str | None, exclude: Sequence[str] | str | None) -> bool:
    if include is not None and not _matches(name, include):
        return False
    return not _matches(name, exclude)


def _tied_elsewhere(entry: Entry, seen: dict[Hashable, list[WeightMatrix]]) -> bool:
    """Whether the entry's weight was listed under another name (tied); if so, record this name as an alias."""
    key = entry.tie_key
    if key is None or key not in seen:
        return False
    for matrix in seen[key]:
        matrix.aliases.append(entry.name + matrix.name[len(matrix.source) :])
    return True


def _layout(param: Tensor, access: WeightAccess) -> Tensor | None:
    """A meta tensor of the parameter's full shape (``None`` when even the shape is unknown: lazy modules)."""
    if isinstance(param, nn.parameter.UninitializedParameter):
        return None
    return torch.empty(access.shape(param), device="meta")


def _new_matrix(entry: Entry, name: str, stack: Tensor | None, read: bool, problem: tuple[str, SkipKind] | None,
                note: str, selection: Selection) -> WeightMatrix:
    """One listed matrix: oriented tall, its slices kept only when read and analyzable."""
    reason, kind = problem if problem is not None else (None, None)
    dtype = str(entry.param.dtype) if entry.param is not None else ""
    if stack is None:  # shape unknown (lazy): nothing to orient
        matrix = WeightMatrix(name, entry.layer_type, entry.module_type, None, 0, 0, 1, dtype, reason, note,
                              skip_kind=kind)
    else:
        stack = tall(stack)
        k, n_rows, m_cols = stack.shape
        matrix = WeightMatrix(name, entry.layer_type, entry.module_type, stack if read else None, n_rows, m_cols, k,
                              dtype, reason, note, skip_kind=kind)
        size_problem = selection.size_skip(n_rows, m_cols, matrix.num_evals) if problem is None else None
        if size_problem is not None:
            matrix.skip_reason, matrix.skip_kind = size_problem
        if matrix.skip_reason is not None:
            matrix.slices = None
    matrix.source = entry.name
    matrix.tensors = (entry.param, *entry.extra) if entry.param is not None else ()
    return matrix


def matrices_of(
    entry: Entry,
    selection: Selection,
    access: WeightAccess,
    select: Callable[[str], bool] | None,
    materialize: bool,
    seen: dict[Hashable, list[WeightMatrix]],
) -> Iterator[WeightMatrix]:
    """The matrices of one entry (reading, gathering and dequantizing its weight when analyzed)."""
    param = entry.param
    if param is None or _tied_elsewhere(entry, seen):  # tied weights: analyze once
        return
    reason = entry.problem or access.problem(param)
    problem = (reason, SkipKind.NOT_A_MATRIX if entry.problem else SkipKind.UNREADABLE) if reason else None
    wanted = select is None or select(entry.name)
    if not wanted and not (access.is_sharded(param) and problem is None):
        return
    weight = None
    if problem is None and materialize:
        weight = access.gather(param).detach()  # collective for sharded parameters: every rank gets here
        if weight.is_quantized and wanted:
            weight = weight.dequantize()
        if entry.adapt is not None:  # LoRA: gathers the factors (collective) and merges when wanted
            try:
                weight = entry.adapt(weight, access, wanted)
            except AdaptError as err:  # the row says why; the analysis of the others goes on
                problem, weight = (str(err), SkipKind.UNREADABLE), None
        if not wanted:
            return
    layout = weight if weight is not None else _layout(param, access)
    note = "; ".join(filter(None, [_precision_note(param) if problem is None else "", entry.note]))
    matrices: list[WeightMatrix] = []
    for suffix, stack in entry.build(layout) if layout is not None else [("", None)]:
        if selection.kept(entry.name + suffix):
            matrices.append(_new_matrix(entry, entry.name + suffix, stack, weight is not None, problem, note,
                                        selection))
            yield matrices[-1]
    if matrices and entry.tie_key is not None:
        seen[entry.tie_key] = matrices
