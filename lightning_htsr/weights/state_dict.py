"""Stage 1 of the pipeline without a model class: named tensors (a state dict, a checkpoint) -> weight matrices,
recognized by name and shape.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["ShapeAccess", "is_weight_entry", "iter_state_dict_matrices", "state_dict_matrices", "state_dict_source"]

from .matrix import (
    GATES_BY_COUNT,
    QKV,
    Entry,
    Selection,
    WeightAccess,
    WeightMatrix,
    conv_builder,
    expert_note,
    flat_view,
    is_expert_stack,
    matrices_of,
    per_expert,
    rank_problem,
    single_slice,
    split_rows,
)

_RNN_KEY = re.compile(r"^(?P<module>.*?)\.?(?P<param>weight_(?:ih|hh)(?:_l\d+(?:_reverse)?)?)$")


_STATE_DICT_CONV = {3: "conv1d", 4: "conv2d", 5: "conv3d"}


def _is_weight_key(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last == "weight" or last.startswith("weight_") or last.endswith("_weight")


def is_weight_entry(key: str, shape: Sequence[int]) -> bool:
    """Whether a state-dict entry is read as a weight (by name and rank; see :func:`state_dict_matrices`)."""
    return len(shape) >= 2 and (_is_weight_key(key) or _expert_key(key, shape))


def _expert_key(key: str, shape: Sequence[int]) -> bool:
    """A mixture-of-experts stack by name and shape: 3-D, ``expert`` in the key, and not a ``weight`` (a convolution
    inside an expert keeps its ``.weight``)."""
    return is_expert_stack(key, shape) and not _is_weight_key(key)


class ShapeAccess(WeightAccess):
    """Reads shapes only: meta tensors (a checkpoint's header) are planned like real ones."""

    def problem(self, param: Tensor) -> str | None:
        """Like :meth:`WeightAccess.problem`, but the meta device is fine."""
        return None if param.device.type == "meta" and param.is_floating_point() else super().problem(param)


def gate_counts(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
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


def state_dict_entry(key: str, value: Tensor, gates: Mapping[str, int], tie_key: Hashable | None,
                      module_type: str = "state_dict") -> Entry | None:
    """How one named tensor becomes matrices by name and shape (``None``: not a weight matrix)."""
    if not is_weight_entry(key, value.shape):
        return None
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    rnn = _RNN_KEY.match(key)
    problem, note = None, ""
    if key.endswith("in_proj_weight") and value.dim() == 2 and value.shape[0] == 3 * value.shape[1]:
        name, layer_type, build = key[: -len("_weight")], "attention_in_proj", split_rows(QKV)
    elif rnn and value.dim() == 2 and f"{rnn['module']}|{rnn['param']}" in gates:
        layer_type, names = GATES_BY_COUNT.get(gates[f"{rnn['module']}|{rnn['param']}"], ("rnn", None))
        build = split_rows(names) if names else single_slice
    elif _expert_key(key, value.shape):
        layer_type, build, note = "experts", per_expert, expert_note(key)
    elif value.dim() == 2:
        layer_type, build = "linear", single_slice
    elif value.dim() in _STATE_DICT_CONV:
        layer_type, build = _STATE_DICT_CONV[value.dim()], conv_builder(1)
    else:
        layer_type, build, problem = "other", flat_view, rank_problem(value)
    return Entry(name, layer_type, module_type, value, build, tie_key, problem, note=note)


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
    gates = gate_counts(shapes) if shapes is not None else {}
    seen: dict[Hashable, list[WeightMatrix]] = {}
    access = access or WeightAccess()
    selection = Selection(include, exclude, min_evals, max_evals)
    for key, value in items:
        if not isinstance(value, Tensor):
            continue
        if shapes is None:
            gates.update(gate_counts({key: tuple(value.shape)}))
        entry = state_dict_entry(key, value, gates, _storage_key(value) if tie else None)
        if entry is not None:
            yield from matrices_of(entry, selection, access, None, True, seen)


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
    are split per gate (4 gates for LSTM, 3 for GRU, read off the ``weight_hh`` shape), and a 3-D tensor with
    ``expert`` in its name that is not a ``weight`` (a mixture-of-experts stack such as
    ``mlp.experts.gate_up_proj``) is one matrix per expert. Weights of higher rank get a skipped row saying so.
    Tensors sharing storage (tied weights) appear once.

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
