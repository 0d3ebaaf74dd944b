"""Stage 6 of the pipeline: per-matrix records -> tables and model-level summaries.

A record is a flat ``dict`` with the columns of :data:`COLUMNS` (plain Python values, so records go straight into
pandas, CSV/JSONL history files, checkpoints loaded with ``weights_only=True`` and collective ``broadcast_object``
calls). ``analyze()`` returns them as a ``pandas.DataFrame``; :func:`summarize` averages a table the way
weightwatcher's ``get_summary`` does, but over valid rows only and with the counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from .phases import Phase

__all__ = ["COLUMNS", "SUMMARY_METRICS", "empty_record", "records_to_frame", "summarize"]

#: Columns of a record, in table order.
COLUMNS: tuple[str, ...] = (
    # what was analyzed
    "name", "layer_type", "module_type", "N", "M", "Q", "num_slices", "num_evals", "dtype",
    "status", "skip_reason",
    # power-law fit of the tail
    "alpha", "D", "xmin", "xmax", "sigma", "num_pl_spikes", "warning",
    # norms, ranks, entropy
    "norm", "log_norm", "spectral_norm", "log_spectral_norm", "stable_rank", "alpha_weighted", "log_alpha_norm",
    "entropy", "matrix_rank", "rank_loss",
    # Marchenko-Pastur fit and spikes
    "sigma_mp", "lambda_minus", "lambda_plus", "tw_scale", "spike_threshold", "num_spikes", "spike_gap_tw",
    "max_gap_tw", "ks_mp", "tail_mass", "mp_softrank",
    # phase
    "phase", "phase_reason", "frac_zero", "lr_exponential",
    # how it was computed
    "precision", "route", "note",
)  # fmt: skip

_TEXT = {"name", "layer_type", "module_type", "dtype", "status", "skip_reason", "warning", "phase", "phase_reason",
         "precision", "route", "note"}
_INT = {"N", "M", "num_slices", "num_evals", "num_pl_spikes", "matrix_rank", "rank_loss", "num_spikes"}

#: Metrics averaged by :func:`summarize` (weightwatcher's ``get_summary`` set plus entropy and D).
SUMMARY_METRICS: tuple[str, ...] = (
    "alpha", "alpha_weighted", "log_alpha_norm", "log_norm", "log_spectral_norm", "stable_rank", "mp_softrank",
    "entropy", "D",
)  # fmt: skip


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


def summarize(
    frame: pd.DataFrame,
    metrics: Iterable[str] = SUMMARY_METRICS,
    *,
    max_alpha: float | None = None,
    classified_only: bool = False,
) -> dict[str, float | int]:
    """Model-level means over the valid rows of an ``analyze()`` table.

    A row is valid for a metric when its ``status`` is ``"success"`` and the value is finite. Unlike
    weightwatcher's ``get_summary`` (a plain mean over all rows), failed fits (-1 there) never enter the means.

    Args:
        frame: Output of :func:`lightning_htsr.analyze` (or any frame with these columns).
        metrics: Columns to average.
        max_alpha: Also drop rows whose alpha exceeds this (weightwatcher's README discards alpha > 8 as
            spurious); ``None`` keeps them.
        classified_only: Average only rows that have a phase (enough eigenvalues to classify): the same set as
            the ``frac_<phase>`` shares. A 10-eigenvalue classifier head has a "tail" that is its whole spectrum.

    Returns:
        ``{metric: mean}`` plus ``num_layers`` (rows), ``num_valid`` (rows with status success), ``<metric>_n``
        (rows averaged for each metric) and, when phases are present, ``frac_<phase>`` over classified rows.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"status": ["success", "success", "skipped"], "alpha": [2.0, 4.0, float("nan")]})
        >>> s = summarize(df, ["alpha"])
        >>> s["alpha"], s["alpha_n"], s["num_valid"]
        (3.0, 2, 2)
    """
    ok = frame[frame["status"] == "success"] if "status" in frame else frame
    if classified_only and "phase" in ok:
        ok = ok[ok["phase"].notna() & (ok["phase"] != "")]
    if max_alpha is not None and "alpha" in ok:
        ok = ok[~(ok["alpha"] > max_alpha)]
    out: dict[str, float | int] = {"num_layers": int(len(frame)), "num_valid": int(len(ok))}
    for metric in metrics:
        if metric not in ok:
            continue
        values = pd.to_numeric(ok[metric], errors="coerce")
        values = values[values.map(lambda v: math.isfinite(v) if v == v else False)]
        out[metric] = float(values.mean()) if len(values) else math.nan
        out[f"{metric}_n"] = int(len(values))
    if "phase" in frame:
        labels = frame["phase"].dropna()
        labels = labels[labels != ""]
        for phase in (p.value for p in Phase):
            out[f"frac_{phase}"] = float((labels == phase).mean()) if len(labels) else math.nan
        out["num_classified"] = int(len(labels))
    return out
