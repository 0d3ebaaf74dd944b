"""Stage 6 of the pipeline: per-matrix records -> tables and model-level summaries.

A record is a flat ``dict`` with the columns of :data:`COLUMNS` (plain Python values, so records go straight into
pandas, CSV/JSONL history files, checkpoints loaded with ``weights_only=True`` and collective ``broadcast_object``
calls). ``analyze()`` returns them as a ``pandas.DataFrame``; :func:`summarize` computes the model-level means and
counts (over the classified matrices) that every view shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .spectra.phases import Phase

__all__ = [
    "COLUMNS",
    "SUMMARY_METRICS",
    "flag_unclassified",
    "is_classified",
    "records_to_frame",
    "summarize",
]

#: Columns of a record, in table order.
COLUMNS: tuple[str, ...] = (
    # what was analyzed
    "name", "layer_type", "module_type", "N", "M", "Q", "num_slices", "rf", "num_evals", "dtype", "has_esd",
    "status", "skip_reason", "skip_kind",
    # power-law fit of the tail
    "alpha", "D", "xmin", "xmax", "sigma", "num_pl_spikes", "warning",
    # norms, ranks, entropy
    "norm", "log_norm", "spectral_norm", "log_spectral_norm", "stable_rank", "alpha_weighted", "log_alpha_norm",
    "entropy", "matrix_rank", "rank_loss", "weak_rank_loss", "lambda_max", "sv_max", "sv_min",
    # weightwatcher's detX / ERG columns
    "detX_num", "detX_val", "detX_val_unrescaled", "num_ERG_spikes", "ERG_gap",
    # Marchenko-Pastur fit and spikes
    "sigma_mp", "lambda_minus", "lambda_plus", "tw_scale", "spike_threshold", "num_spikes", "spike_gap_tw",
    "max_gap_tw", "ks_mp", "tail_mass", "mp_softrank",
    # phase
    "phase", "phase_reason", "frac_zero", "lr_exponential",
    # how it was computed
    "precision", "route", "note",
)  # fmt: skip

_TEXT = {"name", "layer_type", "module_type", "dtype", "status", "skip_reason", "skip_kind", "warning", "phase",
         "phase_reason", "precision", "route", "note"}
_INT = {"N", "M", "num_slices", "rf", "num_evals", "num_pl_spikes", "matrix_rank", "rank_loss", "num_spikes",
        "weak_rank_loss", "detX_num", "num_ERG_spikes", "ERG_gap"}

#: Metrics averaged by :func:`summarize` (weightwatcher's ``get_summary`` set plus entropy and D).
SUMMARY_METRICS: tuple[str, ...] = (
    "alpha", "alpha_weighted", "log_alpha_norm", "log_norm", "log_spectral_norm", "stable_rank", "mp_softrank",
    "entropy", "D",
)  # fmt: skip


@dataclass(frozen=True)
class MatrixResult:
    """One matrix's result as the callback gathers it across ranks and hands it to the sinks.

    Attributes:
        record: The row (:data:`COLUMNS`, plus ``rank``: the process that computed it).
        eigenvalues: Sorted eigenvalues as float32 (``None`` for skipped matrices).
        powerlaw: The power-law fit (for ESD figures), or ``None``.
        mp: The Marchenko-Pastur fit (for ESD figures), or ``None``.
        scan: The power-law fit's ``D(xmin)``/``alpha(xmin)`` (:class:`~lightning_htsr.spectra.powerlaw.FitScan`, for
            the fit-diagnostics figures), or ``None``.
    """

    record: Mapping[str, Any]
    eigenvalues: np.ndarray | None = None
    powerlaw: Any = None
    mp: Any = None
    scan: Any = None

    @property
    def name(self) -> str:
        """The matrix's name."""
        return str(self.record["name"])


def finite_number(value: Any) -> bool:
    """Whether a record value is a finite number (not NaN, inf, ``None``, a string or a bool).

    Example:
        >>> finite_number(2.5), finite_number(float("nan")), finite_number(None), finite_number(True)
        (True, False, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def empty_record(**values: Any) -> dict[str, Any]:
    """A record with every column present: text columns ``""``, counts 0, numbers NaN, overridden by ``values``."""
    record: dict[str, Any] = {}
    for column in COLUMNS:
        if column in _TEXT:
            record[column] = ""
        elif column in _INT:
            record[column] = 0
        else:
            record[column] = math.nan
    record["phase"] = None
    record["has_esd"] = False
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown record columns: {sorted(unknown)}")
    record.update(values)
    return record


def records_to_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Records -> ``DataFrame`` with the :data:`COLUMNS` first (extra keys, e.g. ``epoch``, follow)."""
    rows = list(records)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    extra = [c for c in frame.columns if c not in COLUMNS]
    ordered = [c for c in COLUMNS if c in frame.columns] + extra
    return frame[ordered]


