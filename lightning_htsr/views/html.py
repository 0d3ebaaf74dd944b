"""How results are shown to a person: table cells, ESD figure files and self-contained HTML pages.

The building blocks shared by the two outputs for people, ``lightning-htsr analyze`` (:mod:`lightning_htsr.views.cli`:
the printed table and summary line, ``--plots DIR`` with its ``index.html``) and the training-run report
(:mod:`lightning_htsr.views.report`: ``lightning-htsr report RUN``). The figures themselves are drawn by
:mod:`lightning_htsr.plotting`; this module names, titles and saves them.

* Text: :func:`format_value` (one table cell), :func:`phase_counts` (matrices per phase).
* Figure files: :func:`esd_figure` (a titled :func:`~lightning_htsr.plotting.plot_esd`), :func:`save_png`,
  :func:`safe_filename` (a unique file name per matrix).
* HTML: :func:`html_table`, :func:`esd_grid` (linked ESD thumbnails), :func:`html_page` (a complete page with
  inline CSS, no external resources).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..spectra.phases import Phase

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..spectra.marchenko_pastur import MarchenkoPasturFit
    from ..spectra.powerlaw import FitScan, PowerLawFit

__all__ = [
    "esd_figure",
    "esd_grid",
    "fit_figure",
    "format_value",
    "html_page",
    "html_table",
    "phase_counts",
    "safe_filename",
    "save_png",
]


# ------------------------------------------------------------------------------------------------ text


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


# ------------------------------------------------------------------------------------------------ figure files


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
    from ..plotting import phase_label, plot_esd

    title = f"{name}: {phase_label(phase)}"
    if powerlaw is not None and powerlaw.ok and math.isfinite(powerlaw.alpha):
        title += f"  (α={powerlaw.alpha:.2f}, D={powerlaw.D:.3f})"
    q = Q if Q is not None and math.isfinite(Q) and Q >= 1 else None
    return plot_esd(eigenvalues, powerlaw=powerlaw, mp=mp, phase=phase, title=title, Q=q)


def fit_figure(name: str, eigenvalues: Any, scan: FitScan, *, mp: MarchenkoPasturFit | None, phase: Any,
               Q: float | None = None) -> Figure:
    """:func:`~lightning_htsr.fit_plots.plot_fit_diagnostics` titled with the matrix name and its phase.

    Args:
        name: Matrix name (for the title).
        eigenvalues: The ESD.
        scan: The fit's :class:`~lightning_htsr.spectra.powerlaw.FitScan`.
        mp: Marchenko-Pastur fit, or ``None``.
        phase: Phase (name, :class:`~lightning_htsr.Phase` or ``PhaseResult``), or ``None``.
        Q: Aspect ratio ``N / M`` (default: from the fitted bulk edges).

    Returns:
        The figure.
    """
    from ..fit_plots import plot_fit_diagnostics
    from ..plotting import phase_label

    q = Q if Q is not None and math.isfinite(Q) and Q >= 1 else None
    return plot_fit_diagnostics(eigenvalues, scan, mp=mp, phase=phase, title=f"{name}: {phase_label(phase)}", Q=q)


def save_png(fig: Figure, path: Path) -> None:
    """Write a figure as PNG (no pyplot involved), creating the parent directory."""
    from ..plotting import figure_to_png

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_to_png(fig))


# ------------------------------------------------------------------------------------------------ HTML


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
    """An HTML table (escaped) of ``rows``; ``links`` maps a ``name`` to an href for that row's name cell.

    Example:
        >>> print(html_table([{"name": "fc", "alpha": 3.14159}], ["name", "alpha"], links={"fc": "esd_fc.png"}))
        <table>
        <thead><tr><th>name</th><th>alpha</th></tr></thead>
        <tbody>
        <tr><td><a href="esd_fc.png">fc</a></td><td class="num">3.142</td></tr>
        </tbody>
        </table>
    """
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
