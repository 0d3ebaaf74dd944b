"""The report of a training run: PNG figures and a self-contained ``index.html`` from the callback's files.

:class:`~lightning_htsr.HTSRCallback` writes ``htsr_history.csv`` (one row per matrix per analysis, see
:data:`~lightning_htsr.training.sinks.history.HISTORY_COLUMNS`) and ``htsr_spectra.npz`` (the eigenvalues of the latest
analysis) into the logger's log dir. :func:`write_report` turns them into:

* ``alpha_history.png`` and ``entropy_history.png``: the metric per matrix over the analyses, with the layer mean;
* ``phase_map.png``: the smoothed phase of every matrix at every analysis;
* ``esd/esd_<matrix>.png``: the final ESD of every matrix with its power-law and Marchenko-Pastur fits, rebuilt
  from the history columns of the analysis the spectra belong to (when ``htsr_spectra.npz`` is present);
* ``fit/fit_<matrix>.png``: the power-law fit's diagnostics of the same spectra (:func:`recorded_scan`,
  :func:`~lightning_htsr.fit_plots.plot_fit_diagnostics`);
* ``index.html``: relative links to the figures, the table of the final analysis, the list of analyses, and a
  "Stopped" section saying where and why the callback stopped training (or that it did not).

What lives where: this module finds (:func:`find_history`) and reads (:func:`load_history`, :func:`fits_from_row`)
a run's files and assembles the report; the figures are drawn by :mod:`lightning_htsr.plotting`; table cells, figure
files and HTML pages come from :mod:`lightning_htsr.views.html`, which the command line's ``analyze --plots`` uses too.
The command line front end is ``lightning-htsr report RUN`` (:mod:`lightning_htsr.views.cli`).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..spectra.marchenko_pastur import MarchenkoPasturFit
from ..spectra.powerlaw import FitScan, PowerLawFit, fit_scan
from ..training.sinks.history import HISTORY_COLUMNS, SPECTRA_FILE, read_history, read_spectra
from .html import (
    esd_figure,
    esd_grid,
    fit_figure,
    format_value,
    html_page,
    html_table,
    phase_counts,
    safe_filename,
    save_png,
)

# esd_figure, format_value, html_page, html_table, phase_counts, safe_filename and save_png lived here before
# lightning_htsr.views.html; importing them from lightning_htsr.views.report still works.

__all__ = [
    "DEFAULT_REPORT_DIR",
    "REPORT_TABLE_COLUMNS",
    "ReportError",
    "SPECTRA_FILE",
    "find_history",
    "fits_from_row",
    "recorded_scan",
    "is_history_file",
    "load_history",
    "write_report",
]

#: Name of the report directory created next to the history file (or inside the run directory).
DEFAULT_REPORT_DIR = "htsr_report"

#: Columns of the final-analysis table in ``index.html`` (those present in the history are shown).
REPORT_TABLE_COLUMNS: tuple[str, ...] = (
    "name", "N", "M", "alpha", "D", "entropy", "stable_rank", "mp_softrank", "num_spikes", "phase",
    "smoothed_phase", "warning", "status", "skip_reason",
)  # fmt: skip

_HISTORY_SUFFIXES = (".csv", ".jsonl", ".json")
_HEADER_PREFIX = ",".join(HISTORY_COLUMNS[:5])  # "analysis,epoch,global_step,trigger,name"
_ANALYSIS_KEYS = ("analysis", "epoch", "global_step", "trigger")
_TEXT_COLUMNS = ("trigger", "status", "skip_reason", "warning", "phase", "smoothed_phase", "stopping_reason")


class ReportError(Exception):
    """A run or history file that cannot be reported on (missing, unreadable, not a history)."""


# ------------------------------------------------------------------------------------------------ finding files


def is_history_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file looks like a history written by the callback (judged by its first line only).

    A CSV history starts with the header ``analysis,epoch,global_step,trigger,name,...``; a JSON-lines history's
    first line is an object with ``analysis``, ``global_step`` and ``name`` keys.

    Args:
        path: Any file.

    Returns:
        ``True`` for a ``.csv``/``.jsonl``/``.json`` file with a history's first line.
    """
    path = Path(path)
    if path.suffix.lower() not in _HISTORY_SUFFIXES or not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline(1 << 16).strip()
    except OSError:
        return False
    if path.suffix.lower() == ".csv":
        return first.startswith(_HEADER_PREFIX)
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and {"analysis", "global_step", "name"} <= set(row)


