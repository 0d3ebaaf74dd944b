"""The tail fit of one spectrum under the analysis options: stage 3 as :func:`~lightning_htsr.front_doors.analyze`
runs it, with weightwatcher's options.

sorted eigenvalues --(``xmax``: top ``k`` left out, or a tail cap)--> the power-law search
(:func:`~lightning_htsr.spectra.powerlaw.fit_power_law`, with ``fix_fingers``: :mod:`~lightning_htsr.spectra.fingers`)
or a truncated power law (``fit="TPL"``/``"E_TPL"``: :mod:`~lightning_htsr.spectra.tpl`) --> the fit, its extra columns
and the :func:`~lightning_htsr.spectra.powerlaw.fit_scan` settings that reproduce it (for the fit-diagnostics figures).
:func:`check_fit_options` is where :class:`~lightning_htsr.analysis.AnalysisOptions` checks these options.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .eigenvalues import check_choice
from .fingers import FIX_FINGERS, fit_fix_fingers, removed_by_clip
from .powerlaw import PowerLawFit, fit_power_law
from .tpl import TPL_FITS, fit_truncated_power_law, require_powerlaw

if TYPE_CHECKING:
    from ..analysis import AnalysisOptions

__all__ = ["check_fit_options", "fit_tail"]


def check_fit_options(options: AnalysisOptions) -> None:
    """``xmax``, ``fix_fingers``, the finger thresholds and ``TPL`` as weightwatcher 0.7.7 accepts them."""
    if options.fix_fingers is not None:
        check_choice("fix_fingers", options.fix_fingers, (*FIX_FINGERS, None))
    xmax = options.xmax
    if xmax is not None:
        if isinstance(xmax, bool) or not isinstance(xmax, (int, float)):
            raise ValueError(f"xmax must be an int (top eigenvalues to leave out), a float (tail cap) or None, "
                             f"got {xmax!r}")
        if isinstance(xmax, int) and xmax == 0:
            raise ValueError("xmax can not be 0 (weightwatcher: None for the whole spectrum)")
        if isinstance(xmax, float) and not (math.isfinite(xmax) and xmax > 0):
            raise ValueError(f"xmax as a tail cap must be a positive number, got {xmax!r}")
        if isinstance(xmax, int) and options.fix_fingers is not None:
            raise ValueError(f"fix_fingers={options.fix_fingers!r} can not be combined with xmax={xmax} "
                             "(weightwatcher 0.7.7 refuses it too)")
    if options.max_fingers is not None and options.max_fingers < 1:
        raise ValueError(f"max_fingers must be >= 1, got {options.max_fingers}")
    if options.fit == "E_TPL" and options.fix_fingers == "clip_xmax":
        raise ValueError("fit='E_TPL' and fix_fingers='clip_xmax' can not both be set (weightwatcher 0.7.7)")
    if options.fit in TPL_FITS:
        require_powerlaw(options.fit)


def _xmax_drop(ev: Tensor, xmax: int | float | None) -> int | str:  # noqa: PYI041
    """How many of the largest (sorted) eigenvalues ``xmax`` leaves out of the fit, or why the fit fails."""
    if xmax is None:
        return 0
    if isinstance(xmax, int):
        k = abs(xmax)
        if k > ev.numel() / 2:  # weightwatcher: "xmax is too large, stopping"
            return f"xmax={xmax} leaves out more than half of the {ev.numel()} eigenvalues"
        return k
    return int(torch.count_nonzero(ev > xmax))


def _count_capped(fit: PowerLawFit, ev: Tensor, xmax: int | float | None) -> PowerLawFit:  # noqa: PYI041
    """Under a tail cap (``float`` ``xmax``) ``num_pl_spikes`` counts every eigenvalue ``>= xmin``, those above the
    cap included, as weightwatcher counts a capped fit (its ``evals[evals >= fit.xmin]``)."""
    if not isinstance(xmax, float) or not fit.ok:
        return fit
    return replace(fit, num_pl_spikes=int(torch.count_nonzero(ev >= fit.xmin)))


def fit_tail(ev: Tensor, options: AnalysisOptions,
             floor: float) -> tuple[PowerLawFit, dict[str, Any], dict[str, Any] | None]:
    """The tail fit of a sorted spectrum under the options.

    Args:
        ev: The eigenvalues, sorted ascending (float64).
        options: The analysis options (``fit``, ``min_tail``, ``ks``, ``fit_zero_tol``, ``xmax``, ``fix_fingers``
            and its thresholds).
        floor: The spectrum's resolution floor (the zero tolerance when ``fit_zero_tol`` is ``None``).

    Returns:
        The fit (failed, with the reason, instead of raising), its extra columns (``num_fingers``/``raw_alpha``,
        ``Lambda``) and the :func:`~lightning_htsr.spectra.powerlaw.fit_scan` settings that reproduce it (``None`` where
        there is no power-law search: truncated fits, ``xmin_peak``).
    """
    fit_tol = options.fit_zero_tol if options.fit_zero_tol is not None else floor
    drop = _xmax_drop(ev, options.xmax)
    if isinstance(drop, str):
        lam = {"Lambda": math.nan} if options.fit in TPL_FITS else {}
        return PowerLawFit.failed(drop, int(ev.numel()), float(ev[-1])), lam, None
    kept = ev[: ev.numel() - drop]
    if options.fit in TPL_FITS:
        fit, extra = fit_truncated_power_law(kept, extended=options.fit == "E_TPL", zero_tol=fit_tol)
        return fit, extra, None
    settings: dict[str, Any] = {"method": options.fit, "min_tail": options.min_tail, "ks": options.ks,
                                "zero_tol": fit_tol}
    fit = partial(fit_power_law, **settings)
    if not options.fix_fingers:
        return _count_capped(fit(kept), ev, options.xmax), {}, {**settings, "drop_top": drop}
    powerlaw, extra = fit_fix_fingers(kept, fit, options.fix_fingers, max_fingers=options.max_fingers,
                                      finger_thresh=options.finger_thresh)
    if options.fix_fingers != "clip_xmax":
        return powerlaw, extra, None
    return powerlaw, extra, {**settings, "drop_top": drop + removed_by_clip(int(extra.get("num_fingers", 0)))}
