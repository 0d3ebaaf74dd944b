"""Stage 1 of the pipeline: an ``nn.Module`` -> the weight matrices to analyze, named by dotted module path.

Each :class:`WeightMatrix` is one ESD: a stack of equally shaped slices ``(num_slices, N, M)`` with ``N >= M``
(tall orientation, ``Q = N / M``) whose eigenvalues are pooled. A ``Linear`` is one slice; a ``Conv2d`` with a
``kh x kw`` kernel is ``kh * kw`` slices ``out x in`` (one per kernel position, the method of Martin & Mahoney and of
weightwatcher), per group for grouped convolutions; fused attention and recurrent weights are split into their
q/k/v or gate blocks, each its own matrix.

Nothing here computes on or copies the weights beyond the reshape a convolution needs; problems that can be seen
without touching the values (meta device, integer storage, shards, too few eigenvalues) become a ``skip_reason``.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import LoraView

__all__ = [
    "LAYER_TYPES",
    "SkipKind",
    "WeightAccess",
    "WeightMatrix",
    "iter_state_dict_matrices",
    "layer_type_of",
    "state_dict_matrices",
    "weight_matrices",
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
    "other",
)

_RNN_GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n")}
#: Gate names by gate count (rows of ``weight_hh`` over its columns), for weights found by name and shape.
_GATES_BY_COUNT = {4: ("lstm", _RNN_GATES["LSTM"]), 3: ("gru", _RNN_GATES["GRU"]), 1: ("rnn", None)}


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


def _matches(name: str, patterns: Sequence[str] | str | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(re.search(p, name) for p in patterns)


def _type_selected(layer_type: str, module: nn.Module, layer_types: Sequence[str | type] | str | type | None) -> bool:
    if layer_types is None:
        return True
    if isinstance(layer_types, (str, type)):
        layer_types = [layer_types]
    for t in layer_types:
        if isinstance(t, type):
            if isinstance(module, t):
                return True
        elif t == layer_type or t.lower() == type(module).__name__.lower():
            return True
    return False


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
class _Entry:
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


def _join(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def _single(w: Tensor) -> list[tuple[str, Tensor]]:
    return [("", w.unsqueeze(0))]


def _split(names: Sequence[str]) -> Callable[[Tensor], list[tuple[str, Tensor]]]:
    """Builder: the weight's rows cut into equal blocks named ``.<name>`` (in_proj's q/k/v, recurrent gates)."""

    def build(w: Tensor) -> list[tuple[str, Tensor]]:
        return [(f".{n}", c.unsqueeze(0)) for n, c in zip(names, w.chunk(len(names), dim=0))]

    return build


def _flat(w: Tensor) -> list[tuple[str, Tensor]]:
    """Builder for weights that are not matrices: one ``rows x rest`` view, only to report a shape."""
    return [("", w.reshape(1, w.shape[0], -1))]


def _rank_problem(weight: Tensor) -> str:
    shape = "x".join(str(d) for d in weight.shape)
    return f"weight of rank {weight.dim()} (shape {shape}) is not a matrix; not analyzed"


def _conv(groups: int) -> Callable[[Tensor], list[tuple[str, Tensor]]]:
    """Builder: a convolution's kernel positions (and groups) as one pooled stack of slices."""
    return lambda w: [("", conv_slices(w, groups))]


_QKV = ("q", "k", "v")


def _entries(name: str, module: nn.Module, layer_type: str) -> list[_Entry]:
    """How to turn this module's parameters into (suffix, stack) pairs."""
    module_type = type(module).__name__

    def entry(entry_name: str, param: Tensor | None, build: Callable[[Tensor], list[tuple[str, Tensor]]]) -> _Entry:
        # a parameter shared by several modules (tied embeddings) is one weight: keyed by identity
        return _Entry(entry_name, layer_type, module_type, param, build, id(param) if param is not None else None)

    if layer_type == "other" and module.weight.dim() != 2:
        return [_Entry(name or "weight", layer_type, module_type, module.weight, _flat, None,
                       _rank_problem(module.weight))]
    if layer_type in ("linear", "embedding", "other", "transformers_conv1d"):
        return [entry(name or "weight", module.weight, _single)]
    if layer_type == "quantized_linear":  # weight() builds a new tensor per call: no identity to tie by
        return [_Entry(name or "weight", layer_type, module_type, module.weight(), _single, None)]
    if layer_type.startswith("conv"):
        return [entry(name or "weight", module.weight, _conv(int(getattr(module, "groups", 1))))]
    if layer_type == "attention_in_proj":
        if module.in_proj_weight is not None:
            return [entry(_join(name, "in_proj"), module.in_proj_weight, _split(_QKV))]
        return [entry(_join(name, f"in_proj.{s}"), getattr(module, f"{s}_proj_weight"), _single) for s in _QKV]
    if layer_type in ("lstm", "gru", "rnn"):
        gates = _RNN_GATES.get(layer_type.upper())
        names = module._flat_weights_names if isinstance(module, nn.RNNBase) else ("weight_ih", "weight_hh")
        return [
            # projections (LSTM proj_size, weight_hr) are not gated
            entry(_join(name, pname), getattr(module, pname),
                  _split(gates) if gates is not None and not pname.startswith("weight_hr") else _single)
            for pname in names
            if pname.startswith("weight")
        ]
    if layer_type == "script":
        return _script_entries(name, module)
    return []


