"""Random-matrix reference laws: Marchenko-Pastur bulk, Tracy-Widom edge, and the MP fit of an ESD.

For ``W`` (``N x M``, ``N >= M``, ``Q = N / M``) with i.i.d. entries of variance ``sigma^2``, the eigenvalues of
``X = W^T W / N`` follow the Marchenko-Pastur law (Martin & Mahoney, JMLR 22(165), 2021, eq. 7; MP 1967)::

    rho(x) = Q / (2 pi sigma^2 x) * sqrt((lambda_+ - x)(x - lambda_-)),   lambda_+- = sigma^2 (1 +- 1/sqrt(Q))^2,

and the largest eigenvalue fluctuates around ``lambda_+`` on the Tracy-Widom scale (Johnstone, Ann. Stat. 29(2),
2001, rewritten for ``X``)::

    s_TW = sigma^2 N^(-2/3) (1 + Q^(-1/2)) (1 + Q^(1/2))^(1/3),   (lambda_max - lambda_+) / s_TW -> TW_1.

The MP scale is fitted robustly by median matching (``sigma^2 = median(lambda) / m_Q``, ``m_Q`` the median of
MP(Q, 1)); a handful of spikes barely moves a median, unlike weightwatcher's fit of the bulk maximum. Eigenvalues
above ``lambda_+ + q * s_TW`` are spikes, with ``q`` the TW_1 quantile for a family-wise false-spike rate ``p``
(1 % by default) over the ``num_slices`` independent edges of a pooled convolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from torch import Tensor

from .arrays import sorted_float64

__all__ = [
    "FALSE_SPIKE_RATE",
    "MarchenkoPasturFit",
    "fit_marchenko_pastur",
    "mp_cdf",
    "mp_median",
    "mp_pdf",
    "mp_support",
    "tracy_widom_quantile",
    "tracy_widom_scale",
    "tracy_widom_tail",
]

#: Default family-wise chance that a pure-noise matrix shows a spike (0.01 %): the one default of
#: :func:`fit_marchenko_pastur`, :class:`~lightning_htsr.spectra.phases.PhaseConfig` and so of every record.
FALSE_SPIKE_RATE = 0.0001

# 1 - F_1(s) of the Tracy-Widom (beta = 1) law on s = -1, -0.75, ..., 8, computed with Bornemann's Nystrom
# discretisation of det(I - K_1), K_1(x, y) = Ai((x + y) / 2) / 2 (Math. Comp. 79, 2010); tests/test_marchenko_
# pastur.py recomputes it with SciPy. Known quantiles it reproduces: 50 % -1.2686, 95 % 0.9793, 99 % 2.0234.
_TW1_S0, _TW1_STEP = -1.0, 0.25
_TW1_TAIL = (
    0.41621, 0.342894, 0.276309, 0.217838, 0.168092, 0.127012, 0.0940288, 0.0682408, 0.0485788, 0.0339404,
    0.0232864, 0.0156976, 0.0104024, 0.00677984, 0.00434798, 0.00274489, 0.00170652, 0.00104523, 0.000630927,
    0.00037546, 0.000220344, 0.000127563, 7.28711e-05, 4.10874e-05, 2.28715e-05, 1.25724e-05, 6.82621e-06,
    3.66161e-06, 1.94081e-06, 1.01672e-06, 5.26513e-07, 2.69576e-07, 1.36488e-07, 6.83473e-08, 3.38555e-08,
    1.65914e-08, 8.04542e-09,
)


def tracy_widom_tail(s: float) -> float:
    """``P(TW_1 > s)`` for ``-1 <= s <= 8`` (log-linear interpolation of a computed table).

    Example:
        >>> round(tracy_widom_tail(2.0234), 4)
        0.01
    """
    grid = _TW1_S0 + _TW1_STEP * np.arange(len(_TW1_TAIL))
    return float(np.exp(np.interp(s, grid, np.log(_TW1_TAIL))))


def tracy_widom_quantile(p_exceed: float) -> float:
    """The ``s`` with ``P(TW_1 > s) = p_exceed``, for ``8e-9 <= p_exceed <= 0.4``.

    Example:
        >>> round(tracy_widom_quantile(0.05), 2), round(tracy_widom_quantile(0.01), 2)
        (0.98, 2.02)
    """
    logs = np.log(_TW1_TAIL)[::-1]  # increasing
    grid = (_TW1_S0 + _TW1_STEP * np.arange(len(_TW1_TAIL)))[::-1]
    clipped = min(max(p_exceed, _TW1_TAIL[-1]), _TW1_TAIL[0])
    return float(np.interp(math.log(clipped), logs, grid))


def mp_support(Q: float, sigma2: float = 1.0) -> tuple[float, float]:
    """``(lambda_-, lambda_+)`` of the Marchenko-Pastur law with aspect ratio ``Q >= 1`` and scale ``sigma2``."""
    r = 1.0 / math.sqrt(Q)
    return sigma2 * (1.0 - r) ** 2, sigma2 * (1.0 + r) ** 2


def mp_pdf(x: np.ndarray | float, Q: float, sigma2: float = 1.0) -> np.ndarray:
    """Marchenko-Pastur density of the eigenvalues of ``W^T W / N`` (zero outside the support)."""
    lo, hi = mp_support(Q, sigma2)
    x = np.asarray(x, dtype=np.float64)
    inside = (x > lo) & (x < hi) & (x > 0)
    out = np.zeros_like(x)
    xi = x[inside]
    out[inside] = Q / (2.0 * math.pi * sigma2 * xi) * np.sqrt((hi - xi) * (xi - lo))
    return out


@lru_cache(maxsize=256)
def _mp_cdf_table(Q: float, points: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """CDF of MP(Q, 1) on a grid in ``theta``, where ``x = a + (b - a)(1 - cos theta) / 2``.

    The substitution turns ``rho(x) dx`` into ``Q (b - a)^2 sin^2(theta) / (8 pi x) d theta``, smooth on
    ``[0, pi]`` (the square-root edges disappear), so a midpoint rule is accurate to ~1e-7.
    """
    a, b = mp_support(Q)
    h = math.pi / points
    theta = (np.arange(points) + 0.5) * h
    c = np.cos(theta)
    x = a + (b - a) * (1.0 - c) / 2.0
    density = Q * (b - a) ** 2 * (1.0 - c) * (1.0 + c) / (8.0 * math.pi * x)
    cdf = np.concatenate([[0.0], np.cumsum(density) * h])
    cdf /= cdf[-1]  # removes the O(h^2) quadrature bias at the end point
    edges = np.linspace(0.0, math.pi, points + 1)
    return edges, cdf


def mp_cdf(x: np.ndarray | float, Q: float, sigma2: float = 1.0) -> np.ndarray:
    """Marchenko-Pastur CDF (``Q >= 1``).

    Example:
        >>> float(mp_cdf(0.0, 4.0)), float(mp_cdf(100.0, 4.0))
        (0.0, 1.0)
    """
    a, b = mp_support(Q, sigma2)
    x = np.asarray(x, dtype=np.float64)
    u = np.clip((x - a) / (b - a), 0.0, 1.0)
    theta = np.arccos(1.0 - 2.0 * u)
    edges, cdf = _mp_cdf_table(round(float(Q), 6))
    return np.interp(theta, edges, cdf)


@lru_cache(maxsize=256)
def mp_median(Q: float) -> float:
    """Median of MP(Q, sigma^2 = 1).

    Example:
        >>> round(mp_median(1.0), 4)  # the square case
        0.6528
    """
    edges, cdf = _mp_cdf_table(round(float(Q), 6))
    theta = float(np.interp(0.5, cdf, edges))
    a, b = mp_support(Q)
    return a + (b - a) * (1.0 - math.cos(theta)) / 2.0


def tracy_widom_scale(N: int, Q: float, sigma2: float = 1.0) -> float:
    """Johnstone's scale of the largest-eigenvalue fluctuations of ``W^T W / N`` (see the module docstring)."""
    return sigma2 * N ** (-2.0 / 3.0) * (1.0 + Q**-0.5) * (1.0 + Q**0.5) ** (1.0 / 3.0)


