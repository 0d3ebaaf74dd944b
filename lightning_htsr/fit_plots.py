"""The power-law fit's diagnostic figure: can a reader trust this matrix's alpha?

:func:`plot_fit_diagnostics` draws, for one matrix, the panels weightwatcher's ``analyze(plot=True)`` shows:

* top row: the ESD on log-log axes (:func:`~lightning_htsr.plotting.plot_esd`), on lin-lin axes and on log-lin
  axes (the density of ``log10 lambda``), each with the Marchenko-Pastur bulk of the fitted scale, the chosen
  ``xmin`` and ``lambda_max``;
* bottom row: the KS distance ``D(xmin)`` and the exponent ``alpha(xmin)`` over the fit's candidates
  (:func:`~lightning_htsr.spectra.powerlaw.fit_scan`, the fit's own per-candidate numbers), the chosen ``xmin`` marked.

A clean power law has a D curve with one clear minimum and an alpha curve flat around it; a few "fingers" (large
outliers) show as an alpha that jumps near the largest candidates; a random-like matrix has no tail beyond the
MP edge and a D curve without a clear minimum. Like :mod:`~lightning_htsr.plotting`, no ``pyplot``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .plotting import _finite, _mp_aspect_ratio, _new_figure, _positive, phase_color, phase_label, plot_esd
from .spectra.marchenko_pastur import MarchenkoPasturFit, mp_pdf
from .spectra.phases import Phase, PhaseResult
from .spectra.powerlaw import FitScan

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from torch import Tensor

__all__ = ["plot_fit_diagnostics"]

_XMIN_COLOR = "red"  # as weightwatcher marks lambda_xmin
_XMAX_COLOR = "orange"


def plot_fit_diagnostics(
    eigenvalues: Tensor | np.ndarray | Sequence[float],
    scan: FitScan,
    *,
    mp: MarchenkoPasturFit | None = None,
    phase: Phase | PhaseResult | str | None = None,
    title: str | None = None,
    Q: float | None = None,
) -> Figure:
    """One figure of five panels checking a matrix's power-law fit (see the module docstring).

    Args:
        eigenvalues: The ESD (any order; non-positive values are left out of the histograms).
        scan: :func:`~lightning_htsr.spectra.powerlaw.fit_scan` of these eigenvalues with the analysis' fit settings;
            its ``fit`` is the one drawn and marked.
        mp: Marchenko-Pastur fit (default: ``phase.mp`` when ``phase`` is a :class:`PhaseResult`).
        phase: The phase, for the colour and the title.
        title: Figure title (default: the phase, alpha, D and xmin).
        Q: Aspect ratio ``N / M`` of the MP density (default: from the fitted bulk edges).

    Returns:
        The figure; its axes carry ``gid``-tagged artists (``"xmin"``, ``"D_curve"``, ``"alpha_curve"``, ``"mp"``).

    Example:
        >>> import torch
        >>> from lightning_htsr.spectra.powerlaw import fit_scan
        >>> x = torch.distributions.Pareto(1.0, 1.5).sample((800,)).double()
        >>> fig = plot_fit_diagnostics(x, fit_scan(x))
        >>> [ax.get_title(loc="left").split(":")[0] for ax in fig.axes]
        ['log-log ESD', 'lin-lin ESD', 'log-lin ESD', 'D(xmin)', 'alpha(xmin)']
    """
    if isinstance(phase, PhaseResult) and mp is None:
        mp = phase.mp
    fit = scan.fit
    x = _positive(eigenvalues)
    color = phase_color(phase)
    fig: Any = _new_figure((15.0, 8.0))
    grid = fig.add_gridspec(2, 6)
    loglog = fig.add_subplot(grid[0, 0:2])
    plot_esd(x, powerlaw=fit, mp=mp, phase=phase, title="", ax=loglog, Q=Q)
    loglog.set_title("log-log ESD: fitted power law", loc="left", fontsize=9)
    q = Q if Q is not None else (_mp_aspect_ratio(mp) if mp is not None else math.nan)
    _lin_lin(fig.add_subplot(grid[0, 2:4]), x, fit.xmin, mp, q, color)
    _log_lin(fig.add_subplot(grid[0, 4:6]), x, fit.xmin, mp, q, color)
    _scan_panel(fig.add_subplot(grid[1, 0:3]), scan, scan.Ds, "D", "KS distance $D$", "D_curve")
    _scan_panel(fig.add_subplot(grid[1, 3:6]), scan, scan.alphas, "alpha", r"exponent $\alpha$", "alpha_curve")
    if title is None:
        title = f"power-law fit diagnostics: {phase_label(phase)}"
    if fit.ok:
        title += f"  (α={fit.alpha:.3f}, D={fit.D:.4f}, xmin={fit.xmin:.4g}, tail of {fit.num_pl_spikes})"
    else:
        title += f"  (no power-law fit: {fit.reason})"
    fig.suptitle(title, fontsize=11)
    return fig  # type: ignore[no-any-return]


def _mark_xmin(ax: Axes, xmin: float, *, log10: bool = False) -> None:
    if _finite(xmin) and xmin > 0:
        ax.axvline(math.log10(xmin) if log10 else xmin, color=_XMIN_COLOR, lw=1.2,
                   label=f"xmin={xmin:.4g}", gid="xmin")


def _mp_curve(ax: Axes, mp: MarchenkoPasturFit | None, q: float, *, log10: bool) -> None:
    """The MP density of the fitted scale; on log-lin axes the density of ``log10 lambda``, ``pdf * lambda ln 10``."""
    if mp is None or not (_finite(q, mp.sigma_mp, mp.lambda_minus, mp.lambda_plus) and q >= 1 and mp.sigma_mp > 0):
        return
    lo = max(mp.lambda_minus, mp.lambda_plus * 1e-4)
    grid = np.geomspace(lo, mp.lambda_plus, 400)[1:-1] if log10 else np.linspace(lo, mp.lambda_plus, 400)[1:-1]
    pdf = mp_pdf(grid, q, mp.sigma_mp**2)
    if log10:
        grid, pdf = np.log10(grid), pdf * grid * math.log(10.0)
    ax.plot(grid, pdf, color="navy", lw=1.5, label=f"Marchenko-Pastur (σ={mp.sigma_mp:.3g})", gid="mp")


def _lin_lin(ax: Axes, x: np.ndarray, xmin: float, mp: MarchenkoPasturFit | None, q: float, color: str) -> None:
    ax.set_title("lin-lin ESD: bulk and MP", loc="left", fontsize=9)
    if x.size:
        ax.hist(x, bins=100, density=True, color=color, alpha=0.55, edgecolor="none", label="ESD")
    _mp_curve(ax, mp, q, log10=False)
    _mark_xmin(ax, xmin)
    if x.size:
        ax.axvline(float(x[-1]), color=_XMAX_COLOR, lw=1.2, label=f"λmax={x[-1]:.4g}", gid="xmax")
    ax.set(xlabel="λ", ylabel="density")
    ax.legend(fontsize=7, loc="upper right")


def _log_lin(ax: Axes, x: np.ndarray, xmin: float, mp: MarchenkoPasturFit | None, q: float, color: str) -> None:
    ax.set_title("log-lin ESD: density of log10 λ", loc="left", fontsize=9)
    if x.size:
        ax.hist(np.log10(x), bins=100, density=True, color=color, alpha=0.55, edgecolor="none", label="ESD")
    _mp_curve(ax, mp, q, log10=True)
    _mark_xmin(ax, xmin, log10=True)
    if x.size:
        ax.axvline(math.log10(float(x[-1])), color=_XMAX_COLOR, lw=1.2, label="λmax", gid="xmax")
    ax.set(xlabel="log10 λ", ylabel="density")
    ax.legend(fontsize=7, loc="upper left")


def _scan_panel(ax: Axes, scan: FitScan, values: np.ndarray, what: str, ylabel: str, gid: str) -> None:
    """``values`` over the candidate ``xmin`` (log x axis), the chosen one marked with a dot and a line."""
    fit = scan.fit
    ax.set_title(f"{what}(xmin): {scan.xmins.size} candidates", loc="left", fontsize=9)
    ax.set_xscale("log")
    if scan.xmins.size:
        ax.plot(scan.xmins, values, color="tab:blue", lw=1.2, label=f"{what}(xmin)", gid=gid)
    if scan.chosen >= 0:
        v = float(values[scan.chosen])
        ax.plot([scan.xmins[scan.chosen]], [v], "o", color=_XMIN_COLOR, ms=6, gid=f"{gid}_chosen",
                label=f"chosen: {what}={v:.4g}")
        _mark_xmin(ax, fit.xmin)
        if what == "alpha":
            _alpha_limits(ax, values, v)
    ax.set(xlabel="xmin (candidate start of the tail)", ylabel=ylabel)
    if scan.xmins.size:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no candidates", transform=ax.transAxes, ha="center", va="center")


def _alpha_limits(ax: Axes, alphas: np.ndarray, chosen: float) -> None:
    """alpha(xmin) explodes for the last few tiny tails: keep the chosen value's neighbourhood readable."""
    finite = alphas[np.isfinite(alphas)]
    if not finite.size or not math.isfinite(chosen):
        return
    top = min(float(finite.max()), max(2.0 * chosen, float(np.quantile(finite, 0.9))))
    bottom = max(float(finite.min()), 0.0)
    if top > bottom:
        ax.set_ylim(bottom - 0.05 * (top - bottom), top + 0.05 * (top - bottom))