def find_history(run: str | os.PathLike[str]) -> tuple[Path, list[Path]]:
    """The history file of a run: ``run`` itself if it is a file, else the newest history below the directory.

    Directories are searched recursively for ``.csv``, ``.jsonl`` and ``.json`` files whose first line is a
    history's (see :func:`is_history_file`), so a custom ``history_file=`` name is found too; Lightning's own
    ``metrics.csv`` is not. Report directories (``htsr_report``) are skipped.

    Args:
        run: A log directory (e.g. ``lightning_logs/version_3`` or a parent of several versions) or a history file.

    Returns:
        ``(chosen, candidates)``: the newest history (by modification time) and every history found, newest first.

    Raises:
        ReportError: When ``run`` does not exist, or no history is found below it.
    """
    run = Path(run)
    if not run.exists():
        raise ReportError(f"{run}: no such file or directory")
    if run.is_file():
        return run, [run]
    found: list[Path] = []
    for root, dirs, files in os.walk(run):
        dirs[:] = sorted(d for d in dirs if d != DEFAULT_REPORT_DIR and not d.startswith("."))
        found.extend(Path(root) / f for f in files if is_history_file(Path(root) / f))
    if not found:
        raise ReportError(f"{run}: no HT-SR history found in this directory or below it (expected a "
                          "'htsr_history.csv' or '.jsonl' written by HTSRCallback(history_file=...))")
    found.sort(key=lambda p: (p.stat().st_mtime, str(p)), reverse=True)
    return found[0], found


# ------------------------------------------------------------------------------------------------ the history


