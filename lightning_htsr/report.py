"""Offline report of a training run: PNG figures and a self-contained ``index.html`` from the callback's files.

:class:`~lightning_htsr.HTSRCallback` writes ``htsr_history.csv`` (one row per matrix per analysis, see
:data:`~lightning_htsr.sinks.history.HISTORY_COLUMNS`) and ``htsr_spectra.npz`` (the eigenvalues of the latest
analysis) into the logger's log dir. :func:`write_report` turns them into:

* ``alpha_history.png`` and ``entropy_history.png``: the metric per matrix over the analyses, with the layer mean;
* ``phase_map.png``: the smoothed phase of every matrix at every analysis;
* ``esd/esd_<matrix>.png``: the final ESD of every matrix with its power-law and Marchenko-Pastur fits, rebuilt
  from the history columns of the analysis the spectra belong to (when ``htsr_spectra.npz`` is present);
* ``index.html``: relative links to the figures, the table of the final analysis, the list of analyses, and a
  "Stopped" section saying where and why the callback stopped training (or that it did not).

:func:`find_history` locates the history file in a log directory. The command line front end is
``lightning-htsr report RUN`` (:mod:`lightning_htsr.cli`).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .marchenko_pastur import MarchenkoPasturFit
from .phases import Phase
from .powerlaw import PowerLawFit
from .sinks.history import HISTORY_COLUMNS, SPECTRA_FILE, read_history, read_spectra

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_REPORT_DIR",
    "REPORT_TABLE_COLUMNS",
    "ReportError",
    "SPECTRA_FILE",
    "esd_figure",
    "find_history",
    "fits_from_row",
    "format_value",
    "html_page",
    "html_table",
    "is_history_file",
    "load_history",
    "phase_counts",
    "safe_filename",
    "save_png",
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
                          f"of lightning_htsr.sinks.history.HISTORY_COLUMNS)")
    if frame.empty:
        raise ReportError(f"{path}: the history has no rows yet (no analysis has run)")
    for column in ("trigger", "status", "skip_reason", "warning", "phase", "smoothed_phase", "stopping_reason"):
        if column in frame.columns:
            frame[column] = frame[column].map(_text)
        else:
            frame[column] = ""
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


# ------------------------------------------------------------------------------------------------ shared helpers


def safe_filename(name: str, taken: set[str], *, prefix: str = "esd_", suffix: str = ".png") -> str:
    """A file name for a matrix, unique within ``taken`` (which it is added to).

    Example:
        >>> taken = set()
        >>> safe_filename("blocks.0/attn q", taken), safe_filename("blocks.0:attn q", taken)
        ('esd_blocks.0_attn_q.png', 'esd_blocks.0_attn_q-2.png')
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "matrix"
    stem = stem[:120]
    candidate, index = f"{prefix}{stem}{suffix}", 2
    while candidate.lower() in taken:
        candidate, index = f"{prefix}{stem}-{index}{suffix}", index + 1
    taken.add(candidate.lower())
    return candidate


def esd_figure(name: str, eigenvalues: Any, *, powerlaw: PowerLawFit | None, mp: MarchenkoPasturFit | None,
               phase: Any, Q: float | None = None) -> Figure:  # noqa: N803 - the paper's name
    """:func:`~lightning_htsr.plotting.plot_esd` titled with the matrix name, alpha and D.

    Args:
        name: Matrix name (for the title).
        eigenvalues: The ESD.
        powerlaw: Power-law fit, or ``None``.
        mp: Marchenko-Pastur fit, or ``None``.
        phase: Phase (name, :class:`~lightning_htsr.Phase` or ``PhaseResult``), or ``None``.
        Q: Aspect ratio ``N / M`` (default: from the fitted bulk edges).

    Returns:
        The figure.
    """
    from .plotting import phase_label, plot_esd

    title = f"{name}: {phase_label(phase)}"
    if powerlaw is not None and powerlaw.ok and math.isfinite(powerlaw.alpha):
        title += f"  (α={powerlaw.alpha:.2f}, D={powerlaw.D:.3f})"
    q = Q if Q is not None and math.isfinite(Q) and Q >= 1 else None
    return plot_esd(eigenvalues, powerlaw=powerlaw, mp=mp, phase=phase, title=title, Q=q)


