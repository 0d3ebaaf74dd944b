"""Synthetic weight matrices with known spectral phase: for tests, docs and your own calibration.

All generators return an ``N x M`` float32 tensor (``N >= M``) whose entries are on the scale of a
``1 / sqrt(N)``-normalized random matrix (so ``W^T W`` has an MP bulk near ``[lambda_-, lambda_+]`` of
``sigma^2 = 1 / N``... up to the overall scale, which no HT-SR shape metric depends on). Signals follow the spiked
model (Baik, Ben Arous & Peche 2005; Martin & Mahoney 2021 sec. 3): with ``X = W^T W / N`` and
``W = G + sqrt(N) sum_i theta_i u_i v_i^T``, a rank-one signal leaves the bulk only if ``theta > Q^(-1/4)`` (the
BBP threshold) and then sits at ``(1 + theta^2)(1 + 1 / (Q theta^2))``. Strengths below are given relative to that
threshold, which makes every generator behave the same at any size.

:func:`phase_example` draws a matrix for a named phase with randomized settings inside that phase's regime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .marchenko_pastur import tracy_widom_scale
from .phases import Phase

__all__ = [
    "bbp_threshold",
    "correlated_heavy_tailed",
    "gaussian",
    "graded_signals",
    "low_rank",
    "pareto",
    "phase_example",
    "spike_location",
    "spike_strength",
    "spiked",
]


def _gen(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(0 if seed is None else seed)


def bbp_threshold(Q: float) -> float:
    """Signal strength ``theta_c = Q^(-1/4)`` above which a rank-one signal leaves the MP bulk."""
    return Q**-0.25


def spike_location(theta: float, Q: float) -> float:
    """Eigenvalue of ``W^T W / N`` (unit-variance noise) produced by a signal of strength ``theta``.

    Example:
        >>> Q = 4.0
        >>> round(spike_location(bbp_threshold(Q), Q), 6) == round((1 + Q ** -0.5) ** 2, 6)  # at the edge
        True
    """
    if theta <= bbp_threshold(Q):
        return (1.0 + Q**-0.5) ** 2
    return (1.0 + theta**2) * (1.0 + 1.0 / (Q * theta**2))


def spike_strength(eigenvalue: float, Q: float, sigma2: float = 1.0) -> float:
    """Inverse of :func:`spike_location`: the ``theta / theta_c`` that puts a spike at ``eigenvalue``.

    Returns 1.0 at or inside the bulk edge (no detectable signal).

    Example:
        >>> round(spike_strength(spike_location(2.0 * bbp_threshold(3.0), 3.0), 3.0), 6)
        2.0
    """
    ell = eigenvalue / sigma2
    c = ell - 1.0 - 1.0 / Q
    disc = Q * Q * c * c - 4.0 * Q
    if c <= 0 or disc <= 0:
        return 1.0
    t = (Q * c + math.sqrt(disc)) / (2.0 * Q)
    return math.sqrt(t) * Q**0.25


def gaussian(N: int, M: int, *, seed: int | torch.Generator | None = 0) -> Tensor:
    """I.i.d. ``N(0, 1/N)`` entries: the random-like phase."""
    return torch.randn(N, M, generator=_gen(seed)) / math.sqrt(N)


def pareto(N: int, M: int, mu: float, *, seed: int | torch.Generator | None = 0) -> Tensor:
    """Signed Pareto entries with tail exponent ``mu`` (``P(|w| > x) ~ x^-mu``).

    For ``mu < 2`` the ESD has a power-law tail with ``alpha = mu / 2 + 1`` (Martin & Mahoney 2021, Table 1).
    """
    g = _gen(seed)
    u = torch.rand(N, M, generator=g, dtype=torch.float64).clamp_(min=1e-300)
    sign = torch.randint(0, 2, (N, M), generator=g, dtype=torch.float64) * 2.0 - 1.0
    return (u ** (-1.0 / mu) * sign / math.sqrt(N)).float()


def spiked(
    N: int, M: int, strengths: Sequence[float], *, seed: int | torch.Generator | None = 0
) -> Tensor:
    """Gaussian noise plus rank-one signals ``sqrt(N) theta_i u_i v_i^T`` (orthonormal ``u_i``, ``v_i``).

    Args:
        N: Rows (``N >= M``).
        M: Columns.
        strengths: ``theta_i / theta_c`` for each signal (1.0 is the BBP threshold).
        seed: Seed or generator.
    """
    g = _gen(seed)
    Q = N / M
    k = len(strengths)
    noise = torch.randn(N, M, generator=g, dtype=torch.float64)
    if k:
        u, _ = torch.linalg.qr(torch.randn(N, k, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(M, k, generator=g, dtype=torch.float64))
        theta = torch.tensor([s * bbp_threshold(Q) for s in strengths], dtype=torch.float64)
        noise = noise + math.sqrt(N) * (u * theta) @ v.T
    return (noise / math.sqrt(N)).float()


def graded_signals(
    N: int, M: int, count: int, *, low: float = 0.5, high: float = 3.0, seed: int | torch.Generator | None = 0
) -> Tensor:
    """Many signals with strengths spread evenly from ``low`` to ``high`` times the BBP threshold.

    Signals that straddle the threshold spread eigenmass continuously above the edge instead of forming a few
    clean spikes: the bulk-decay regime.
    """
    strengths = torch.linspace(low, high, count).tolist()
    return spiked(N, M, strengths, seed=seed)


def correlated_heavy_tailed(
    N: int, M: int, alpha: float, *, seed: int | torch.Generator | None = 0
) -> Tensor:
    """Gaussian rows with a heavy-tailed population covariance, ``W = G Sigma^(1/2)``.

    The population eigenvalues are drawn from a Pareto law with density ``~ x^-alpha``; the ESD inherits that
    tail. Unlike :func:`pareto`, the entries themselves are not heavy-tailed: the tail comes from correlations,
    as in trained layers (SETOL, sec. 2.2).
    """
    g = _gen(seed)
    u = torch.rand(M, generator=g, dtype=torch.float64).clamp_(min=1e-12)
    population = u ** (-1.0 / (alpha - 1.0))  # P(x > t) = t^-(alpha-1): density ~ x^-alpha
    basis, _ = torch.linalg.qr(torch.randn(M, M, generator=g, dtype=torch.float64))
    root = basis * population.sqrt() @ basis.T
    return (torch.randn(N, M, generator=g, dtype=torch.float64) @ root / math.sqrt(N)).float()


def low_rank(
    N: int, M: int, rank: int, *, noise: float = 1e-6, seed: int | torch.Generator | None = 0
) -> Tensor:
    """A rank-``rank`` product plus tiny noise: the rank-collapse phase when ``rank`` is well below ``M``."""
    g = _gen(seed)
    a = torch.randn(N, rank, generator=g, dtype=torch.float64)
    b = torch.randn(rank, M, generator=g, dtype=torch.float64)
    w = a @ b / math.sqrt(N * rank) + noise * torch.randn(N, M, generator=g, dtype=torch.float64) / math.sqrt(N)
    return w.float()


def phase_example(phase: Phase | str, N: int, M: int, *, seed: int = 0) -> Tensor:
    """A matrix from the regime of ``phase``, with settings drawn at random inside it.

    ============================= ==================================================================================
    ``random_like``               i.i.d. Gaussian
    ``bleeding_out``              1-3 signals placed 8-18 Tracy-Widom widths above the MP edge (the BBP window)
    ``bulk_plus_spikes``          1-5 signals at 2.5-6x the BBP threshold
    ``bulk_decay``                20-30 % of M graded signals from 0.5x to 1.6-2.0x the threshold
    ``heavy_tailed``              Pareto entries (mu 0.75-1.75) or correlated heavy tail (alpha 2.2-3.0)
    ``rank_collapse``             rank 10-70 % of M plus 1e-6 noise
    ============================= ==================================================================================

    Args:
        phase: A :class:`~lightning_htsr.spectra.phases.Phase` or its name.
        N: Rows.
        M: Columns (``M <= N``).
        seed: Seed of both the settings and the matrix.

    Returns:
        An ``N x M`` float32 tensor.
    """
    phase = Phase(phase)
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    def integer(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=g))

    if phase is Phase.RANDOM_LIKE:
        return gaussian(N, M, seed=g)
    if phase is Phase.BLEEDING_OUT:
        Q = N / M
        edge, width = (1.0 + Q**-0.5) ** 2, tracy_widom_scale(N, Q)
        gaps = [uniform(8.0, 18.0) for _ in range(integer(1, 3))]
        return spiked(N, M, [spike_strength(edge + gap * width, Q) for gap in gaps], seed=g)
    if phase is Phase.BULK_PLUS_SPIKES:
        return spiked(N, M, [uniform(2.5, 6.0) for _ in range(integer(1, 5))], seed=g)
    if phase is Phase.BULK_DECAY:
        count = max(8, int(uniform(0.2, 0.3) * M))
        return graded_signals(N, M, count, low=0.5, high=uniform(1.6, 2.0), seed=g)
    if phase is Phase.HEAVY_TAILED:
        if integer(0, 1):
            return pareto(N, M, uniform(0.75, 1.75), seed=g)
        return correlated_heavy_tailed(N, M, uniform(2.2, 3.0), seed=g)
    return low_rank(N, M, max(1, int(uniform(0.1, 0.7) * M)), seed=g)
