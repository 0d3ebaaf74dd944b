"""Base-model deltas: the HT-SR analysis of ``W - W_base`` for every matrix of a fine-tuned model.

``analyze(model, base_model=base)``, ``analyze_state_dict(sd, base=...)``, ``analyze_checkpoint(path, base=...)`` and
``lightning-htsr analyze PATH --base BASE`` pair the model's matrices with the base's by name and shape
(:mod:`~lightning_htsr.pairs`; the model is streamed, each base matrix read when its partner comes) and analyze the
difference, computed in float32 (float64 when either side is). The rows are the model's matrices:

* no partner of that name and shape in the base: ``status="skipped"``, ``skip_kind="unmatched"`` (routine);
* the same weights as the base (a frozen layer): ``skip_kind="unchanged"`` (routine), no spectrum computed;
* a delta of low rank, e.g. a merged LoRA ``W + B @ A``: ``skip_kind="low_rank_delta"``, ``skip_reason``
  ``"low-rank delta: rank r of n ..."`` and no fits (their tail would be fitted to the numerical noise around
  zero). The rank is the package's own count of non-zero eigenvalues (``matrix_rank``: above the spectrum's
  numerical-zero tolerance) or, when smaller, the eigenvalues above a near-zero cluster (``frac_zero``, the phase
  classifier's ``zero_gap_decades`` test, which also separates a bf16-rounded merge's noise). A delta is low-rank
  when it is rank-deficient and either has fewer non-zero eigenvalues than ``min_evals`` (what the phase
  classifier needs) or would be classified ``rank_collapse`` (at least ``zero_fraction`` of them near zero).

weightwatcher 0.7.7's ``WeightWatcher(model=m, base_model=b).analyze()`` computes the same ``W_left - W_right``
per layer (matched by name, in order) and fits it whatever its rank; an unmatched layer is analyzed undeltaed and
a shape mismatch becomes a zero matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from .analysis import AnalysisOptions, MatrixAnalysis, analyze_stream
from .pairs import MatrixPair, MatrixSource, Source, open_source, pair_matrices
from .records import empty_record
from .weights.matrix import SkipKind, WeightMatrix

__all__ = ["BASE_LABEL", "analyze_deltas", "delta_matrices", "delta_records", "low_rank_delta"]

#: How rows name the other side.
BASE_LABEL = "the base model"

#: Columns a low-rank delta's row keeps (what the eigenvalues say without a fit); every other one is reset.
_KEPT = ("name", "layer_type", "module_type", "N", "M", "Q", "num_slices", "rf", "num_evals", "dtype", "note",
         "has_esd", "norm", "log_norm", "spectral_norm", "log_spectral_norm", "stable_rank", "entropy",
         "matrix_rank", "rank_loss", "weak_rank_loss", "lambda_max", "sv_max", "sv_min", "frac_zero", "precision",
         "route")


def _delta(pair: MatrixPair) -> WeightMatrix:
    """The matrix of ``W - W_base`` (or the model's matrix, skipped with the reason it has no delta)."""
    a, b = pair.a, pair.b
    assert a is not None  # the model's side is always present here
    if not pair.matched:
        return replace(a, slices=None, skip_reason=f"no delta: {pair.reason}", skip_kind=SkipKind.UNMATCHED)
    if a.slices is None or b is None or b.slices is None:
        return a  # skipped for its own reason (size, unreadable, ...)
    dtype = torch.promote_types(torch.promote_types(a.slices.dtype, b.slices.dtype), torch.float32)
    delta = a.slices.to(dtype, copy=True).sub_(b.slices.to(a.slices.device))  # no upcast copy of the base
    if not bool(delta.any()):
        return replace(a, slices=None, skip_reason=f"unchanged: the weights equal {BASE_LABEL}'s",
                       skip_kind=SkipKind.UNCHANGED)
    note = f"{a.note}; W - W_base" if a.note else "W - W_base"
    return replace(a, slices=delta, note=note)


def delta_matrices(model: MatrixSource, base: MatrixSource,
                   matrices: Iterable[WeightMatrix] | None = None) -> Iterator[WeightMatrix]:
    """The model's matrices as deltas from the base's, one at a time.

    Args:
        model: The fine-tuned side.
        base: The base side (each matrix read when its partner comes).
        matrices: The model's matrices to take instead of ``model.stream()`` (e.g. a rank's share).

    Yields:
        One :class:`~lightning_htsr.weights.matrix.WeightMatrix` per model matrix, its ``slices`` the delta.
    """
    for pair in pair_matrices(model, base, label_b=BASE_LABEL, matrices=matrices):
        yield _delta(pair)


def low_rank_delta(record: dict[str, Any], options: AnalysisOptions) -> int | None:
    """The rank of a delta's spectrum when it is low (see the module docstring), else ``None``.

    Example:
        >>> from lightning_htsr.analysis import AnalysisOptions
        >>> o = AnalysisOptions()
        >>> low_rank_delta({"num_evals": 64, "matrix_rank": 2, "frac_zero": 62 / 64}, o)
        2
        >>> low_rank_delta({"num_evals": 64, "matrix_rank": 64, "frac_zero": 0.0}, o) is None
        True
    """
    total = int(record["num_evals"])
    rank = int(record["matrix_rank"])
    frac_zero = record.get("frac_zero", math.nan)
    if isinstance(frac_zero, float) and math.isfinite(frac_zero):
        rank = min(rank, total - round(frac_zero * total))
    config = options.phase_config
    collapsed = isinstance(frac_zero, float) and frac_zero >= config.zero_fraction
    return rank if rank < total and (rank < config.min_evals or collapsed) else None


def _mark_low_rank(result: MatrixAnalysis, options: AnalysisOptions) -> MatrixAnalysis:
    record = result.record
    if record["status"] not in ("success", "degenerate") or not record.get("has_esd"):
        return result
    rank = low_rank_delta(record, options)
    if rank is None:
        return result
    reason = (f"low-rank delta: rank {rank} of {record['num_evals']} (e.g. a merged low-rank update); no fit, its "
              "tail would be numerical noise")
    kept = {k: record[k] for k in _KEPT if k in record}
    new = empty_record(**kept, status="skipped", skip_reason=reason, skip_kind=SkipKind.LOW_RANK_DELTA.value,
                       phase_reason=reason)
    return MatrixAnalysis(new, result.eigenvalues)


def analyze_deltas(model: MatrixSource, base: MatrixSource, options: AnalysisOptions, *,
                   matrices: Iterable[WeightMatrix] | None = None,
                   device: torch.device | str | None = None) -> Iterator[MatrixAnalysis]:
    """:func:`~lightning_htsr.analysis.analyze_stream` of the deltas, low-rank ones marked.

    Args:
        model: The fine-tuned side.
        base: The base side.
        options: Conventions.
        matrices: The model's matrices to take instead of ``model.stream()``.
        device: Analyze there.

    Yields:
        One :class:`~lightning_htsr.analysis.MatrixAnalysis` per model matrix, in order.
    """
    for result in analyze_stream(delta_matrices(model, base, matrices), options, device=device):
        yield _mark_low_rank(result, options)


def delta_records(model: Source, base: Source, options: AnalysisOptions, *, trust_pickle: bool = False,
                  **selection: Any) -> list[dict[str, Any]]:
    """The records of the model's deltas from the base (both a module, a state dict or checkpoint paths).

    Args:
        model: The fine-tuned model.
        base: The base model.
        options: Conventions.
        trust_pickle: Allow ``torch.save`` files that pickle arbitrary Python objects.
        **selection: ``include``/``exclude`` (and for modules ``layer_types``/``ww_compat``).

    Returns:
        One record per model matrix.
    """
    side = open_source(model, options, trust_pickle=trust_pickle, **selection)
    other = open_source(base, options, trust_pickle=trust_pickle, **selection)
    return [result.record for result in analyze_deltas(side, other, options)]
