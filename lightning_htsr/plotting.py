"""Matplotlib figures of HT-SR diagnostics: one ESD with its fits, a phase map over training, metric histories.

Every function builds a :class:`matplotlib.figure.Figure` directly (never through ``pyplot``), so nothing touches
pyplot's global state: figures can be made in background threads, need no ``close()`` and are garbage-collected
like any object. Import this module lazily (``from lightning_htsr import plotting``) where a figure is wanted; it
needs only matplotlib, NumPy and pandas.

* :func:`plot_esd`: the log-log ESD of one matrix with the power-law fit, the Marchenko-Pastur bulk, the bulk edge
  and the Tracy-Widom spike threshold.
* :func:`plot_phase_map`: matrices x analyses, coloured by phase (:data:`PHASE_COLORS`).
* :func:`plot_metric_history`: a metric (``alpha`` ...) per matrix over epochs or steps, with the layer mean.
* :func:`figure_to_png` / :func:`figure_to_array`: for files, loggers and TensorBoard's ``add_image``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .spectra.marchenko_pastur import MarchenkoPasturFit, mp_pdf
from .spectra.phases import Phase, PhaseResult
from .spectra.powerlaw import PowerLawFit

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from torch import Tensor

__all__ = [
    "PHASE_COLORS",
    "UNCLASSIFIED",
    "figure_to_array",
    "figure_to_png",
    "phase_color",
    "phase_label",
    "plot_esd",
    "plot_metric_history",
    "plot_phase_map",
]

#: Label used for matrices without a phase (too small or degenerate to classify).
UNCLASSIFIED = "unclassified"

#: One colour per phase name (:class:`~lightning_htsr.spectra.phases.Phase` values), in order of increasing
#: self-regularization, plus grey for unclassified matrices (under both ``"unclassified"`` and ``""``).
PHASE_COLORS: dict[str, str] = {
    Phase.RANDOM_LIKE.value: "#1f77b4",  # blue
    Phase.BLEEDING_OUT.value: "#17becf",  # cyan
    Phase.BULK_PLUS_SPIKES.value: "#2ca02c",  # green
    Phase.BULK_DECAY.value: "#ff7f0e",  # orange
    Phase.HEAVY_TAILED.value: "#d62728",  # red
    Phase.RANK_COLLAPSE.value: "#9467bd",  # purple
    UNCLASSIFIED: "#b0b0b0",  # grey
    "": "#b0b0b0",
}


def phase_label(phase: Phase | PhaseResult | str | float | None) -> str:
    """The phase name of a :class:`Phase`, :class:`PhaseResult` or string; ``"unclassified"`` for ``None``, ``""``
    or NaN (how pandas stores a missing phase).

    Args:
        phase: A phase in any of the forms the package produces.

    Returns:
        A key of :data:`PHASE_COLORS` other than ``""`` (or the string itself if it is not a known phase).

    Example:
        >>> phase_label(Phase.HEAVY_TAILED), phase_label(None), phase_label(float("nan"))
        ('heavy_tailed', 'unclassified', 'unclassified')
    """
    if isinstance(phase, PhaseResult):
        phase = phase.phase
    if phase is None:
        return UNCLASSIFIED
    if isinstance(phase, Phase):
        return phase.value
    if isinstance(phase, float):
        return UNCLASSIFIED if math.isnan(phase) else str(phase)
    text = str(phase)
    return text if text else UNCLASSIFIED


def phase_color(phase: Phase | PhaseResult | str | float | None) -> str:
    """Colour of a phase (see :func:`phase_label` for the accepted forms); unknown labels get the grey of
    unclassified matrices.

    Args:
        phase: A phase in any of the forms the package produces.

    Returns:
        A hex colour from :data:`PHASE_COLORS`.
    """
    return PHASE_COLORS.get(phase_label(phase), PHASE_COLORS[UNCLASSIFIED])


def _positive(eigenvalues: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """Flat sorted float64 array of the finite, strictly positive eigenvalues."""
    if hasattr(eigenvalues, "detach"):
        x = eigenvalues.detach().double().cpu().numpy()  # type: ignore[union-attr]
    else:
        x = np.asarray(eigenvalues, dtype=np.float64)
    x = x.reshape(-1)
    return np.sort(x[np.isfinite(x) & (x > 0)])


def _finite(*values: float | None) -> bool:
    return all(v is not None and isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _mp_aspect_ratio(mp: MarchenkoPasturFit) -> float:
    """``Q`` from the fitted bulk edges: ``sqrt(lambda_-/lambda_+) = (1 - r) / (1 + r)`` with ``r = Q^-1/2``."""
    if not _finite(mp.lambda_minus, mp.lambda_plus) or mp.lambda_plus <= 0 or mp.lambda_minus < 0:
        return math.nan
    ratio = math.sqrt(mp.lambda_minus / mp.lambda_plus)
    r = (1.0 - ratio) / (1.0 + ratio)
    return 1.0 / (r * r) if r > 0 else math.nan


def _new_figure(figsize: tuple[float, float]) -> Figure:
    return Figure(figsize=figsize, dpi=100, layout="constrained")


def plot_esd(
    eigenvalues: Tensor | np.ndarray | Sequence[float],
    *,
    powerlaw: PowerLawFit | None = None,
    mp: MarchenkoPasturFit | None = None,
    phase: Phase | PhaseResult | str | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    Q: float | None = None,  # noqa: N803 - the paper's name
    bins: int | None = None,
) -> Figure:
    """Log-log empirical spectral density of one matrix with its fits.

    Draws, where available:

    * the density histogram of the positive eigenvalues on log-spaced bins (zeros and negatives dropped), in the
      phase's colour;
    * the fitted power law ``(alpha - 1) / xmin * (x / xmin)^-alpha``, scaled by the share of the plotted
      eigenvalues in its tail, from ``xmin`` to ``xmax`` (dashed), and a dotted vertical line at ``xmin``;
    * the Marchenko-Pastur density ``mp_pdf(x, Q, sigma_mp^2)`` of the fitted bulk (median matching fits it to
      the whole non-zero spectrum, so it is not rescaled), a vertical line at ``lambda_plus`` and one at the
      Tracy-Widom spike threshold.

    NaN or failed fits are left out (a failed power law is noted in the corner); the histogram is drawn whatever
    the fits. ``alpha``, ``D`` and the phase appear in the legend, and in the default title.

    Args:
        eigenvalues: The ESD (tensor, array or sequence; any order).
        powerlaw: Power-law fit; default: ``phase.powerlaw`` when ``phase`` is a :class:`PhaseResult`.
        mp: Marchenko-Pastur fit; default: ``phase.mp`` when ``phase`` is a :class:`PhaseResult`.
        phase: The phase (:class:`Phase`, its name, or a :class:`PhaseResult`), ``None`` if unknown.
        title: Axes title; default: the phase, ``alpha`` and ``D``.
        ax: Axes to draw into; default: a new figure.
        Q: Aspect ratio ``N / M`` for the MP density; default: derived from ``mp.lambda_minus / mp.lambda_plus``.
        bins: Number of histogram bins; default: ``sqrt`` of the number of eigenvalues, between 20 and 100.

    Returns:
        The figure drawn into (``ax``'s figure when ``ax`` is given).

    Example:
        >>> import numpy as np
        >>> fig = plot_esd(np.random.default_rng(0).chisquare(3, 500), phase="random_like")
        >>> ax = fig.axes[0]
        >>> ax.get_xscale(), ax.get_yscale()
        ('log', 'log')
    """
    if isinstance(phase, PhaseResult):
        powerlaw = powerlaw if powerlaw is not None else phase.powerlaw
        mp = mp if mp is not None else phase.mp
    label = phase_label(phase)
    fig: Any = _new_figure((6.4, 4.6)) if ax is None else ax.figure
    ax = fig.add_subplot() if ax is None else ax
    ax.set(xscale="log", yscale="log")
    x = _positive(eigenvalues)
    density_range = _draw_esd_histogram(ax, x, bins, phase_color(label))
    pl_text = _draw_powerlaw(ax, x, powerlaw) if powerlaw is not None else ""
    if mp is not None:
        _draw_marchenko_pastur(ax, x, mp, Q)
    _finish_esd_axes(ax, x, density_range, title, label, pl_text)
    return fig  # type: ignore[no-any-return]


def _draw_esd_histogram(ax: Axes, x: np.ndarray, bins: int | None, color: str) -> tuple[float, float]:
    """Density histogram of the sorted positive eigenvalues ``x`` on log-spaced bins; returns the smallest and
    largest non-zero density (NaN when there is nothing to draw)."""
    n = x.size
    if not n:
        ax.text(0.5, 0.5, "no positive eigenvalues", transform=ax.transAxes, ha="center", va="center")
        return math.nan, math.nan
    lo, hi = float(x[0]), float(x[-1])
    if hi <= lo * (1.0 + 1e-9):
        lo, hi = lo / 1.5, hi * 1.5
    count = bins if bins is not None else int(min(100, max(20, round(math.sqrt(n)))))
    edges = np.logspace(math.log10(lo), math.log10(hi), count + 1)
    density, _, _ = ax.hist(x, bins=edges, density=True, color=color, alpha=0.55, edgecolor="none",
                            label=f"ESD ({n} eigenvalues > 0)")
    positive = density[density > 0]
    return float(positive.min()), float(positive.max())


def _draw_powerlaw(ax: Axes, x: np.ndarray, powerlaw: PowerLawFit) -> str:
    """The fitted power law (dashed, scaled by the tail's share of ``x``) and ``xmin``; or a note when the fit
    failed. Returns the legend text ``α=..., D=...`` (empty without a fit)."""
    n = x.size
    if not (powerlaw.ok and _finite(powerlaw.alpha, powerlaw.xmin) and powerlaw.xmin > 0 and powerlaw.alpha > 1):
        reason = powerlaw.reason or "NaN fit"
        ax.text(0.02, 0.02, f"no power-law fit: {reason}", transform=ax.transAxes, fontsize=8, va="bottom",
                color="dimgray")
        return ""
    alpha, xmin = powerlaw.alpha, powerlaw.xmin
    xmax = powerlaw.xmax if _finite(powerlaw.xmax) and powerlaw.xmax > xmin else (
        float(x[-1]) if n and x[-1] > xmin else xmin * 10.0)
    tail = powerlaw.num_pl_spikes if powerlaw.num_pl_spikes > 0 else int(np.sum(x >= xmin))
    fraction = tail / n if n else 1.0
    grid = np.logspace(math.log10(xmin), math.log10(xmax), 200)
    grid[0], grid[-1] = xmin, xmax  # exact end points, free of logspace rounding
    pdf = fraction * (alpha - 1.0) / xmin * (grid / xmin) ** (-alpha)
    d_text = f", D={powerlaw.D:.3f}" if _finite(powerlaw.D) else ""
    pl_text = f"α={alpha:.2f}{d_text}"
    ax.plot(grid, pdf, "--", color="black", lw=1.8, label=f"power law {pl_text}", gid="powerlaw")
    ax.axvline(xmin, color="black", ls=":", lw=1.2, label=f"xmin={xmin:.3g}", gid="xmin")
    return pl_text


def _draw_marchenko_pastur(ax: Axes, x: np.ndarray, mp: MarchenkoPasturFit, Q: float | None) -> None:  # noqa: N803
    """The fitted MP density (not rescaled: median matching fits the whole spectrum), ``lambda_plus`` and the
    Tracy-Widom spike threshold."""
    q = Q if Q is not None else _mp_aspect_ratio(mp)
    if _finite(q, mp.sigma_mp, mp.lambda_minus, mp.lambda_plus) and q >= 1 and mp.sigma_mp > 0:
        start = mp.lambda_minus if mp.lambda_minus > 0 else (float(x[0]) if x.size else mp.lambda_plus * 1e-3)
        start = min(start, mp.lambda_plus)
        grid = np.logspace(math.log10(start), math.log10(mp.lambda_plus), 300)[1:-1]
        pdf = mp_pdf(grid, q, mp.sigma_mp**2)
        keep = pdf > 0
        if keep.any():
            ax.plot(grid[keep], pdf[keep], "-", color="navy", lw=1.5,
                    label=f"Marchenko-Pastur (σ={mp.sigma_mp:.3g}, Q={q:.2f})", gid="mp")
    if _finite(mp.lambda_plus) and mp.lambda_plus > 0:
        ax.axvline(mp.lambda_plus, color="navy", ls="-.", lw=1.2, label=f"λ+={mp.lambda_plus:.3g}", gid="lambda_plus")
    if _finite(mp.spike_threshold) and mp.spike_threshold > 0:
        ax.axvline(mp.spike_threshold, color="crimson", ls=":", lw=1.2,
                   label=f"spike threshold ({mp.num_spikes} spikes)", gid="spike_threshold")


def _finish_esd_axes(ax: Axes, x: np.ndarray, density_range: tuple[float, float], title: str | None, label: str,
                     pl_text: str) -> None:
    """Limits on the histogram (fitted curves fall to ~0 at the MP edges and the tail's end) with headroom above
    it for the legend; title (default: the phase and the power-law fit), axis labels and the legend."""
    if title is None:
        title = f"ESD: {label}" + (f"  ({pl_text})" if pl_text else "")
    if x.size:
        hist_min, hist_max = density_range
        bottom, top = math.log10(hist_min / 5.0), math.log10(hist_max * 2.0)
        ax.set_ylim(10.0**bottom, 10.0 ** (top + 0.6 * (top - bottom)))
        ax.set_xlim(float(x[0]) / 1.5, float(x[-1]) * 1.5)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("eigenvalue λ of $W^T W / N$")
    ax.set_ylabel("density")
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7, loc="upper right", title=f"phase: {label}", title_fontsize=8, framealpha=0.85)


def plot_phase_map(
    names: Sequence[str],
    steps: Sequence[int | str],
    phases: Sequence[Sequence[str | Phase | None]],
    *,
    title: str | None = None,
    xlabel: str = "analysis",
) -> Figure:
    """Phase of every matrix (rows) at every analysis (columns) as an image coloured with :data:`PHASE_COLORS`.

    Args:
        names: Matrix names, one per row (the row labels; the font shrinks for many rows).
        steps: Analysis labels (epochs, steps), one per column.
        phases: ``phases[i][j]`` is the phase name of matrix ``i`` at analysis ``j``; ``None``, ``""`` or NaN for
            unclassified (:class:`Phase` members are accepted too).
        title: Figure title.
        xlabel: Label of the column axis (what ``steps`` are: analyses, global steps, epochs).

    Returns:
        A new figure; its axes hold one RGB ``AxesImage`` with cell ``(i, j)`` at data coordinates ``(j, i)``.

    Raises:
        ValueError: When ``phases`` is not ``len(names) x len(steps)``.

    Example:
        >>> fig = plot_phase_map(["a", "b"], [0, 1], [["random_like", "heavy_tailed"], [None, "bulk_decay"]])
        >>> fig.axes[0].images[0].get_array().shape
        (2, 2, 3)
    """
    n_rows, n_cols = len(names), len(steps)
    if len(phases) != n_rows or any(len(row) != n_cols for row in phases):
        raise ValueError(f"phases must be {n_rows} rows (names) x {n_cols} columns (steps)")
    height = float(np.clip(1.6 + 0.2 * n_rows, 2.5, 16.0))
    width = float(np.clip(4.5 + 0.25 * n_cols + 0.05 * max((len(str(s)) for s in names), default=0), 6.0, 16.0))
    fig = _new_figure((width, height))
    ax = fig.add_subplot()
    if n_rows == 0 or n_cols == 0:
        ax.text(0.5, 0.5, "no analyses", transform=ax.transAxes, ha="center", va="center")
        ax.set_axis_off()
    else:
        image = np.array([[to_rgb(phase_color(p)) for p in row] for row in phases], dtype=np.float64)
        ax.imshow(image, aspect="auto", interpolation="nearest")
        fontsize = float(np.clip(0.7 * 72.0 * (height - 1.2) / n_rows, 3.0, 9.0))
        ax.set_yticks(range(n_rows), [str(s) for s in names], fontsize=fontsize)
        every = max(1, math.ceil(n_cols / 25))
        cols = list(range(0, n_cols, every))
        ax.set_xticks(cols, [str(steps[j]) for j in cols], fontsize=8, rotation=90 if n_cols > 12 else 0)
        ax.set_xlabel(xlabel)
        ax.tick_params(length=0)
    present = {phase_label(p) for row in phases for p in row}
    legend = [p.value for p in Phase] + ([UNCLASSIFIED] if UNCLASSIFIED in present else [])
    legend += sorted(present - set(PHASE_COLORS))  # unknown labels (drawn grey)
    fig.legend(handles=[Patch(facecolor=phase_color(p), label=p) for p in legend], loc="outside right upper",
               fontsize=8, title="phase", title_fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_metric_history(
    frame: pd.DataFrame,
    metric: str = "alpha",
    *,
    by: str = "epoch",
    title: str | None = None,
) -> Figure:
    """One line per matrix of ``metric`` over ``by``, plus the mean over matrices in bold.

    Rows with the same ``name`` and ``by`` value are averaged; NaN values are skipped (lines join the points
    around them, the mean is over the matrices with a value). When the frame has a ``phase`` column (history
    files), rows analyzed but too small to classify are drawn as grey crosses, not as lines, and stay out of the
    mean (:func:`~lightning_htsr.records.summarize`'s definition). For ``metric == "alpha"`` the band ``2 <= alpha <=
    6`` (the well-trained heavy-tailed range) is shaded.

    Args:
        frame: Long table with columns ``name``, ``by`` and ``metric`` (the callback's history file format).
        metric: Column to plot.
        by: Column for the x axis (``"epoch"``, ``"step"``, ...).
        title: Axes title; default: ``"<metric> by <by>"``.

    Returns:
        A new figure; its axes' lines are the matrices (in order of first appearance) then the mean
        (``gid="mean"``).

    Raises:
        ValueError: When a column is missing.

    Example:
        >>> import pandas as pd
        >>> df = pd.DataFrame({"name": ["a", "b", "a", "b"], "epoch": [0, 0, 1, 1], "alpha": [5.0, 4.0, 3.5, 3.0]})
        >>> len(plot_metric_history(df).axes[0].lines)
        3
    """
    missing = [c for c in ("name", by, metric) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame has no column(s) {missing}")
    data, small = _split_history_rows(frame, metric, by)
    names = list(dict.fromkeys(data["name"]))
    fig = _new_figure((7.5, 4.6))
    ax = fig.add_subplot()
    if metric == "alpha":
        ax.axhspan(2.0, 6.0, color="tab:green", alpha=0.12, lw=0, label="2 ≤ α ≤ 6")
    thin = len(names) > 12
    for name in names:
        series = data[data["name"] == name].groupby(by, sort=True)[metric].mean()
        ax.plot(series.index, series.to_numpy(), "-", marker="" if thin else ".", lw=0.8 if thin else 1.2,
                alpha=0.45 if thin else 0.85, label=None if thin else str(name), gid=f"name:{name}")
    if len(small):  # analyzed but too small to classify: raw values, no finding, not in the mean
        ax.plot(small[by], small[metric], "x", color="0.55", ms=4, gid="unclassified",
                label=f"too small to classify ({small['name'].nunique()}; not in the mean)")
    mean = data.groupby(by, sort=True)[metric].mean()
    with_values = data["name"].nunique()  # matrices never analyzed (skipped) draw no line and are not counted
    ax.plot(mean.index, mean.to_numpy(), "-", color="black", lw=2.8, label=f"mean over {with_values} matrices",
            gid="mean")
    ax.set(xlabel=by, ylabel=metric)
    ax.set_title(title if title is not None else f"{metric} by {by}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncols=2 if len(names) > 6 and not thin else 1)
    return fig


def _split_history_rows(frame: pd.DataFrame, metric: str, by: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(classified, too_small)``: the finite ``name, by, metric`` rows of classified matrices (lines and the mean)
    and those analyzed but too small to classify (grey crosses)."""
    from .records import is_classified

    data = frame[["name", by, metric]].copy()
    data[metric] = data[metric].astype(float)
    finite = np.isfinite(data[metric].to_numpy())
    classified = is_classified(frame).to_numpy() if "phase" in frame else np.ones(len(frame), dtype=bool)
    analyzed = (frame["status"] == "success").to_numpy() if "status" in frame else np.ones(len(frame), dtype=bool)
    return data[finite & classified], data[finite & analyzed & ~classified]


def figure_to_png(fig: Figure, *, dpi: float | None = None) -> bytes:
    """Render a figure to PNG bytes (Agg, no display needed).

    Args:
        fig: The figure.
        dpi: Resolution; default: the figure's own.

    Returns:
        The PNG file's bytes.

    Example:
        >>> figure_to_png(plot_phase_map(["a"], [0], [["random_like"]]))[:4]
        b'\\x89PNG'
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi if dpi is not None else "figure")
    return buffer.getvalue()


def figure_to_array(fig: Figure, *, dpi: float | None = None) -> np.ndarray:
    """Render a figure to an RGB image, e.g. for ``SummaryWriter.add_image(tag, img, dataformats="HWC")``.

    Args:
        fig: The figure.
        dpi: Resolution; default: the figure's own.

    Returns:
        A ``uint8`` array of shape ``(H, W, 3)``, row 0 at the top.
    """
    from PIL import Image  # a matplotlib dependency

    with Image.open(io.BytesIO(figure_to_png(fig, dpi=dpi))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