def load_history(history_path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a history file and number its analyses.

    Adds the column ``report_analysis``: 0, 1, ... per analysis in file order (a new analysis starts wherever
    ``analysis``, ``epoch``, ``global_step`` or ``trigger`` changes), so two runs appended to one file stay apart.

    Args:
        history_path: A CSV or JSON-lines history.

    Returns:
        The history, text columns with ``""`` for missing values.

    Raises:
        ReportError: When the file is missing, unreadable, empty or lacks the ``name``/``analysis`` columns.
    """
    path = Path(history_path)
    frame = _read_history_file(path)
    for column in _TEXT_COLUMNS:
        frame[column] = frame[column].map(_text) if column in frame.columns else ""
    for column in ("epoch", "global_step"):
        if column not in frame.columns:
            frame[column] = frame["analysis"]
    for column in ("analysis", "epoch", "global_step"):
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.notna().all():
            frame[column] = values.astype("int64")
    keys = frame[list(_ANALYSIS_KEYS)].astype(str)
    changed = (keys != keys.shift()).any(axis=1)
    frame["report_analysis"] = changed.cumsum() - 1
    return frame.reset_index(drop=True)


def _read_history_file(path: Path) -> pd.DataFrame:
    """The rows of a history file as written, or a :class:`ReportError` saying why there are none."""
    if not path.exists():
        raise ReportError(f"{path}: no such file")
    if path.is_dir():
        raise ReportError(f"{path}: is a directory, expected a history file")
    try:
        frame = read_history(path)
    except pd.errors.EmptyDataError:
        raise ReportError(f"{path}: the history file is empty") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise ReportError(f"{path}: cannot read the history file ({type(err).__name__}: {_first_line(err)})") \
            from None
    missing = [c for c in ("analysis", "name") if c not in frame.columns]
    if missing:
        raise ReportError(f"{path}: not an HT-SR history (no column(s) {', '.join(missing)}; expected the columns "
                          f"of lightning_htsr.training.sinks.history.HISTORY_COLUMNS)")
    if frame.empty:
        raise ReportError(f"{path}: the history has no rows yet (no analysis has run)")
    return frame


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _first_line(err: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(row: Mapping[str, Any], key: str) -> float:
    try:
        value = float(row.get(key, math.nan))
    except (TypeError, ValueError):
        return math.nan
    return value


def _count(row: Mapping[str, Any], key: str) -> int:
    value = _number(row, key)
    return int(value) if math.isfinite(value) else 0


def fits_from_row(row: Mapping[str, Any]) -> tuple[PowerLawFit, MarchenkoPasturFit]:
    """Rebuild a matrix's power-law and Marchenko-Pastur fits from one history row (for :func:`plot_esd`).

    Args:
        row: A history row (or an ``analyze()`` record) with the columns ``alpha, xmin, xmax, D, sigma,
            num_pl_spikes`` and ``sigma_mp, lambda_minus, lambda_plus, tw_scale, spike_threshold, num_spikes,
            spike_gap_tw, max_gap_tw, ks_mp, tail_mass, mp_softrank``.

    Returns:
        ``(powerlaw, mp)``; the power law is a failed fit (with the row's ``skip_reason``) when alpha is missing.

    Example:
        >>> pl, mp = fits_from_row({"alpha": 3.0, "xmin": 1.0, "xmax": 9.0, "D": 0.05, "sigma": 0.2,
        ...                         "num_pl_spikes": 50, "num_evals": 200, "lambda_plus": 2.0})
        >>> pl.ok, pl.alpha, mp.lambda_plus, math.isnan(mp.sigma_mp)
        (True, 3.0, 2.0, True)
    """
    alpha = _number(row, "alpha")
    if math.isfinite(alpha):
        powerlaw = PowerLawFit(alpha=alpha, xmin=_number(row, "xmin"), xmax=_number(row, "xmax"), D=_number(row, "D"),
                               sigma=_number(row, "sigma"), num_pl_spikes=_count(row, "num_pl_spikes"),
                               num_evals=_count(row, "num_evals"), status="success")
    else:
        reason = _text(row.get("skip_reason")) or "no fit recorded"
        powerlaw = PowerLawFit.failed(reason, num_evals=_count(row, "num_evals"), xmax=_number(row, "xmax"))
    mp = MarchenkoPasturFit(
        sigma_mp=_number(row, "sigma_mp"),
        lambda_minus=_number(row, "lambda_minus"),
        lambda_plus=_number(row, "lambda_plus"),
        tw_scale=_number(row, "tw_scale"),
        spike_threshold=_number(row, "spike_threshold"),
        num_spikes=_count(row, "num_spikes"),
        spike_gap_tw=_number(row, "spike_gap_tw"),
        max_gap_tw=_number(row, "max_gap_tw"),
        ks_mp=_number(row, "ks_mp"),
        tail_mass=_number(row, "tail_mass"),
        mp_softrank=_number(row, "mp_softrank"),
    )
    return powerlaw, mp


# ------------------------------------------------------------------------------------------------ the report


@dataclass(frozen=True)
class _RunHistory:
    """A loaded history grouped by analysis: what every part of the report is drawn from."""

    path: Path  #: the history file
    frame: pd.DataFrame  #: :func:`load_history`'s rows
    analyses: pd.DataFrame  #: one row per analysis (index ``report_analysis``): analysis, epoch, step, trigger, size
    rows_of: dict[int, pd.DataFrame]  #: the rows of each analysis, in file order
    summaries: dict[int, dict[str, Any]]  #: :func:`~lightning_htsr.summarize` of each analysis
    names: list[str]  #: every matrix, in order of first appearance
    x: str  #: the column of ``analyses`` the figures use as their x axis

    @property
    def final_id(self) -> int:
        """The ``report_analysis`` of the last analysis."""
        return int(self.analyses.index[-1])

    @property
    def x_label(self) -> str:
        """The x axis' label."""
        return {"report_analysis": "analysis"}.get(self.x, self.x)


def _group_history(history_path: Path) -> _RunHistory:
    """Load a history and group it by analysis."""
    from ..records import summarize

    frame = load_history(history_path)
    rows_of = dict(list(frame.groupby("report_analysis", sort=True)))
    analyses = frame.groupby("report_analysis", sort=True).agg(
        analysis=("analysis", "first"), epoch=("epoch", "first"), global_step=("global_step", "first"),
        trigger=("trigger", "first"), matrices=("name", "size"))
    return _RunHistory(path=history_path, frame=frame, analyses=analyses, rows_of=rows_of,
                       summaries={report_id: summarize(rows) for report_id, rows in rows_of.items()},
                       names=list(dict.fromkeys(frame["name"].astype(str))), x=_x_axis(analyses))


def _x_axis(analyses: pd.DataFrame) -> str:
    """The column to plot analyses against: epoch or global step when they tell analyses apart, else the index."""
    for column in ("epoch", "global_step"):
        values = pd.to_numeric(analyses[column], errors="coerce")
        if values.notna().all() and values.is_unique:
            return column
    return "report_analysis"


@dataclass(frozen=True)
class _Figure:
    """A figure of the report, with its own section in ``index.html``."""

    title: str
    file: str  #: relative to the report directory
    caption: str


def _metric_figures(run: _RunHistory, out: Path) -> list[_Figure]:
    """``alpha_history.png`` and ``entropy_history.png`` (each when the history has a value of that metric)."""
    from ..plotting import plot_metric_history

    by_index = run.x == "report_analysis"
    plot_frame = run.frame.rename(columns={"report_analysis": "analysis #"}) if by_index else run.frame
    x_col = "analysis #" if by_index else run.x
    figures = []
    for metric, title in (("alpha", "Power-law exponent alpha"), ("entropy", "Spectral entropy")):
        if metric in plot_frame.columns and pd.to_numeric(plot_frame[metric], errors="coerce").notna().any():
            fig = plot_metric_history(plot_frame, metric, by=x_col, title=f"{metric} per matrix by {run.x_label}")
            save_png(fig, out / f"{metric}_history.png")
            figures.append(_Figure(title, f"{metric}_history.png", f"{metric} of every matrix at every analysis; "
                                                                   "bold: mean over the classified matrices (as in "
                                                                   "the summaries); grey crosses: too small to "
                                                                   "classify"))
    return figures


def _phase_map_figure(run: _RunHistory, out: Path) -> _Figure:
    """``phase_map.png``: the smoothed phase (the raw one when none was smoothed) of every matrix and analysis."""
    from ..plotting import plot_phase_map

    frame, analyses, names = run.frame, run.analyses, run.names
    phase_column = "smoothed_phase" if (frame["smoothed_phase"] != "").any() else "phase"
    grid = frame.pivot_table(index="name", columns="report_analysis", values=phase_column, aggfunc="last")
    grid = grid.reindex(index=names, columns=list(analyses.index))
    steps = [format_value(analyses.loc[a, run.x]) if run.x != "report_analysis" else str(a) for a in analyses.index]
    cells = grid.loc[names].values.tolist()  # plot_phase_map reads None, "" and NaN alike as "no phase"
    fig = plot_phase_map(names, steps, cells, xlabel=run.x_label, title=f"{phase_column} per matrix and analysis")
    save_png(fig, out / "phase_map.png")
    return _Figure("Phase map", "phase_map.png", f"{phase_column} of every matrix (rows) at every analysis (columns)")


@dataclass(frozen=True)
class _EsdFigures:
    """The final ESD figures: the analysis whose fits they draw, the files written and a note for the reader."""

    analysis_id: int  #: ``report_analysis`` of the spectra (normally the last analysis)
    items: list[tuple[str, str, str]]  #: ``(matrix name, file, caption)`` for :func:`~lightning_htsr.views.html.esd_grid`
    links: dict[str, str]  #: matrix name -> file
    note: str  #: why there are none, or that the spectra are not in the history; ``""`` when all is well
    fits: list[tuple[str, str, str]] = field(default_factory=list)  #: the fit diagnostics, as ``items``


def _esd_figures(run: _RunHistory, spectra_file: Path, out: Path) -> _EsdFigures:
    """Draw ``esd/esd_<matrix>.png`` for every matrix with a spectrum in ``spectra_file``, with its history fits."""
    if not spectra_file.is_file():
        return _EsdFigures(run.final_id, [], {}, f"No {spectra_file.name} next to the history "
                                                 "(HTSRCallback(spectra_file=...) writes it), so there are no ESD "
                                                 "figures.")
    try:
        spectra, step, epoch = read_spectra(spectra_file)
    except Exception as err:  # noqa: BLE001 - a damaged npz must not prevent the rest of the report
        return _EsdFigures(run.final_id, [], {},
                           f"Could not read {spectra_file.name} ({type(err).__name__}: {_first_line(err)}).")
    analyses = run.analyses
    match = analyses[(pd.to_numeric(analyses["global_step"], errors="coerce") == step)
                     & (pd.to_numeric(analyses["epoch"], errors="coerce") == epoch)]
    esd_id, note = run.final_id, ""
    if not match.empty:
        esd_id = int(match.index[-1])
    else:
        note = (f"{spectra_file.name} holds the spectra of step {step} (epoch {epoch}), which is not in the history; "
                "the fits drawn are those of the last analysis.")
    items, fits = _draw_esds(run.rows_of[esd_id].to_dict("records"), spectra, out)
    return _EsdFigures(esd_id, items, {name: file for name, file, _ in items}, note, fits)


def recorded_scan(eigenvalues: Any, row: Mapping[str, Any]) -> FitScan | None:
    """``D(xmin)`` and ``alpha(xmin)`` of a stored spectrum around a history row's fit.

    The history keeps the fit, not its settings: every candidate is scored (tails of 2 or more), the recorded
    ``xmin`` is marked, and the KS convention is the one whose ``D`` there is closest to the recorded ``D``. The
    callback stores float32 spectra, so the marked values agree with the row to float32 precision.

    Returns:
        The scan, or ``None`` when the row has no power-law fit.
    """
    xmin, d = _number(row, "xmin"), _number(row, "D")
    if not (math.isfinite(xmin) and math.isfinite(d)):
        return None
    scans = [fit_scan(eigenvalues, ks=ks, min_tail=2, at_xmin=xmin) for ks in ("two_sided", "lower")]
    return min(scans, key=lambda s: abs(s.fit.D - d) if s.fit.ok else math.inf)


def _draw_esds(rows: list[dict[str, Any]], spectra: Mapping[str, Any],
               out: Path) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """One ESD figure and one fit-diagnostics figure per history row with a non-empty spectrum; the
    ``(matrix name, file, caption)`` of each kind."""
    taken: set[str] = set()
    items, fits = [], []
    for row in rows:
        name = str(row["name"])
        ev = spectra.get(name)
        if ev is None or np.asarray(ev).size == 0:
            continue
        powerlaw, mp = fits_from_row(row)
        phase = row.get("phase") or None
        fig = esd_figure(name, ev, powerlaw=powerlaw, mp=mp, phase=phase, Q=_number(row, "Q"))
        file = "esd/" + safe_filename(name, taken)
        save_png(fig, out / file)
        caption = f"{name}: {row.get('phase') or 'unclassified'}, alpha {format_value(_number(row, 'alpha'))}"
        items.append((name, file, caption))
        scan = recorded_scan(ev, row)
        if scan is not None:
            fit_file = "fit/" + safe_filename(name, taken, prefix="fit_")
            save_png(fit_figure(name, ev, scan, mp=mp, phase=phase, Q=_number(row, "Q")), out / fit_file)
            fits.append((name, fit_file, f"{name}: D and alpha over xmin (xmin {format_value(_number(row, 'xmin'))})"))
    return items, fits


# ------------------------------------------------------------------------------------------------ index.html


def _header_html(run: _RunHistory) -> list[str]:
    """The title and the paragraph about the history file."""
    analyses = run.analyses
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return [
        "<h1>HT-SR report</h1>",
        f"<p>History: <code>{html.escape(str(run.path.resolve()))}</code>: {len(analyses)} analyses of "
        f"{len(run.names)} matrices, epochs {format_value(analyses['epoch'].min())} to "
        f"{format_value(analyses['epoch'].max())}, global steps {format_value(analyses['global_step'].min())} to "
        f"{format_value(analyses['global_step'].max())}. Generated {html.escape(generated)}.</p>",
    ]


def _stop_section(frame: pd.DataFrame, analyses: pd.DataFrame) -> str:
    """The HTML of the "Stopped" section."""
    stops = frame[frame["stopping_reason"] != ""]
    if stops.empty:
        last = analyses.iloc[-1]
        text = (f"Not stopped: no analysis recorded a stop (the run ended on its own, was interrupted, or is still "
                f"running). Last analysis: epoch {format_value(last['epoch'])}, global step "
                f"{format_value(last['global_step'])}.")
        return f'<p class="notstopped">{html.escape(text)}</p>'
    first = stops.iloc[0]
    text = (f"Training was stopped by HTSRCallback at epoch {format_value(first['epoch'])} (global step "
            f"{format_value(first['global_step'])}, analysis {format_value(first['analysis'])}): "
            f"{first['stopping_reason']}")
    return f'<p class="stopped">{html.escape(text)}</p>'


def _final_html(run: _RunHistory, esd: _EsdFigures) -> list[str]:
    """The "Final analysis" section: its summary and its table (names linked to their ESD figures)."""
    from ..records import flag_unclassified

    final_id = run.final_id
    final_rows, final, summary = run.rows_of[final_id], run.analyses.loc[final_id], run.summaries[final_id]
    summary_text = (f"{summary['num_layers']} matrices, {summary['num_analyzed']} analyzed, "
                    f"{summary['num_classified']} classified; mean alpha over the classified ones "
                    f"{format_value(summary.get('alpha', math.nan))}, mean entropy "
                    f"{format_value(summary.get('entropy', math.nan))}; phases: {phase_counts(final_rows['phase'])}")
    columns = [c for c in REPORT_TABLE_COLUMNS if c in final_rows.columns]
    return [
        '<h2 id="final">Final analysis</h2>',
        f"<p>Analysis {format_value(final['analysis'])} at epoch {format_value(final['epoch'])}, global step "
        f"{format_value(final['global_step'])} ({html.escape(str(final['trigger']) or 'unknown trigger')}): "
        f"{html.escape(summary_text)}.</p>",
        html_table([flag_unclassified(r, format_value) for r in final_rows.to_dict("records")], columns,
                   links=esd.links if esd.analysis_id == final_id else None),
    ]


def _figure_html(figure: _Figure) -> str:
    """A section of one figure: heading, image and caption."""
    return (f'<h2>{html.escape(figure.title)}</h2>\n<figure><img src="{html.escape(figure.file, quote=True)}" '
            f'alt="{html.escape(figure.title, quote=True)}"><figcaption>{html.escape(figure.caption)}</figcaption>'
            "</figure>")


def _esd_html(run: _RunHistory, esd: _EsdFigures) -> list[str]:
    """The "Final ESD fits" section: which analysis the spectra are of, the note, and the grid of figures."""
    parts = ['<h2 id="esd">Final ESD fits</h2>']
    if esd.analysis_id != run.final_id and esd.items:
        info = run.analyses.loc[esd.analysis_id]
        parts.append(f"<p>Spectra of analysis {format_value(info['analysis'])} (epoch {format_value(info['epoch'])}, "
                     f"global step {format_value(info['global_step'])}).</p>")
    if esd.note:
        parts.append(f"<p>{html.escape(esd.note)}</p>")
    if esd.items:
        parts.append("<p>Histogram of the eigenvalues of W<sup>T</sup>W/N (log-log) with the power-law fit (dashed, "
                     "from xmin), the Marchenko-Pastur bulk and its edge, and the Tracy-Widom spike threshold.</p>")
        parts.append(esd_grid(esd.items))
    if esd.fits:
        parts.append('<h2 id="fit">Power-law fit diagnostics</h2><p>Per matrix: the ESD on log-log, lin-lin and '
                     "log-lin axes with the Marchenko-Pastur bulk, and the KS distance D and alpha over the candidate "
                     "xmin, the recorded xmin marked: one clear minimum of D with a flat alpha around it is a power "
                     "law; an alpha that jumps near the largest candidates points at a few outliers (fingers).</p>")
        parts.append(esd_grid(esd.fits))
    return parts


def _analyses_html(run: _RunHistory) -> list[str]:
    """The "Analyses" section: one row per analysis with its means and stopping reason."""
    per_analysis = []
    for report_id, info in run.analyses.iterrows():
        rows, s = run.rows_of[report_id], run.summaries[report_id]
        per_analysis.append({"analysis": info["analysis"], "epoch": info["epoch"], "global_step": info["global_step"],
                             "trigger": info["trigger"], "matrices": int(info["matrices"]),
                             "alpha_mean": s.get("alpha", math.nan), "entropy_mean": s.get("entropy", math.nan),
                             "frac_heavy_tailed": s.get("frac_heavy_tailed", math.nan),
                             "stopping_reason": next((r for r in rows["stopping_reason"] if r), "")})
    return ['<h2 id="analyses">Analyses</h2>',
            html_table(per_analysis, ["analysis", "epoch", "global_step", "trigger", "matrices", "alpha_mean",
                                      "entropy_mean", "frac_heavy_tailed", "stopping_reason"])]


def _index_html(run: _RunHistory, figures: list[_Figure], esd: _EsdFigures) -> str:
    """The whole ``index.html``."""
    parts = [*_header_html(run), '<h2 id="stopped">Stopped</h2>', _stop_section(run.frame, run.analyses),
             *_final_html(run, esd), *(_figure_html(f) for f in figures), *_esd_html(run, esd), *_analyses_html(run)]
    return html_page(f"HT-SR report: {run.path.parent.name or run.path.name}", "\n".join(parts))


def write_report(
    history_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    spectra_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the figures and ``index.html`` of a run's history into ``out_dir``.

    Args:
        history_path: ``htsr_history.csv`` (or ``.jsonl``) written by :class:`~lightning_htsr.HTSRCallback`.
        out_dir: Report directory (created; existing files of the same names are replaced). Default:
            ``htsr_report/`` next to the history file.
        spectra_path: Latest eigenvalues (``.npz`` from the callback). Default: ``htsr_spectra.npz`` next to the
            history; the final ESD figures are left out when there is none.

    Returns:
        The path of ``index.html``.

    Raises:
        ReportError: When the history cannot be read or is not a history.
        OSError: When the report cannot be written.
    """
    history_path = Path(history_path)
    run = _group_history(history_path)
    out = Path(out_dir) if out_dir is not None else history_path.parent / DEFAULT_REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    figures = [*_metric_figures(run, out), _phase_map_figure(run, out)]
    spectra_file = Path(spectra_path) if spectra_path is not None else history_path.parent / SPECTRA_FILE
    esd = _esd_figures(run, spectra_file, out)
    index = out / "index.html"
    index.write_text(_index_html(run, figures, esd), encoding="utf-8")
    return index
