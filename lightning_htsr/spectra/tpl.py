"""weightwatcher's truncated power-law fits (``fit="TPL"`` and ``"E_TPL"``) through the ``powerlaw`` package.

The density ``rho(lambda) ~ lambda^-alpha exp(-Lambda lambda)`` for ``lambda >= xmin`` is fitted by
``powerlaw.Fit(..., xmin_distribution="truncated_power_law")`` (Alstott, Bullmore & Plenz 2014): ``xmin`` minimises
the KS distance of the truncated law, and ``alpha``, ``Lambda`` are its maximum-likelihood parameters, as
weightwatcher 0.7.7 does with ``fit="TPL", pl_package="powerlaw"``. Its columns: ``alpha`` and ``Lambda`` of the
truncated law, ``xmin``, ``D`` and ``sigma`` of the ``Fit`` object, ``num_pl_spikes`` the eigenvalues ``>= xmin``.

``"E_TPL"`` (weightwatcher's "extended" TPL) restricts ``xmin`` to a range around the peak of the log-ESD
(weightwatcher's ``fix_fingers="xmin_peak"``): ``(log10(0.95 peak), 1.5 peak)``, the lower end written as 0.7.7
writes it (a ``log10`` of an eigenvalue used as an eigenvalue), so that the same ``xmin`` is chosen.

Notes:
    * ``powerlaw`` is an optional dependency: ``pip install -e '.[tpl]'``.
    * weightwatcher 0.7.7 passes ``distribution=`` to ``powerlaw.Fit``, which ``powerlaw`` 2.0 no longer accepts:
      with 2.0 its TPL fits fail for every layer (``alpha = -1``). This module calls ``Fit`` as 0.7.7 intends.
    * The fit is slow (a numerical optimisation per candidate ``xmin``: ~10 s for 100 eigenvalues): meant for
      offline analysis, not for the training callback.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import Any

import numpy as np
from torch import Tensor

from .arrays import sorted_float64
from .powerlaw import PowerLawFit

__all__ = ["TPL_FITS", "fit_truncated_power_law", "require_powerlaw"]

#: The ``fit=`` values served here.
TPL_FITS = ("TPL", "E_TPL")

_MISSING = "fit='{fit}' needs the powerlaw package: pip install -e '.[tpl]'"


def require_powerlaw(fit: str) -> None:
    """Raise ``ImportError`` (with the install hint) if the ``powerlaw`` package is missing."""
    try:
        import powerlaw  # noqa: F401
    except ImportError as err:
        raise ImportError(_MISSING.format(fit=fit)) from err


def _peak_range(nz: np.ndarray) -> tuple[float, float]:
    """weightwatcher's ``xmin_peak`` range: the peak of a 100-bin histogram of ``log10`` eigenvalues."""
    counts, edges = np.histogram(np.log10(nz), bins=100)
    peak = 10 ** edges[int(np.argmax(counts))]
    return float(np.log10(0.95 * peak)), 1.5 * peak


def fit_truncated_power_law(eigenvalues: Tensor | np.ndarray, *, extended: bool = False,
                            zero_tol: float = 1e-5) -> tuple[PowerLawFit, dict[str, float]]:
    """Truncated power-law fit of an ESD tail, as weightwatcher 0.7.7 (``fit="TPL"`` or ``"E_TPL"``).

    Args:
        eigenvalues: The ESD (any order).
        extended: ``"E_TPL"``: ``xmin`` searched only near the peak of the log-ESD.
        zero_tol: Eigenvalues ``<= zero_tol`` are left out of the fit (weightwatcher: 1e-5).

    Returns:
        The fit (``alpha`` of the truncated law; ``status="failed"`` with the reason instead of raising) and the
        extra column ``{"Lambda": ...}``.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).pareto(1.5, 60) + 1.0
        >>> fit, extra = fit_truncated_power_law(x)  # doctest: +SKIP
        >>> fit.status, extra["Lambda"] >= 0  # doctest: +SKIP
        ('success', True)
    """
    x = sorted_float64(eigenvalues).cpu().numpy()
    nz = x[x > zero_tol]
    nan = {"Lambda": math.nan}
    if nz.size < 2:
        return PowerLawFit.failed(f"{nz.size} eigenvalue(s) above {zero_tol:.3g}", int(nz.size)), nan
    try:
        import powerlaw
    except ImportError:
        return PowerLawFit.failed(_MISSING.format(fit="E_TPL" if extended else "TPL"), int(nz.size)), nan
    xmin: Any = _peak_range(nz) if extended else None
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            fit = powerlaw.Fit(nz, xmin=xmin, xmax=None, verbose=False, xmin_distribution="truncated_power_law")
            tpl = fit.truncated_power_law
            alpha, lam, fit_xmin, d, sigma = (float(v) for v in (tpl.alpha, tpl.Lambda, fit.xmin, fit.D, fit.sigma))
    except Exception as err:  # noqa: BLE001 - the package's numerical failures become a failed fit, as in weightwatcher
        return PowerLawFit.failed(f"powerlaw.Fit: {type(err).__name__}: {err}", int(nz.size)), nan
    if not math.isfinite(alpha):
        return PowerLawFit.failed("powerlaw.Fit: truncated power law without a finite alpha", int(nz.size)), nan
    result = PowerLawFit(alpha=alpha, xmin=fit_xmin, xmax=float(x[-1]), D=d, sigma=sigma,
                         num_pl_spikes=int(np.count_nonzero(x >= fit_xmin)), num_evals=int(nz.size),
                         status="success")
    return result, {"Lambda": lam}