def _script_entries(name: str, module: nn.Module) -> list[_Entry]:
    """A TorchScript module's own parameters, read by name and shape like a state dict (its Python class is gone;
    ``original_name`` says what it was)."""
    params = {_join(name, key): value for key, value in module.named_parameters(recurse=False)}
    gates = _gate_counts({key: tuple(value.shape) for key, value in params.items()})
    module_type = str(getattr(module, "original_name", type(module).__name__))
    entries = [_state_dict_entry(key, value, gates, id(value), module_type) for key, value in params.items()]
    return [e for e in entries if e is not None]


#: Wrapper names that distributed strategies and ``torch.compile`` insert into module paths.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "_forward_module.")


def clean_name(name: str) -> str:
    """A module path without the wrapper parts of :data:`_WRAPPER_PARTS` (FSDP, activation checkpointing,
    ``torch.compile``, Lightning's forward wrapper)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    for part in _WRAPPER_PARTS:  # a wrapper at the very end of a path has no trailing dot
        if name.endswith(part[:-1]):
            name = name[: -len(part) + 1].rstrip(".")
    return name


def weight_matrices(
    model: nn.Module,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    layer_types: Sequence[str | type] | str | type | None = None,
    min_evals: int = 0,
    max_evals: int | None = None,
    access: WeightAccess | None = None,
    select: Callable[[str], bool] | None = None,
    materialize: bool = True,
    lora: str = "merged",
) -> list[WeightMatrix]:
    """List the weight matrices of ``model`` in ``named_modules()`` order.

    Args:
        model: Any ``nn.Module``.
        include: Regex (or list of regexes) a matrix name must match (``re.search``) to be kept.
        exclude: Regex (or list) whose matches are dropped.
        layer_types: Keep only these layer types: :data:`LAYER_TYPES` strings, class names (``"Linear"``) or
            module classes (one or a list).
        min_evals: Matrices with fewer pooled eigenvalues are kept as skipped records.
        max_evals: Matrices with more pooled eigenvalues are kept as skipped records (``None``: no limit).
        access: How parameters are read (default :class:`WeightAccess`: DTensors are gathered with
            ``full_tensor()``, a collective every rank must run).
        select: Keep only matrices whose :attr:`WeightMatrix.source` passes (the callback's share of a
            distributed analysis). Sharded parameters are still gathered when not selected, so that every rank
            takes part in every collective.
        materialize: ``False`` lists names and shapes only (``slices`` stays ``None``; no weight is read or
            gathered): a cheap plan.
        lora: A ``peft`` LoRA layer is one matrix named by the base model's path, computed on ``"merged"``
            (``W + scaling * B @ A``, default), ``"delta"`` (the update alone; only adapted matrices are listed) or
            ``"base"`` (the frozen ``W``); see :mod:`lightning_htsr.adapters`.

    Returns:
        One :class:`WeightMatrix` per matrix, skipped ones included. A parameter shared by several modules (tied
        embeddings) appears once, under its first name; the other names are in ``aliases``.

    Example:
        >>> from torch import nn
        >>> mats = weight_matrices(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Conv2d(3, 8, 3)))
        >>> [(m.name, m.layer_type, m.N, m.M, m.num_slices) for m in mats]
        [('0', 'linear', 64, 32, 1), ('2', 'conv2d', 8, 3, 9)]
    """
    access = access or WeightAccess()
    selection = _Selection(include, exclude, min_evals, max_evals)
    seen: dict[Hashable, list[WeightMatrix]] = {}
    out: list[WeightMatrix] = []
    view = LoraView(model, lora)
    for module_name, module in model.named_modules():
        target = view.target(module_name, module)  # a LoRA layer's base layer; None inside a LoRA layer
        layer_type = layer_type_of(target) if target is not None else None
        if layer_type is None or not _type_selected(layer_type, target, layer_types):
            continue
        entries = view.adapt(module_name, module, _entries(clean_name(view.name(module_name)), target, layer_type))
        for entry in entries:
            out.extend(_matrices_of(entry, selection, access, select, materialize, seen))
    return out


@dataclass(frozen=True)
class _Selection:
    """Which matrices are listed (names) and which of those are analyzed (sizes)."""

    include: Sequence[str] | str | None = None
    exclude: Sequence[str] | str | None = None
    min_evals: int = 0
    max_evals: int | None = None

    def kept(self, name: str) -> bool:
        """Whether a matrix of this name is listed at all."""
        return _kept(name, self.include, self.exclude)

    def size_skip(self, n_rows: int, m_cols: int, evals: int) -> tuple[str, SkipKind] | None:
        """Why a readable matrix of this shape is not analyzed (reason, kind), or ``None``."""
        if m_cols < 2:
            return f"slices are {n_rows}x{m_cols}: a single column has no spectrum to speak of", SkipKind.SINGLE_COLUMN
        if evals < self.min_evals:
            return f"{evals} eigenvalues < min_evals={self.min_evals}", SkipKind.TOO_FEW_EVALS
        if self.max_evals is not None and evals > self.max_evals:
            return f"{evals} eigenvalues > max_evals={self.max_evals}", SkipKind.TOO_MANY_EVALS
        return None


def _tied_elsewhere(entry: _Entry, seen: dict[Hashable, list[WeightMatrix]]) -> bool:
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


def _new_matrix(entry: _Entry, name: str, stack: Tensor | None, read: bool, problem: tuple[str, SkipKind] | None,
                note: str, selection: _Selection) -> WeightMatrix:
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


def _matrices_of(
    entry: _Entry,
    selection: _Selection,
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
            weight = entry.adapt(weight, access, wanted)
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


_RNN_KEY = re.compile(r"^(?P<module>.*?)\.?(?P<param>weight_(?:ih|hh)(?:_l\d+(?:_reverse)?)?)$")
_STATE_DICT_CONV = {3: "conv1d", 4: "conv2d", 5: "conv3d"}


def _is_weight_key(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last == "weight" or last.startswith("weight_") or last.endswith("_weight")


def is_weight_entry(key: str, shape: Sequence[int]) -> bool:
    """Whether a state-dict entry is read as a weight (by name and rank; see :func:`state_dict_matrices`)."""
    return len(shape) >= 2 and _is_weight_key(key)


class ShapeAccess(WeightAccess):
    """Reads shapes only: meta tensors (a checkpoint's header) are planned like real ones."""

    def problem(self, param: Tensor) -> str | None:
        """Like :meth:`WeightAccess.problem`, but the meta device is fine."""
        return None if param.device.type == "meta" and param.is_floating_point() else super().problem(param)


def _gate_counts(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Gates per recurrent weight (``nn.LSTM``/``GRU``/``RNN`` ``weight_*_l<k>`` and the cells' ``weight_ih``/
    ``weight_hh``), read off the rows/columns of the matching ``weight_hh``: 4 LSTM, 3 GRU, 1 RNN."""
    gates: dict[str, int] = {}
    for key, shape in shapes.items():
        match = _RNN_KEY.match(key)
        if match and "_hh" in match["param"] and len(shape) == 2:
            rows, cols = shape
            count = rows // cols if cols else 1
            gates[f"{match['module']}|{match['param']}"] = count
            gates[f"{match['module']}|{match['param'].replace('_hh', '_ih')}"] = count
    return gates


def _state_dict_entry(key: str, value: Tensor, gates: Mapping[str, int], tie_key: Hashable | None,
                      module_type: str = "state_dict") -> _Entry | None:
    """How one named tensor becomes matrices by name and shape (``None``: not a weight matrix)."""
    if not is_weight_entry(key, value.shape):
        return None
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    rnn = _RNN_KEY.match(key)
    problem = None
    if key.endswith("in_proj_weight") and value.dim() == 2 and value.shape[0] == 3 * value.shape[1]:
        name, layer_type, build = key[: -len("_weight")], "attention_in_proj", _split(_QKV)
    elif rnn and value.dim() == 2 and f"{rnn['module']}|{rnn['param']}" in gates:
        layer_type, names = _GATES_BY_COUNT.get(gates[f"{rnn['module']}|{rnn['param']}"], ("rnn", None))
        build = _split(names) if names else _single
    elif value.dim() == 2:
        layer_type, build = "linear", _single
    elif value.dim() in _STATE_DICT_CONV:
        layer_type, build = _STATE_DICT_CONV[value.dim()], _conv(1)
    else:
        layer_type, build, problem = "other", _flat, _rank_problem(value)
    return _Entry(name, layer_type, module_type, value, build, tie_key, problem)


def _storage_key(value: Tensor) -> Hashable:
    """Tensors of a loaded state_dict are distinct objects even when tied: key them by storage (valid while every
    tensor of the dict is alive)."""
    if value.device.type == "meta":
        return id(value)
    return value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape)


def state_dict_source(key: str, shape: Sequence[int]) -> str:
    """The :attr:`WeightMatrix.source` a state-dict entry's matrices get (the unit a distributed run assigns)."""
    if key.endswith("in_proj_weight") and len(shape) == 2 and shape[0] == 3 * shape[1]:
        return key[: -len("_weight")]
    return key[: -len(".weight")] if key.endswith(".weight") else key


def iter_state_dict_matrices(
    items: Iterable[tuple[str, Any]],
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    min_evals: int = 0,
    max_evals: int | None = None,
    tie: bool = True,
    access: WeightAccess | None = None,
) -> Iterator[WeightMatrix]:
    """:func:`state_dict_matrices` one tensor at a time: each matrix is yielded as soon as its tensor arrives.

    Args:
        items: ``(name, tensor)`` pairs, e.g. read lazily from a checkpoint file; non-tensors are ignored.
        shapes: Every tensor's shape by name, known before the tensors arrive (a checkpoint's header): needed to
            split a recurrent ``weight_ih`` whose ``weight_hh`` comes later. ``None``: gates are inferred only
            from ``weight_hh`` tensors that come first.
        include: Regex(es) a matrix name must match.
        exclude: Regex(es) of names to drop.
        min_evals: Matrices with fewer pooled eigenvalues are kept as skipped records.
        max_evals: Matrices with more pooled eigenvalues are kept as skipped records.
        tie: Analyze tensors sharing storage once. Only valid when every tensor stays alive during the iteration
            (an in-memory dict); a stream that frees tensors must pass ``False`` (freed addresses are reused).
        access: How tensors are read (default :class:`WeightAccess`).

    Yields:
        :class:`WeightMatrix` objects, in the order of ``items``.
    """
    gates = _gate_counts(shapes) if shapes is not None else {}
    seen: dict[Hashable, list[WeightMatrix]] = {}
    access = access or WeightAccess()
    selection = _Selection(include, exclude, min_evals, max_evals)
    for key, value in items:
        if not isinstance(value, Tensor):
            continue
        if shapes is None:
            gates.update(_gate_counts({key: tuple(value.shape)}))
        entry = _state_dict_entry(key, value, gates, _storage_key(value) if tie else None)
        if entry is not None:
            yield from _matrices_of(entry, selection, access, None, True, seen)


def state_dict_matrices(
    state_dict: Mapping[str, Any],
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    min_evals: int = 0,
    max_evals: int | None = None,
) -> list[WeightMatrix]:
    """The weight matrices of a bare ``state_dict``, recognized by name and shape (no model class needed).

    Rules: keys whose last part is ``weight``, ``weight_*`` or ``*_weight`` with 2+ dimensions; 2-D tensors are
    matrices (``layer_type "linear"``: a state dict cannot tell a Linear from an Embedding), 3/4/5-D tensors are
    convolutions (``(out, in, *kernel)`` -> one slice per kernel position, groups assumed 1), ``*in_proj_weight``
    is split into q/k/v, recurrent ``weight_ih_l*``/``weight_hh_l*`` (and the cells' ``weight_ih``/``weight_hh``)
    are split per gate (4 gates for LSTM, 3 for GRU, read off the ``weight_hh`` shape). Weights of higher rank get
    a skipped row saying so. Tensors sharing storage (tied weights) appear once.

    Args:
        state_dict: ``{name: tensor}`` (e.g. ``torch.load(path)``, a Lightning checkpoint's ``"state_dict"``, or
            ``safetensors.torch.load_file(path)``); non-tensor values are ignored.
        include: Regex(es) a matrix name must match.
        exclude: Regex(es) of names to drop.
        min_evals: Matrices with fewer pooled eigenvalues are kept as skipped records.
        max_evals: Matrices with more pooled eigenvalues are kept as skipped records.

    Returns:
        One :class:`WeightMatrix` per matrix, named by the key without its ``.weight`` suffix.

    Example:
        >>> import torch
        >>> sd = {"fc.weight": torch.zeros(64, 32), "fc.bias": torch.zeros(64), "conv.weight": torch.zeros(8, 3, 3, 3)}
        >>> [(m.name, m.layer_type, m.N, m.M, m.num_slices) for m in state_dict_matrices(sd)]
        [('fc', 'linear', 64, 32, 1), ('conv', 'conv2d', 8, 3, 9)]
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, Tensor)}
    return list(iter_state_dict_matrices(state_dict.items(), shapes=shapes, include=include, exclude=exclude,
                                         min_evals=min_evals, max_evals=max_evals))


def _kept(name: str, include: Sequence[str] | str | None, exclude: Sequence[str] | str | None) -> bool:
    if include is not None and not _matches(name, include):
        return False
    return not _matches(name, exclude)
