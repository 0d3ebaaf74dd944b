"""One live analysis of a model in training: this rank's share of the matrices analyzed (unchanged ones reused),
everyone's results gathered, on every rank in the same order. The callback's computing part, without its state."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..analysis import AnalysisOptions, analyze_matrices, matrix_identity
from ..distributed import assign_owners, full_weight_access, gather_objects
from ..records import MatrixResult, empty_record
from ..weights.modules import weight_matrices
from .reuse import ResultCache

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

__all__ = ["analyze_live"]


@contextmanager
def compute_threads(trainer: Trainer, pl_module: LightningModule) -> Iterator[None]:
    """On CPU, cap torch's intra-op threads at this process' share of the cores during the analysis."""
    device = getattr(pl_module, "device", torch.device("cpu"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", getattr(trainer, "num_devices", 1) or 1))
    before = torch.get_num_threads()
    if device.type == "cpu" and local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def analyze_live(trainer: Trainer, pl_module: LightningModule, options: AnalysisOptions,
                 selection: Mapping[str, Any], *, lora: str = "merged", reuse: ResultCache | None = None,
                 scans: bool = False) -> list[MatrixResult]:
    """Analyze this rank's share of ``pl_module``'s matrices and gather everyone's results (all ranks, same order).

    Args:
        trainer: The running trainer (world size, rank, the wrapped model for sharded weights).
        pl_module: The model whose weights are analyzed.
        options: The analysis conventions.
        selection: ``include``, ``exclude``, ``layer_types``, ``min_evals``, ``max_evals`` of
            :func:`~lightning_htsr.weights.modules.weight_matrices`.
        lora: What a ``peft`` LoRA layer is (``"merged"``, ``"delta"`` or ``"base"``).
        reuse: Results of unchanged weights to reuse (and to update); ``None``: analyze everything.
        scans: Also keep each fit's ``D(xmin)``/``alpha(xmin)`` scan (for the fit-diagnostics figures); every matrix
            is then analyzed afresh, since a reused result has none.

    Returns:
        One :class:`~lightning_htsr.records.MatrixResult` per matrix. A failure never raises: this rank's matrices
        are recorded as skipped, with the error as their reason, and a warning.
    """
    world, rank = int(trainer.world_size), int(trainer.global_rank)
    model = trainer.model if trainer.model is not None else pl_module
    local: list[MatrixResult] = []
    with torch.no_grad(), compute_threads(trainer, pl_module), full_weight_access(model) as access:
        plan = weight_matrices(pl_module, access=access, materialize=False, lora=lora, **selection)
        owners = assign_owners(plan, world) if world > 1 else None
        mine = (lambda source: owners[source] == rank) if owners is not None else (lambda source: True)
        try:
            keys, reused = reuse.split(plan, mine) if reuse is not None else ({}, {})
            if scans:
                reused = {}  # the fit-diagnostics figures need every matrix's scan: analyze all this time
            mats = weight_matrices(pl_module, access=access, lora=lora, **selection,
                                   select=lambda source: mine(source) and source not in reused)
            fresh = []
            for matrix, res in zip(mats, analyze_matrices(mats, options)):
                ev = res.eigenvalues.numpy().astype(np.float32) if res.eigenvalues is not None else None
                fresh.append((matrix.source, MatrixResult({**res.record, "rank": rank}, ev, res.powerlaw, res.mp,
                                                          res.fit_scan() if scans else None)))
            if reuse is not None:
                reuse.store(keys, fresh)
            local = _in_plan_order(plan, [r for _, r in fresh], reused)
        except Exception as err:  # noqa: BLE001 - a bug here must not end anybody's training run
            warnings.warn(f"lightning-htsr: analysis failed on rank {rank} ({type(err).__name__}: {err}); "
                          "these matrices are recorded as skipped", UserWarning, stacklevel=3)
            if reuse is not None:
                reuse.clear()
            reason = f"analysis error: {type(err).__name__}: {err}"
            local = [MatrixResult({**empty_record(**matrix_identity(m), status="skipped", skip_reason=reason),
                                   "rank": rank}) for m in plan if mine(m.source)]
    if world == 1:
        return local
    parts = gather_objects(local, world)  # records, float32 eigenvalues and the (small, frozen) fits
    by_name = {r.name: r for part in parts for r in part}
    return [by_name[m.name] for m in plan if m.name in by_name]


def _in_plan_order(plan: Sequence[Any], fresh: list[MatrixResult],
                   reused: dict[str, list[MatrixResult]]) -> list[MatrixResult]:
    """This rank's new and reused results in the order of the plan."""
    by_name = {r.name: r for r in fresh}
    by_name.update((r.name, r) for results in reused.values() for r in results)
    return [by_name[m.name] for m in plan if m.name in by_name]