def save_png(fig: Figure, path: Path) -> None:
    """Write a figure as PNG (no pyplot involved)."""
    from .plotting import figure_to_png

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_to_png(fig))


_PHASE_ORDER = tuple(p.value for p in Phase)


def phase_counts(phases: Iterable[Any]) -> str:
    """``"random_like 2, heavy_tailed 1, unclassified 1"``: matrices per phase, in the phases' order.

    Example:
        >>> phase_counts(["heavy_tailed", None, "random_like", "", "heavy_tailed"])
        'random_like 1, heavy_tailed 2, unclassified 2'
    """
    labels = [p if isinstance(p, str) and p else "unclassified" for p in phases]
    order = [*_PHASE_ORDER, *sorted(set(labels) - set(_PHASE_ORDER) - {"unclassified"}), "unclassified"]
    return ", ".join(f"{p} {labels.count(p)}" for p in order if p in labels)


def format_value(value: Any) -> str:
    """A table cell: integers as is, floats with 3 decimals (scientific when tiny or huge), NaN/None as ``-``.

    Example:
        >>> format_value(3.14159), format_value(float("nan")), format_value(12), format_value(2.5e-7)
        ('3.142', '-', '12', '2.500e-07')
    """
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0.0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.3f}"
    return str(value)


def esd_grid(items: Iterable[tuple[str, str, str]]) -> str:
    """HTML grid of ESD figures, one ``(matrix name, image file, caption)`` each; every image links to its file."""
    figures = []
    for name, file, caption in items:
        src = html.escape(file, quote=True)
        figures.append(f'<figure><a href="{src}"><img src="{src}" alt="ESD of {html.escape(name, quote=True)}"></a>'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return '<div class="grid">' + "\n".join(figures) + "</div>"


def html_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], *,
               links: Mapping[str, str] | None = None) -> str:
    """An HTML table (escaped) of ``rows``; ``links`` maps a ``name`` to an href for that row's name cell."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            text = html.escape("" if value == "" else format_value(value))
            if column == "name" and links and str(value) in links:
                text = f'<a href="{html.escape(links[str(value)], quote=True)}">{text}</a>'
            numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.grid figure { margin: 0; width: 380px; } .grid img { width: 380px; }
figcaption { font-size: 0.8em; color: #555; }
.stopped { background: #fff3e0; border-left: 4px solid #ff7f0e; padding: 0.5em 1em; }
.notstopped { background: #eef6ee; border-left: 4px solid #2ca02c; padding: 0.5em 1em; }
code { background: #f5f5f5; padding: 0 3px; }
"""


