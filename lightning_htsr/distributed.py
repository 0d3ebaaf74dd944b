"""Distributed analysis: who analyzes which matrix, how sharded weights are read, how results come together.

Under DDP every rank holds the full weights, so each rank analyzes a disjoint, cost-balanced share of the matrices
(:func:`assign_owners`) and the records are all-gathered (:func:`gather_objects`) so that every rank holds every
record (the stop decision is then identical everywhere) and rank 0 can log all of them.

Sharded weights are read through a :class:`~lightning_htsr.weights.matrix.WeightAccess`:

* FSDP2 / tensor parallel (``DTensor`` parameters): ``full_tensor()``, one parameter at a time, on every rank;
  only the owner keeps the result. Tested on CPU with Lightning's ``ModelParallelStrategy``.
* FSDP1 (``FullyShardedDataParallel``): the whole analysis runs inside ``summon_full_params(writeback=False)``
  (:func:`full_weight_access`), so the full model is materialized on every rank for its duration. FSDP1 needs
  CUDA; this path is implemented but not exercised by the CPU test suite.
* DeepSpeed ZeRO-3 (parameters with ``ds_id``): ``deepspeed.zero.GatheredParameters([p], modifier_rank=None)``
  one parameter at a time (:class:`DeepSpeedAccess`). Implemented, not exercised here (no DeepSpeed, no GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .weights.matrix import WeightAccess, WeightMatrix

__all__ = ["assign_owners", "matrix_cost"]


def matrix_cost(matrix: WeightMatrix) -> float:
    """Relative cost of one matrix: Gram ``N M^2`` plus eigensolver ``~4/3 M^3`` per slice."""
    if matrix.skip_reason is not None or matrix.M == 0:
        return 0.0
    return matrix.num_slices * (matrix.N * matrix.M**2 + 4.0 / 3.0 * matrix.M**3)


def assign_owners(plan: Sequence[WeightMatrix], world_size: int) -> dict[str, int]:
    """Balance the parameter entries (``WeightMatrix.source``) over ranks by cost (greedy longest-first).

    The result depends only on ``plan`` (same module order and shapes on every rank), so every rank computes the
    same assignment without communicating.

    Args:
        plan: The matrices, e.g. from ``weight_matrices(model, materialize=False)``.
        world_size: Number of ranks.

    Returns:
        ``{source: rank}``.

    Example:
        >>> from lightning_htsr.weights.modules import weight_matrices
        >>> plan = weight_matrices(nn.Sequential(nn.Linear(512, 512), nn.Linear(64, 64), nn.Linear(512, 512)),
        ...                        materialize=False)
        >>> assign_owners(plan, 2)
        {'0': 0, '2': 1, '1': 0}
    """
    costs: dict[str, float] = {}
    for m in plan:
        costs[m.source] = costs.get(m.source, 0.0) + matrix_cost(m)
    load = [0.0] * max(world_size, 1)
    owners: dict[str, int] = {}
    for source in sorted(costs, key=lambda s: -costs[s]):  # sorted() is stable: ties keep module order
        rank = min(range(len(load)), key=lambda r: (load[r], r))
        owners[source] = rank
        load[rank] += max(costs[source], 1.0)  # skipped entries still count, so they spread out too
    return owners


class DeepSpeedAccess(WeightAccess):
    """Read DeepSpeed ZeRO-3 partitioned parameters (collective per parameter; every rank must call it)."""

    def shape(self, param: Tensor) -> tuple[int, ...]:
        """Full shape (``ds_shape``) of a partitioned parameter."""
        return tuple(getattr(param, "ds_shape", param.shape))

    def is_sharded(self, param: Tensor) -> bool:
        """Whether ``param`` is partitioned by ZeRO-3."""
        return hasattr(param, "ds_id")

    def gather(self, param: Tensor) -> Tensor:
        """Full value: a detached copy gathered with ``GatheredParameters(modifier_rank=None)``."""
        if not self.is_sharded(param):
            return param
        import deepspeed  # type: ignore[import-not-found]

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.data.detach().clone()

    def problem(self, param: Tensor) -> str | None:
        """Like :meth:`WeightAccess.problem`, but partitioned parameters are readable here."""
        if self.is_sharded(param):
            return None if param.is_floating_point() else f"integer weights ({param.dtype})"
        return super().problem(param)


def _fsdp1_root(model: nn.Module) -> nn.Module | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            return module
    return None


@contextlib.contextmanager
def full_weight_access(model: nn.Module) -> Iterator[WeightAccess]:
    """Context in which every weight of ``model`` can be read in full; yields the matching access.

    Must be entered on every rank (it may run collectives).

    Args:
        model: The strategy-wrapped model (``trainer.model``), which may contain FSDP1 units.
    """
    root = _fsdp1_root(model)
    if root is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(root, recurse=True, writeback=False, rank0_only=False):
            yield WeightAccess()
        return
    deepspeed = DeepSpeedAccess()
    if any(deepspeed.is_sharded(p) for p in model.parameters()):
        yield deepspeed
        return
    yield WeightAccess()


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """``all_gather_object`` across the default process group (a list with ``obj`` alone when not distributed)."""
    if world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
