"""Records -> flat scalar metrics, the form every Lightning logger and ``trainer.callback_metrics`` accept."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...records import finite_number, records_to_frame, summarize
from ...spectra.phases import Phase

__all__ = ["MATRIX_SCALARS", "MODEL_SCALARS", "is_model_key", "phase_legend", "scalar_metrics"]

#: Per-matrix scalars, logged as ``<prefix>/<matrix name>/<metric>`` (plus ``/phase``, the raw phase code of the analysis, and ``/smoothed_phase``, the smoothed one).
MATRIX_SCALARS: tuple[str, ...] = ("alpha", "entropy", "alpha_weighted", "stable_rank", "mp_softrank", "num_spikes")

#: Model-level scalars: ``<prefix>/alpha_mean`` etc., from :func:`~lightning_htsr.records.summarize` (means over
#: the classified matrices, the same set as the ``frac_<phase>`` shares).
MODEL_SCALARS: dict[str, str] = {
    "alpha_mean": "alpha",
    "entropy_mean": "entropy",
    "alpha_weighted_mean": "alpha_weighted",
    "stable_rank_mean": "stable_rank",
    "mp_softrank_mean": "mp_softrank",
    "log_spectral_norm_mean": "log_spectral_norm",
}


def is_model_key(key: str, prefix: str = "htsr") -> bool:
    """Whether a key of :func:`scalar_metrics` is model-level (``<prefix>/alpha_mean``) rather than per matrix
    (``<prefix>/<matrix>/alpha``); works for prefixes that contain ``/`` themselves.

    Example:
        >>> is_model_key("runs/htsr/alpha_mean", "runs/htsr"), is_model_key("runs/htsr/fc/alpha", "runs/htsr")
        (True, False)
    """
    start = f"{prefix}/"
    return key.startswith(start) and "/" not in key[len(start):]


def phase_legend() -> str:
    """Markdown table of the integer codes logged for phases."""
    rows = "\n".join(f"| {p.code} | {p.value} |" for p in Phase)
    return (f"| code | phase |\n|---:|---|\n{rows}\n\n-1: not classified (too few eigenvalues). `<matrix>/phase` is "
            "the raw phase of each analysis, `<matrix>/smoothed_phase` the smoothed one (hysteresis) that early "
            "stopping acts on; the same names as the history file's columns.")


def _matrix_scalars(record: Mapping[str, Any], smoothed: str | None, prefix: str,
                    extra: Sequence[str] = ()) -> dict[str, float]:
    """Per-matrix scalars. An unclassified matrix's raw alpha goes to ``alpha_unclassified``, not ``alpha``: it
    is no finding (too few eigenvalues), so it stays out of the alpha charts."""
    name, phase = record["name"], record.get("phase")
    out: dict[str, float] = {}
    for metric in (*MATRIX_SCALARS, *extra):
        value = record.get(metric)
        if finite_number(value):
            key = metric if metric != "alpha" or phase else "alpha_unclassified"
            out[f"{prefix}/{name}/{key}"] = float(value)
    out[f"{prefix}/{name}/phase"] = float(Phase(phase).code) if phase else -1.0  # -1: too small to classify
    out[f"{prefix}/{name}/smoothed_phase"] = float(Phase(smoothed).code) if phase and smoothed else -1.0
    return out


def scalar_metrics(
    records: Sequence[Mapping[str, Any]],
    smoothed: Mapping[str, str | None],
    *,
    prefix: str = "htsr",
    extra: Sequence[str] = (),
) -> dict[str, float]:
    """The scalars of one analysis.

    Non-finite values are left out (a NaN in ``callback_metrics`` would trip ``EarlyStopping(check_finite=True)``).
    Model-level values come from :func:`~lightning_htsr.records.summarize` (means over the classified matrices),
    the same numbers ``summarize()`` gives for this analysis' rows of the history file.

    Args:
        records: The analysis' records.
        smoothed: Smoothed phase per matrix name.
        prefix: Key namespace.
        extra: More record columns to log per matrix (e.g. ``"ERG_gap"``, ``"num_ERG_spikes"``, ``"sv_max"``).

    Returns:
        ``{key: value}`` with per-matrix keys ``<prefix>/<name>/<metric>``, ``<prefix>/<name>/phase`` (raw phase
        code, see :func:`phase_legend`; -1 for analyzed but unclassified matrices), ``<prefix>/<name>/
        smoothed_phase`` (smoothed code) and, for unclassified matrices, ``<prefix>/<name>/alpha_unclassified``
        instead of ``alpha``; model-level keys ``<prefix>/alpha_mean``, ``<prefix>/entropy_mean``, ...,
        ``<prefix>/frac_<phase>`` (share of classified matrices in each raw phase), ``<prefix>/smoothed_frac_<phase>``
        (the same for the smoothed phase, what early stopping acts on), ``<prefix>/num_valid``,
        ``<prefix>/num_analyzed`` and ``<prefix>/num_classified``.

    Example:
        >>> recs = [{"name": "fc", "status": "success", "alpha": 3.0, "entropy": 0.9, "phase": "heavy_tailed"},
        ...         {"name": "head", "status": "success", "alpha": 1.3, "entropy": 0.9, "phase": None}]
        >>> m = scalar_metrics(recs, {"fc": "heavy_tailed", "head": None})
        >>> m["htsr/fc/alpha"], m["htsr/fc/phase"], m["htsr/alpha_mean"], m["htsr/frac_heavy_tailed"]
        (3.0, 4.0, 3.0, 1.0)
        >>> m["htsr/head/alpha_unclassified"], m["htsr/head/phase"], "htsr/head/alpha" in m
        (1.3, -1.0, False)
    """
    out: dict[str, float] = {}
    for record in records:
        if record.get("status") == "skipped":  # no spectrum: nothing to log (its counts are placeholders)
            continue
        out.update(_matrix_scalars(record, smoothed.get(record["name"]), prefix, extra))
    frame = records_to_frame({**r, "smoothed_phase": smoothed.get(r["name"])} for r in records)
    if not len(frame) or "status" not in frame:
        return out
    summary = summarize(frame, [c for c in MODEL_SCALARS.values() if c in frame])
    for key, column in MODEL_SCALARS.items():
        if finite_number(summary.get(column)):
            out[f"{prefix}/{key}"] = float(summary[column])
    for key in ("num_valid", "num_analyzed", "num_classified"):
        out[f"{prefix}/{key}"] = float(summary[key])
    if summary["num_classified"]:
        out.update({f"{prefix}/{key}": float(value) for key, value in summary.items() if "frac_" in key})
    return out