def html_page(title: str, body: str) -> str:
    """A complete, self-contained HTML page (inline CSS, no external resources)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


# ------------------------------------------------------------------------------------------------ the report


def _x_axis(analyses: pd.DataFrame) -> str:
    """The column to plot analyses against: epoch or global step when they tell analyses apart, else the index."""
    for column in ("epoch", "global_step"):
        values = pd.to_numeric(analyses[column], errors="coerce")
        if values.notna().all() and values.is_unique:
            return column
    return "report_analysis"


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
    from .plotting import plot_metric_history, plot_phase_map
    from .records import flag_unclassified, summarize

    history_path = Path(history_path)
    frame = load_history(history_path)
    out = Path(out_dir) if out_dir is not None else history_path.parent / DEFAULT_REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)

    rows_of = dict(list(frame.groupby("report_analysis", sort=True)))  # rows of each analysis, in file order
    summaries = {report_id: summarize(rows) for report_id, rows in rows_of.items()}
    analyses = frame.groupby("report_analysis", sort=True).agg(
        analysis=("analysis", "first"), epoch=("epoch", "first"), global_step=("global_step", "first"),
        trigger=("trigger", "first"), matrices=("name", "size"))
    names = list(dict.fromkeys(frame["name"].astype(str)))
    x = _x_axis(analyses)
    x_label = {"report_analysis": "analysis"}.get(x, x)
    plot_frame = frame.rename(columns={"report_analysis": "analysis #"}) if x == "report_analysis" else frame
    x_col = "analysis #" if x == "report_analysis" else x

    figures: list[tuple[str, str, str]] = []  # (section title, file, caption)
    for metric, title in (("alpha", "Power-law exponent alpha"), ("entropy", "Spectral entropy")):
        if metric in plot_frame.columns and pd.to_numeric(plot_frame[metric], errors="coerce").notna().any():
            fig = plot_metric_history(plot_frame, metric, by=x_col, title=f"{metric} per matrix by {x_label}")
            save_png(fig, out / f"{metric}_history.png")
            figures.append((title, f"{metric}_history.png", f"{metric} of every matrix at every analysis; "
                                                            "bold: mean over the classified matrices (as in the "
                                                            "summaries); grey crosses: too small to classify"))

    phase_column = "smoothed_phase" if (frame["smoothed_phase"] != "").any() else "phase"
    grid = frame.pivot_table(index="name", columns="report_analysis", values=phase_column, aggfunc="last")
    grid = grid.reindex(index=names, columns=list(analyses.index))
    steps = [format_value(analyses.loc[a, x]) if x != "report_analysis" else str(a) for a in analyses.index]
    cells = grid.loc[names].values.tolist()  # plot_phase_map reads None, "" and NaN alike as "no phase"
    fig = plot_phase_map(names, steps, cells, xlabel=x_label, title=f"{phase_column} per matrix and analysis")
    save_png(fig, out / "phase_map.png")
    figures.append(("Phase map", "phase_map.png", f"{phase_column} of every matrix (rows) at every analysis "
                                                  "(columns)"))

    # the analysis the spectra belong to (normally the last one), and its ESD figures
    final_id = int(analyses.index[-1])
    spectra_note = ""
    esd_links: dict[str, str] = {}
    esd_items: list[tuple[str, str, str]] = []
    spectra_file = Path(spectra_path) if spectra_path is not None else history_path.parent / SPECTRA_FILE
    esd_id = final_id
    if spectra_file.is_file():
        try:
            spectra, step, epoch = read_spectra(spectra_file)
        except Exception as err:  # noqa: BLE001 - a damaged npz must not prevent the rest of the report
            spectra_note = f"Could not read {spectra_file.name} ({type(err).__name__}: {_first_line(err)})."
            spectra = {}
        else:
            match = analyses[(pd.to_numeric(analyses["global_step"], errors="coerce") == step)
                             & (pd.to_numeric(analyses["epoch"], errors="coerce") == epoch)]
            if not match.empty:
                esd_id = int(match.index[-1])
            else:
                spectra_note = (f"{spectra_file.name} holds the spectra of step {step} (epoch {epoch}), which is "
                                "not in the history; the fits drawn are those of the last analysis.")
            taken: set[str] = set()
            for row in rows_of[esd_id].to_dict("records"):
                name = str(row["name"])
                ev = spectra.get(name)
                if ev is None or np.asarray(ev).size == 0:
                    continue
                powerlaw, mp = fits_from_row(row)
                phase = row.get("phase") or None
                fig = esd_figure(name, ev, powerlaw=powerlaw, mp=mp, phase=phase, Q=_number(row, "Q"))
                file = "esd/" + safe_filename(name, taken)
                save_png(fig, out / file)
                esd_links[name] = file
                caption = f"{name}: {row.get('phase') or 'unclassified'}, alpha {format_value(_number(row, 'alpha'))}"
                esd_items.append((name, file, caption))
    else:
        spectra_note = (f"No {spectra_file.name} next to the history (HTSRCallback(spectra_file=...) writes it), so "
                        "there are no ESD figures.")

    # ---- index.html
    final_rows = rows_of[final_id]
    final = analyses.loc[final_id]
    stop_html = _stop_section(frame, analyses)
    summary = summaries[final_id]
    summary_text = (f"{summary['num_layers']} matrices, {summary['num_analyzed']} analyzed, "
                    f"{summary['num_classified']} classified; mean alpha over the classified ones "
                    f"{format_value(summary.get('alpha', math.nan))}, mean entropy "
                    f"{format_value(summary.get('entropy', math.nan))}; phases: {phase_counts(final_rows['phase'])}")
    columns = [c for c in REPORT_TABLE_COLUMNS if c in final_rows.columns]
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "<h1>HT-SR report</h1>",
        f"<p>History: <code>{html.escape(str(history_path.resolve()))}</code>: {len(analyses)} analyses of "
        f"{len(names)} matrices, epochs {format_value(analyses['epoch'].min())} to "
        f"{format_value(analyses['epoch'].max())}, global steps {format_value(analyses['global_step'].min())} to "
        f"{format_value(analyses['global_step'].max())}. Generated {html.escape(generated)}.</p>",
        '<h2 id="stopped">Stopped</h2>',
        stop_html,
        '<h2 id="final">Final analysis</h2>',
        f"<p>Analysis {format_value(final['analysis'])} at epoch {format_value(final['epoch'])}, global step "
        f"{format_value(final['global_step'])} ({html.escape(str(final['trigger']) or 'unknown trigger')}): "
        f"{html.escape(summary_text)}.</p>",
        html_table([flag_unclassified(r, format_value) for r in final_rows.to_dict("records")], columns,
                   links=esd_links if esd_id == final_id else None),
    ]
    for title, file, caption in figures:
        parts.append(f'<h2>{html.escape(title)}</h2>\n<figure><img src="{html.escape(file, quote=True)}" '
                     f'alt="{html.escape(title, quote=True)}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    parts.append('<h2 id="esd">Final ESD fits</h2>')
    if esd_id != final_id and esd_items:
        parts.append(f"<p>Spectra of analysis {format_value(analyses.loc[esd_id, 'analysis'])} (epoch "
                     f"{format_value(analyses.loc[esd_id, 'epoch'])}, global step "
                     f"{format_value(analyses.loc[esd_id, 'global_step'])}).</p>")
    if spectra_note:
        parts.append(f"<p>{html.escape(spectra_note)}</p>")
    if esd_items:
        parts.append("<p>Histogram of the eigenvalues of W<sup>T</sup>W/N (log-log) with the power-law fit (dashed, "
                     "from xmin), the Marchenko-Pastur bulk and its edge, and the Tracy-Widom spike threshold.</p>")
        parts.append(esd_grid(esd_items))
    per_analysis = []
    for report_id, info in analyses.iterrows():
        rows, s = rows_of[report_id], summaries[report_id]
        per_analysis.append({"analysis": info["analysis"], "epoch": info["epoch"], "global_step": info["global_step"],
                             "trigger": info["trigger"], "matrices": int(info["matrices"]),
                             "alpha_mean": s.get("alpha", math.nan), "entropy_mean": s.get("entropy", math.nan),
                             "frac_heavy_tailed": s.get("frac_heavy_tailed", math.nan),
                             "stopping_reason": next((r for r in rows["stopping_reason"] if r), "")})
    parts.append('<h2 id="analyses">Analyses</h2>')
    parts.append(html_table(per_analysis, ["analysis", "epoch", "global_step", "trigger", "matrices", "alpha_mean",
                                           "entropy_mean", "frac_heavy_tailed", "stopping_reason"]))
    index = out / "index.html"
    index.write_text(html_page(f"HT-SR report: {history_path.parent.name or history_path.name}", "\n".join(parts)),
                     encoding="utf-8")
    return index
