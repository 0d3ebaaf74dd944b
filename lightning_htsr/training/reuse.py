"""Frozen weights cost nothing after the first analysis: the callback reuses the results of unchanged matrices.

A matrix's key is, for every tensor it is computed from (the weight, and a LoRA layer's factors): its data pointer,
its version counter (bumped by every in-place change autograd sees: optimizer steps, ``copy_``,
``load_state_dict``), shape, dtype and device, plus a fingerprint of its values (their sum and Euclidean norm),
which catches the writes the version counter does not see (``param.data.add_(...)``). The fingerprint reads the
weight once, far less than its eigenvalues cost (``N M`` against ``N M^2``; see ``benchmarks/README.md``, "Fine-tuned
models: LoRA cost"). A change that keeps pointer, version, sum and norm (an untracked permutation of entries through
``.data``) goes unseen. Only plain local tensors get a key: sharded ones (DTensor, DeepSpeed ZeRO-3), meta, lazy and
quantized weights are analyzed every time.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..weights.matrix import WeightMatrix

__all__ = ["ResultCache", "matrix_key", "tensor_key"]


def tensor_key(tensor: Tensor) -> Hashable | None:
    """What identifies a plain local tensor's current values (``None`` for any other kind).

    Example:
        >>> w = torch.ones(2, 2)
        >>> before = tensor_key(w)
        >>> before == tensor_key(w), (w.data.add_(1), before == tensor_key(w))[1]
        (True, False)
    """
    if (type(tensor) not in (Tensor, nn.Parameter) or isinstance(tensor, nn.parameter.UninitializedParameter)
            or hasattr(tensor, "ds_id") or tensor.device.type == "meta" or tensor.is_quantized
            or not tensor.is_floating_point()):
        return None
    with torch.no_grad():
        values = tensor.detach()
        fingerprint = torch.stack([values.sum(dtype=torch.float32),
                                   torch.linalg.vector_norm(values, dtype=torch.float32)]).tolist()
    return (tensor.data_ptr(), tensor._version, tuple(tensor.shape), str(tensor.dtype), str(tensor.device),
            *fingerprint)


def matrix_key(matrix: WeightMatrix) -> Hashable | None:
    """The key of a listed matrix: its tensors' keys plus what it is (name, shape, note: LoRA mode and scaling)."""
    if not matrix.tensors:
        return None
    keys = [tensor_key(t) for t in matrix.tensors]
    if any(k is None for k in keys):
        return None
    return (matrix.name, matrix.N, matrix.M, matrix.num_slices, matrix.note, matrix.skip_reason, *keys)


class ResultCache:
    """The latest results of each parameter entry (:attr:`WeightMatrix.source`) with the key they were computed at.

    Attributes:
        reused: Names of the matrices whose results the latest :meth:`split` reused.
    """

    def __init__(self) -> None:
        self._results: dict[str, tuple[Hashable, list[Any]]] = {}
        self.reused: list[str] = []

    def split(self, plan: Sequence[WeightMatrix], mine: Callable[[str], bool]) -> tuple[dict[str, Hashable],
                                                                                       dict[str, list[Any]]]:
        """Key this rank's entries and find those unchanged since their results were stored.

        Args:
            plan: The listed matrices (``materialize=False`` is enough: keys need no gather).
            mine: Whether this rank analyzes an entry.

        Returns:
            ``(keys, reused)``: the key of every keyable entry of this rank, and the stored results of the unchanged
            ones, by source.
        """
        keys: dict[str, Hashable] = {}
        unkeyable: set[str] = set()
        for matrix in plan:
            if not mine(matrix.source) or matrix.source in unkeyable:
                continue
            key = matrix_key(matrix)
            if key is None:
                unkeyable.add(matrix.source)
                keys.pop(matrix.source, None)
            else:
                keys[matrix.source] = (keys.get(matrix.source, ()), key)
        reused = {s: self._results[s][1] for s, k in keys.items() if s in self._results and self._results[s][0] == k}
        self.reused = [r.record["name"] for results in reused.values() for r in results]
        return keys, reused

    def store(self, keys: dict[str, Hashable], results: Iterable[Any]) -> None:
        """Remember new results (``.record["name"]`` and a source given by the plan) under their entry's key.

        Args:
            keys: From :meth:`split`.
            results: ``(source, result)`` pairs just computed.
        """
        fresh: dict[str, list[Any]] = {}
        for source, result in results:
            fresh.setdefault(source, []).append(result)
        for source, found in fresh.items():
            if source in keys:
                self._results[source] = (keys[source], found)
            else:
                self._results.pop(source, None)

    def clear(self) -> None:
        """Forget everything (e.g. after an analysis error)."""
        self._results.clear()
        self.reused = []
