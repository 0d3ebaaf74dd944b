"""Records -> flat scalar metrics, the form every Lightning logger and ``trainer.callback_metrics`` accept."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..phases import Phase
from ..records import records_to_frame, summarize
from ..stopping import phase_fraction

__all__ = ["MATRIX_SCALARS", "MODEL_SCALARS", "phase_legend", "scalar_metrics"]

#: Per-matrix scalars, logged as ``<prefix>/<matrix name>/<metric>`` (plus ``/phase``, the smoothed phase code).
MATRIX_SCALARS: tuple[str, ...] = ("alpha", "entropy", "alpha_weighted", "stable_rank", "mp_softrank", "num_spikes")

#: Model-level scalars: ``<prefix>/alpha_mean`` etc. (means over the matrices with enough eigenvalues to classify,
#: the same set as the ``frac_<phase>`` shares) and phase fractions.
MODEL_SCALARS: dict[str, str] = {
    "alpha_mean": "alpha",
    "entropy_mean": "entropy",
    "alpha_weighted_mean": "alpha_weighted",
    "stable_rank_mean": "stable_rank",
    "mp_softrank_mean": "mp_softrank",
    "log_spectral_norm_mean": "log_spectral_norm",
}


def phase_legend() -> str:
    """Markdown table of the integer codes logged for phases."""
    rows = "\n".join(f"| {p.code} | {p.value} |" for p in Phase)
    return f"| code | phase |\n|---:|---|\n{rows}\n\n-1: not classified (too few eigenvalues)"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def scalar_metrics(
    records: Sequence[Mapping[str, Any]],
    smoothed: Mapping[str, str | None],
    *,
    prefix: str = "htsr",
) -> dict[str, float]:
    """The scalars of one analysis.

    Non-finite values are left out (a NaN in ``callback_metrics`` would trip ``EarlyStopping(check_finite=True)``).

    Args:
        records: The analysis' records.
        smoothed: Smoothed phase per matrix name.
        prefix: Key namespace.

    Returns:
        ``{key: value}`` with per-matrix keys ``<prefix>/<name>/<metric>`` and ``<prefix>/<name>/phase`` (integer
        code, see :func:`phase_legend`; -1 for analyzed but unclassified matrices) and model-level keys ``<prefix>/alpha_mean``, ``<prefix>/entropy_mean``,
        ..., ``<prefix>/frac_<phase>`` (share of classified matrices in each smoothed phase, including
        ``frac_heavy_tailed``), ``<prefix>/num_valid``.

    Example:
        >>> recs = [{"name": "fc", "status": "success", "alpha": 3.0, "entropy": 0.9, "phase": "heavy_tailed"}]
        >>> m = scalar_metrics(recs, {"fc": "heavy_tailed"})
        >>> m["htsr/fc/alpha"], m["htsr/fc/phase"], m["htsr/alpha_mean"], m["htsr/frac_heavy_tailed"]
        (3.0, 4.0, 3.0, 1.0)
    """
    out: dict[str, float] = {}
    for record in records:
        name = record["name"]
        if record.get("status") == "skipped":  # no spectrum: nothing to log (its counts are placeholders)
            continue
        for metric in MATRIX_SCALARS:
            value = record.get(metric)
            if _finite(value):
                out[f"{prefix}/{name}/{metric}"] = float(value)
        phase = smoothed.get(name)
        out[f"{prefix}/{name}/phase"] = float(Phase(phase).code) if phase else -1.0  # -1: too small to classify
    frame = records_to_frame(records)
    if len(frame) and "status" in frame:
        summary = summarize(frame, [c for c in MODEL_SCALARS.values() if c in frame], classified_only=True)
        for key, column in MODEL_SCALARS.items():
            if _finite(summary.get(column)):
                out[f"{prefix}/{key}"] = float(summary[column])
        out[f"{prefix}/num_valid"] = float(summary["num_valid"])
    for phase in Phase:
        fraction, classified = phase_fraction(smoothed, phase.value)
        if classified:
            out[f"{prefix}/frac_{phase.value}"] = fraction
    return out