@dataclass(frozen=True)
class MarchenkoPasturFit:
    """Marchenko-Pastur fit of an ESD and the spike statistics derived from it.

    Attributes:
        sigma_mp: Fitted MP scale ``sigma`` (the entry standard deviation of a random matrix with this bulk).
        lambda_minus: Lower bulk edge.
        lambda_plus: Upper bulk edge ``sigma^2 (1 + 1/sqrt(Q))^2``.
        tw_scale: Tracy-Widom width ``s_TW`` at the edge.
        spike_threshold: ``lambda_plus + q * tw_scale``; larger eigenvalues are spikes.
        num_spikes: Number of eigenvalues above the threshold.
        spike_gap_tw: Distance of the *smallest* spike above ``lambda_plus`` in TW widths (NaN without spikes).
        max_gap_tw: Distance of ``lambda_max`` above ``lambda_plus`` in TW widths (negative inside the bulk).
        ks_mp: KS distance between the bulk (eigenvalues up to the threshold) and MP truncated there.
        tail_mass: Share of the trace carried by the spikes.
        mp_softrank: ``lambda_plus / lambda_max`` (about 1 for random matrices, to 0 for heavy tails).
    """

    sigma_mp: float
    lambda_minus: float
    lambda_plus: float
    tw_scale: float
    spike_threshold: float
    num_spikes: int
    spike_gap_tw: float
    max_gap_tw: float
    ks_mp: float
    tail_mass: float
    mp_softrank: float

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a plain ``dict``."""
        return asdict(self)

    @staticmethod
    def undefined() -> MarchenkoPasturFit:
        """All-NaN fit for spectra too small or degenerate to fit."""
        nan = math.nan
        return MarchenkoPasturFit(nan, nan, nan, nan, nan, 0, nan, nan, nan, nan, nan)


def _ks_to_mp(bulk: np.ndarray, Q: float, sigma2: float, threshold: float) -> float:
    """KS distance between the sorted bulk and the MP law truncated at ``threshold`` (NaN for an empty bulk)."""
    if not bulk.size:
        return math.nan
    model = mp_cdf(bulk, Q, sigma2) / float(mp_cdf(threshold, Q, sigma2))
    n = bulk.size
    steps = np.arange(1, n + 1) / n
    return float(max(np.max(np.abs(model - steps)), np.max(np.abs(model - (steps - 1.0 / n)))))


def fit_marchenko_pastur(
    eigenvalues: Tensor | np.ndarray,
    N: int,
    M: int,
    *,
    num_slices: int = 1,
    false_spike_rate: float = FALSE_SPIKE_RATE,
    zero_tol: float = 0.0,
) -> MarchenkoPasturFit:
    """Fit the MP bulk by median matching and count Tracy-Widom-significant spikes.

    Args:
        eigenvalues: The ESD (any order, any scale convention; results come back in the same units).
        N: Larger side of one slice.
        M: Smaller side of one slice (``Q = N / M``).
        num_slices: Number of pooled slices (their edges are independent chances of a false spike).
        false_spike_rate: Probability that a pure-noise matrix shows one or more spikes (family-wise over
            the slices); sets the TW quantile of the threshold (4.36 widths for one slice at the default 0.01 %,
            the rate the records and :class:`~lightning_htsr.spectra.phases.PhaseConfig` use).
        zero_tol: Eigenvalues ``<= zero_tol`` are numerical zeros and are left out of the fit.

    Returns:
        A :class:`MarchenkoPasturFit` (all NaN when fewer than 4 non-zero eigenvalues remain).

    Example:
        >>> import torch
        >>> w = torch.randn(2000, 500, generator=torch.Generator().manual_seed(0))
        >>> ev = torch.linalg.eigvalsh(w.T @ w / 2000)
        >>> fit = fit_marchenko_pastur(ev, 2000, 500)
        >>> round(fit.sigma_mp, 2), fit.num_spikes
        (1.0, 0)
    """
    x = sorted_float64(eigenvalues).cpu().numpy()
    x = x[np.isfinite(x) & (x > zero_tol)]
    if x.size < 4 or N < 1 or M < 1:
        return MarchenkoPasturFit.undefined()
    Q = max(N / M, 1.0)
    sigma2 = float(np.median(x)) / mp_median(Q)
    lo, hi = mp_support(Q, sigma2)
    s_tw = tracy_widom_scale(N, Q, sigma2)
    per_slice = 1.0 - (1.0 - false_spike_rate) ** (1.0 / max(num_slices, 1))
    threshold = hi + tracy_widom_quantile(per_slice) * s_tw
    spikes = x[x > threshold]
    bulk = x[x <= threshold]
    lam_max = float(x[-1])
    return MarchenkoPasturFit(
        sigma_mp=math.sqrt(sigma2),
        lambda_minus=lo,
        lambda_plus=hi,
        tw_scale=s_tw,
        spike_threshold=threshold,
        num_spikes=int(spikes.size),
        spike_gap_tw=float((spikes[0] - hi) / s_tw) if spikes.size else math.nan,
        max_gap_tw=(lam_max - hi) / s_tw,
        ks_mp=_ks_to_mp(bulk, Q, sigma2, threshold),
        tail_mass=float(spikes.sum() / x.sum()),
        mp_softrank=hi / lam_max,
    )
