"""Two sources of weight matrices paired by name and shape: the one pairing behind base-model deltas
(:mod:`lightning_htsr.deltas`) and :func:`~lightning_htsr.distances`.

A *source* is a module, a state dict or checkpoint files (:func:`open_source`). One side is streamed in its own
order (:meth:`MatrixSource.stream`); each matrix's partner on the other side is looked up by name when it comes
(:meth:`MatrixSource.get`: a checkpoint then reads that one tensor), so memory stays a few matrices. A pair is
matched when both matrices exist, are readable and have the same shape (the stored tensor's shape where it is
known, and ``N x M`` times slices); otherwise it carries the reason, for a row of its own (weightwatcher 0.7.7
instead analyzes an unmatched layer as it is, and a shape mismatch as a zero matrix).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from .analysis import AnalysisOptions, model_matrices
from .weights.checkpoints import Checkpoint, FileMap, TensorInfo, open_checkpoint
from .weights.matrix import WeightMatrix
from .weights.modules import clean_name
from .weights.state_dict import ShapeAccess, is_weight_entry, iter_state_dict_matrices, state_dict_source

__all__ = ["MatrixPair", "MatrixSource", "Source", "checkpoint_source", "dict_source", "module_source", "open_source",
           "pair_matrices"]

#: What can be paired: a module, a state dict, or checkpoint path(s) (:func:`~lightning_htsr.analyze_checkpoint`'s).
Source = Union[nn.Module, Mapping[str, Any], str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]


@dataclass
class MatrixPair:
    """One matrix of side A and its partner of side B.

    Attributes:
        name: The matrix name (``analyze()``'s).
        a: Side A's matrix (``None`` when only B has this name).
        b: Side B's matrix (``None`` when B has no such name).
        reason: Why the two cannot be compared (``None`` when matched).
    """

    name: str
    a: WeightMatrix | None
    b: WeightMatrix | None
    reason: str | None = None

    @property
    def matched(self) -> bool:
        """Both sides present, readable and of the same shape."""
        return self.reason is None


class MatrixSource:
    """One side of a pairing: its matrices streamed in order, or looked up one by name.

    Args:
        plan: Every matrix by name with its shape (values not needed).
        stream: Yields the matrices with their values, in order.
        lookup: The matrix of a name, read on demand (``None`` if absent).
        shapes: The stored tensor shape behind each matrix, by :attr:`WeightMatrix.source` (where known).
    """

    def __init__(self, plan: Sequence[WeightMatrix], stream: Callable[[], Iterator[WeightMatrix]],
                 lookup: Callable[[str], WeightMatrix | None], shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.plan = list(plan)
        self._stream, self._lookup, self.shapes = stream, lookup, dict(shapes)
        self.names = {m.name for m in self.plan}

    def stream(self) -> Iterator[WeightMatrix]:
        """The matrices with their values, in order (read one at a time from a checkpoint)."""
        return self._stream()

    def get(self, name: str) -> WeightMatrix | None:
        """The matrix called ``name`` (``None`` if there is none)."""
        return self._lookup(name) if name in self.names else None

    def stored_shape(self, matrix: WeightMatrix) -> tuple[int, ...] | None:
        """The shape of the stored tensor behind ``matrix`` (``None`` if unknown)."""
        return self.shapes.get(matrix.source)


def _tensor_shapes(items: Iterable[tuple[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """Stored shapes keyed like :attr:`WeightMatrix.source` (``fc`` for ``fc.weight``)."""
    return {state_dict_source(clean_name(k), s): s for k, s in items if is_weight_entry(k, s)}


def _in_memory(matrices: list[WeightMatrix], shapes: Mapping[str, tuple[int, ...]]) -> MatrixSource:
    by_name = {m.name: m for m in matrices}
    return MatrixSource(matrices, lambda: iter(matrices), by_name.get, shapes)


def module_source(model: nn.Module, options: AnalysisOptions, **selection: Any) -> MatrixSource:
    """A module's matrices as :func:`~lightning_htsr.analyze` lists them (views of its weights, no copies).

    Args:
        model: The module.
        options: For ``min_evals``/``max_evals``.
        **selection: ``include``, ``exclude``, ``layer_types``, ``ww_compat`` of :func:`~lightning_htsr.analyze`.
    """
    shapes = _tensor_shapes((k, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items()
                            if isinstance(v, Tensor))
    return _in_memory(model_matrices(model, options, **selection), shapes)


def dict_source(state_dict: Mapping[str, Any], options: AnalysisOptions, *,
                include: Sequence[str] | str | None = None,
                exclude: Sequence[str] | str | None = None) -> MatrixSource:
    """A state dict's matrices as :func:`~lightning_htsr.analyze_state_dict` lists them (views, no copies)."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, Tensor)}
    matrices = list(iter_state_dict_matrices(state_dict.items(), shapes=shapes, include=include, exclude=exclude,
                                             min_evals=options.min_evals, max_evals=options.max_evals))
    return _in_memory(matrices, _tensor_shapes(shapes.items()))


class _TensorReader:
    """Reads single tensors of a checkpoint by name, in any order: one
    :class:`~lightning_htsr.weights.checkpoints.FileMap` per file (the reader behind
    :meth:`~lightning_htsr.weights.checkpoints.Checkpoint.tensors`)."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._maps: dict[Any, FileMap] = {}

    def read(self, info: TensorInfo) -> Tensor:
        """The tensor of ``info`` on the CPU, in its stored dtype."""
        if info.file not in self._maps:
            self._maps[info.file] = self.checkpoint.file_map(info.file)
        return self._maps[info.file].read(info)


def checkpoint_source(checkpoint: Checkpoint, options: AnalysisOptions, *,
                      include: Sequence[str] | str | None = None,
                      exclude: Sequence[str] | str | None = None) -> MatrixSource:
    """A checkpoint's matrices as :func:`~lightning_htsr.analyze_checkpoint` lists them, streamed or read one by
    name (the last tensor read is kept, so q, k and v of one fused weight read it once)."""
    shapes = checkpoint.shapes()
    select = {"shapes": shapes, "include": include, "exclude": exclude, "min_evals": options.min_evals,
              "max_evals": options.max_evals, "tie": False}
    metas = ((i.name, torch.empty(i.shape, dtype=i.dtype, device="meta")) for i in checkpoint.infos)
    plan = list(iter_state_dict_matrices(metas, access=ShapeAccess(), **select))
    keys = {state_dict_source(i.name, i.shape): i for i in checkpoint.infos if is_weight_entry(i.name, i.shape)}
    sources = {m.name: m.source for m in plan}
    reader = _TensorReader(checkpoint)
    cache: dict[str, dict[str, WeightMatrix]] = {}

    def lookup(name: str) -> WeightMatrix | None:
        source = sources[name]
        if source not in cache:
            cache.clear()
            info = keys[source]
            cache[source] = {m.name: m for m in iter_state_dict_matrices([(info.name, reader.read(info))], **select)}
        return cache[source].get(name)

    def stream() -> Iterator[WeightMatrix]:
        wanted = (lambda i: is_weight_entry(i.name, i.shape))
        return iter_state_dict_matrices(checkpoint.tensors(wanted), **select)

    return MatrixSource(plan, stream, lookup, _tensor_shapes(shapes.items()))


def open_source(source: Source, options: AnalysisOptions, *, trust_pickle: bool = False,
                **selection: Any) -> MatrixSource:
    """The :class:`MatrixSource` of a module, a state dict or checkpoint path(s).

    Args:
        source: What to read.
        options: For ``min_evals``/``max_evals``.
        trust_pickle: Allow ``torch.save`` files that pickle arbitrary Python objects.
        **selection: ``include``/``exclude`` (any source); ``layer_types``/``ww_compat`` (modules).

    Raises:
        CheckpointError: When a checkpoint cannot be read.
        TypeError: For anything else.
    """
    if isinstance(source, nn.Module):
        return module_source(source, options, **selection)
    names = {k: selection.get(k) for k in ("include", "exclude")}
    if isinstance(source, Mapping):
        return dict_source(source, options, **names)
    if isinstance(source, (str, os.PathLike)) or (isinstance(source, Sequence) and source and all(
            isinstance(p, (str, os.PathLike)) for p in source)):
        return checkpoint_source(open_checkpoint(source, trust_pickle=trust_pickle), options, **names)
    raise TypeError(f"expected a module, a state dict or checkpoint path(s), got {type(source).__name__}")


def _shapes(a: WeightMatrix, b: WeightMatrix, side_a: MatrixSource, side_b: MatrixSource) -> tuple[str, str]:
    """How the two shapes are shown: the stored tensors' where known and different, else the slices'."""
    stored_a, stored_b = side_a.stored_shape(a), side_b.stored_shape(b)
    if stored_a is not None and stored_b is not None and stored_a != stored_b:
        return "x".join(map(str, stored_a)), "x".join(map(str, stored_b))
    return f"{a.num_slices}x{a.N}x{a.M} slices", f"{b.num_slices}x{b.N}x{b.M}"


def _mismatch(a: WeightMatrix, b: WeightMatrix, side_a: MatrixSource, side_b: MatrixSource) -> bool:
    stored_a, stored_b = side_a.stored_shape(a), side_b.stored_shape(b)
    if stored_a is not None and stored_b is not None and stored_a != stored_b:
        return True
    return (a.N, a.M, a.num_slices) != (b.N, b.M, b.num_slices)


def pair_matrices(a: MatrixSource, b: MatrixSource, *, label_b: str = "B",
                  matrices: Iterable[WeightMatrix] | None = None, only_b: bool = False) -> Iterator[MatrixPair]:
    """Side A's matrices in order, each with its partner in ``b`` read when it comes.

    Args:
        a: Side A (streamed).
        b: Side B (looked up by name).
        label_b: How reasons name side B (``"the base model"``).
        matrices: Side A's matrices to pair instead of ``a.stream()`` (e.g. a rank's share).
        only_b: Then also yield B's matrices that A does not have (``a=None``).

    Yields:
        :class:`MatrixPair` objects; a matrix that cannot be paired says why in ``reason``.

    Example:
        >>> import torch
        >>> from lightning_htsr.analysis import AnalysisOptions
        >>> o = AnalysisOptions(min_evals=0)
        >>> sa = dict_source({"x.weight": torch.ones(4, 3), "y.weight": torch.ones(4, 3)}, o)
        >>> sb = dict_source({"x.weight": torch.ones(3, 4)}, o)
        >>> [(p.name, p.reason) for p in pair_matrices(sa, sb)]
        [('x', 'shape 4x3 here, 3x4 in B'), ('y', 'not in B')]
    """
    seen: set[str] = set()
    for matrix in (a.stream() if matrices is None else matrices):
        seen.add(matrix.name)
        partner = b.get(matrix.name)
        if partner is None:
            yield MatrixPair(matrix.name, matrix, None, f"not in {label_b}")
        elif _mismatch(matrix, partner, a, b):
            here, there = _shapes(matrix, partner, a, b)
            yield MatrixPair(matrix.name, matrix, partner, f"shape {here} here, {there} in {label_b}")
        elif partner.slices is None and matrix.slices is not None and partner.skip_reason:
            yield MatrixPair(matrix.name, matrix, partner, f"{label_b}: {partner.skip_reason}")
        else:
            yield MatrixPair(matrix.name, matrix, partner)
    if only_b:
        for matrix in b.plan:
            if matrix.name not in seen and matrix.name not in a.names:
                yield MatrixPair(matrix.name, None, matrix, f"only in {label_b}")