def is_classified(frame: pd.DataFrame) -> pd.Series:
    """Rows that count in model-level numbers: ``status == "success"`` and a phase (enough eigenvalues to classify).

    A matrix smaller than ``min_evals`` keeps its row and its raw ``alpha`` but has no phase: its "tail" is most of
    its spectrum, so its alpha is not a finding and never enters a mean.
    """
    ok = frame["status"] == "success" if "status" in frame else pd.Series(True, index=frame.index)
    if "phase" in frame:
        ok &= frame["phase"].notna() & (frame["phase"] != "")
    return ok


#: How tables show the phase of a matrix analyzed but too small to classify.
TOO_SMALL = "(too small)"


def flag_unclassified(record: Mapping[str, Any], fmt: Callable[[Any], str] = "{:.3g}".format) -> dict[str, Any]:
    """A copy of a record for display: a matrix analyzed but too small to classify shows phase ``(too small)`` and
    its raw alpha in parentheses (it is no finding). Other records are returned unchanged (copied).

    Example:
        >>> flag_unclassified({"status": "success", "phase": None, "alpha": 1.33})
        {'status': 'success', 'phase': '(too small)', 'alpha': '(1.33)'}
    """
    row = dict(record)
    if row.get("status") == "success" and not (isinstance(row.get("phase"), str) and row["phase"]):
        row["phase"] = TOO_SMALL
        alpha = row.get("alpha")
        if isinstance(alpha, (int, float)) and math.isfinite(alpha):
            row["alpha"] = f"({fmt(alpha)})"
    return row


def summarize(
    frame: pd.DataFrame,
    metrics: Iterable[str] = SUMMARY_METRICS,
    *,
    max_alpha: float | None = None,
) -> dict[str, float | int]:
    """Model-level means and counts: the one definition behind TensorBoard's ``alpha_mean``, the CLI and the report.

    **Mean over the classified matrices**: rows with ``status == "success"`` and a phase (:func:`is_classified`)
    whose value is finite. Matrices too small to classify, skipped or degenerate ones never enter a mean (unlike
    weightwatcher's ``get_summary``, a plain mean over all rows including failed fits).

    Args:
        frame: Output of :func:`lightning_htsr.analyze`, or the rows of one analysis of a history file.
        metrics: Columns to average.
        max_alpha: Also drop rows whose alpha exceeds this (weightwatcher's README discards alpha > 8 as
            spurious); ``None`` keeps them.

    Returns:
        ``{metric: mean}`` plus the counts ``num_layers`` (rows), ``num_analyzed`` (status success),
        ``num_classified`` (of those, with a phase), ``num_valid`` (rows the means are taken over: the classified
        ones, fewer only with ``max_alpha``), ``<metric>_n`` (rows averaged for each metric), ``frac_<phase>``
        (share of the classified rows in each raw ``phase``) and, when the frame has a ``smoothed_phase`` column
        (history files), ``smoothed_frac_<phase>`` (the same over the smoothed phase).

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"status": ["success", "success", "success", "skipped"],
        ...                    "phase": ["heavy_tailed", "random_like", None, None],
        ...                    "alpha": [2.0, 4.0, 1.3, float("nan")]})
        >>> s = summarize(df, ["alpha"])
        >>> s["alpha"], s["alpha_n"], s["num_analyzed"], s["num_classified"], s["frac_heavy_tailed"]
        (3.0, 2, 3, 2, 0.5)
    """
    classified = frame[is_classified(frame)]
    ok = classified
    if max_alpha is not None and "alpha" in ok:
        ok = ok[~(ok["alpha"] > max_alpha)]
    analyzed = int((frame["status"] == "success").sum()) if "status" in frame else int(len(frame))
    out: dict[str, float | int] = {"num_layers": int(len(frame)), "num_analyzed": analyzed,
                                   "num_classified": int(len(classified)), "num_valid": int(len(ok))}
    for metric in metrics:
        if metric not in ok:
            continue
        values = pd.to_numeric(ok[metric], errors="coerce")
        values = values[values.map(lambda v: math.isfinite(v) if v == v else False)]
        out[metric] = float(values.mean()) if len(values) else math.nan
        out[f"{metric}_n"] = int(len(values))
    for column, key in (("phase", "frac_"), ("smoothed_phase", "smoothed_frac_")):
        if column in classified:
            labels = classified[column]
            for phase in (p.value for p in Phase):
                out[f"{key}{phase}"] = float((labels == phase).mean()) if len(labels) else math.nan
    return out
