"""Correlation traps: the ESD of the element-shuffled matrix (weightwatcher 0.7.7's ``randomize=True`` columns).

Shuffling the entries of ``W`` (each slice separately, as weightwatcher's ``random_eigenvalues`` does) destroys
every correlation and keeps the entry distribution, so the shuffled ESD is Marchenko-Pastur-like unless a few
unusually large entries ("correlation traps") make spikes of their own. With ``lambda`` the ESD and ``r`` the
shuffled ESD (computed by the same eigenvalue routine on the same device):

===================== ==================================================================================
``max_rand_eval``     ``max r`` over the first draw (5 shuffles pooled when ``num_evals < 100``, else 1)
``rand_distance``     Jensen-Shannon distance (natural log) between the sorted vectors ``lambda`` and ``r``
                      of a second, single draw, each normalized to sum 1 (``scipy.stats.entropy``'s use)
``ww_softrank``       ``max r / max lambda`` (second draw)
``ww_maxdist``        ``max lambda - max r`` (second draw)
``rand_W_scale``      ``sqrt(n / sum r)`` (first draw): the first draw is rescaled to mean 1 before its MP fit
``rand_sigma_mp``     sigma of weightwatcher's MP fit to the rescaled first draw: a grid over ``[0.05, 2) s``
                      (step ``0.01 s``, ``s = sqrt(max / (1 + 1/sqrt(Q))^2)``) minimizing the squared
                      difference between the MP density and a linear-kernel density estimate (bandwidth 0.1);
                      for ``Q = 1`` the quarter-circle law on singular values
``rand_bulk_max``     ``(sigma (1 + 1/sqrt(Q)))^2 / rand_W_scale^2`` (the MP edge in the ESD's units);
                      ``rand_bulk_min`` likewise with ``1 - 1/sqrt(Q)``
``rand_num_spikes``   rescaled shuffled eigenvalues above ``b + sqrt(TW)``, ``b = (sigma (1 + 1/sqrt(Q)))^2``
                      the rescaled edge, ``TW = b^(2/3) M^(-2/3) / sqrt(Q)``; ``num_traps`` is the same number
``rand_mp_softrank``    ``b / max`` of the rescaled first draw (= ``rand_bulk_max / max_rand_eval``)
===================== ==================================================================================

The grid minimum is polished with Nelder-Mead as ``scipy.optimize.brute`` does (reimplemented: no SciPy
dependency). Differences from weightwatcher: its MP fit uses its own ``Q = N / M``, which for some
``Conv2d`` shapes is below 1 (see :mod:`~lightning_htsr.weights.ww_select`), here ``Q >= 1``. The shuffled ESD is scaled
as the original (under ``ww_compat`` the ``Conv2d`` factor 1/2 too, as 0.7.7 does). Fit failures give -1, as there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .arrays import sorted_float64
from .eigenvalues import compute_spectra

__all__ = ["RANDOMIZE_COLUMNS", "random_columns", "ww_mp_fit"]

RANDOMIZE_COLUMNS = ("max_rand_eval", "rand_distance", "ww_softrank", "ww_maxdist", "rand_num_spikes", "num_traps",
                     "rand_sigma_mp", "rand_mp_softrank", "rand_W_scale", "rand_bulk_max", "rand_bulk_min")

#: weightwatcher's ``mp_fit`` settings: KDE bandwidth, density floor of the residual.
_BANDWIDTH, _DENSITY_FLOOR = 0.1, 0.01


def shuffled_eigenvalues(slices: Tensor, scale: float, rng: np.random.Generator, *, replicas: int = 1,
                         **spectrum_options: Any) -> np.ndarray:
    """Eigenvalues of ``replicas`` element-shuffled copies of a stack of slices, pooled and sorted.

    Args:
        slices: ``(k, N, M)`` stack on any device; each slice is shuffled on its own.
        scale: Factor applied to the eigenvalues (as for the original ESD).
        rng: Source of the permutations.
        replicas: Independent shuffles pooled.
        **spectrum_options: ``precision``, ``route``, ``backend``, ``rank_eps`` of
            :func:`~lightning_htsr.spectra.eigenvalues.compute_spectra` (the original's routine).
    """
    k, n, m = slices.shape
    flat = slices.reshape(k, n * m)
    stacks = []
    for _ in range(replicas):
        perm = torch.from_numpy(rng.permuted(np.tile(np.arange(n * m), (k, 1)), axis=1)).to(slices.device)
        stacks.append(torch.gather(flat, 1, perm).reshape(k, n, m))
    spectra = compute_spectra(stacks, scales=[scale] * replicas, **spectrum_options)
    return np.sort(np.concatenate([s.eigenvalues.numpy() for s in spectra]))


def _js_distance(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    mid = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = [float(np.sum(np.where(a > 0, a * np.log(a / mid), 0.0))) for a in (p, q)]
    return math.sqrt((kl[0] + kl[1]) / 2)


def _linear_kde(samples: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Density of scikit-learn's ``KernelDensity(kernel='linear')``: triangles of half-width ``bandwidth``."""
    out = np.empty_like(grid)
    for start in range(0, grid.size, 100):
        u = np.abs(grid[start:start + 100, None] - samples[None, :]) / bandwidth
        out[start:start + 100] = np.clip(1.0 - u, 0.0, None).sum(axis=1)
    return out / (samples.size * bandwidth)


def _mp_objective(sigma: float, xde: np.ndarray, yde: np.ndarray, q: float, peak: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if q == 1:
            ymp = np.nan_to_num(np.sqrt(4 - xde**2) / (math.pi * sigma * sigma))
        else:
            b, a = (sigma * (1 + math.sqrt(1 / q))) ** 2, (sigma * (1 - math.sqrt(1 / q))) ** 2
            if b < peak or b > xde.max() or a > peak:
                return 1000.0**2 * xde.size
            ymp = np.nan_to_num(np.sqrt((b - xde) * (xde - a)) / (2 * math.pi * sigma * sigma * xde / q))
    return float(np.sum((ymp - yde) ** 2))


def _nelder_mead(f: Callable[[float], float], x0: float, xatol: float = 1e-4, fatol: float = 1e-4) -> float:
    """``scipy.optimize.fmin`` in one dimension (the polish of ``optimize.brute``), step for step."""
    sim = [x0, (1.05 * x0) if x0 != 0 else 0.00025]
    fsim = [f(sim[0]), f(sim[1])]
    calls = 2
    for _ in range(200):
        order = sorted(range(2), key=lambda i: fsim[i])
        sim, fsim = [sim[i] for i in order], [fsim[i] for i in order]
        if abs(sim[1] - sim[0]) <= xatol and abs(fsim[0] - fsim[1]) <= fatol or calls >= 200:
            break
        best, worst = sim[0], sim[1]
        xr = 2 * best - worst
        fxr, calls = f(xr), calls + 1
        if fxr < fsim[0]:
            xe = 3 * best - 2 * worst
            fxe, calls = f(xe), calls + 1
            sim[1], fsim[1] = (xe, fxe) if fxe < fxr else (xr, fxr)
            continue
        if fxr < fsim[1]:
            xc = 1.5 * best - 0.5 * worst
            fxc, calls = f(xc), calls + 1
            shrink = not fxc <= fxr
            if not shrink:
                sim[1], fsim[1] = xc, fxc
        else:
            xcc = 0.5 * best + 0.5 * worst
            fxcc, calls = f(xcc), calls + 1
            shrink = not fxcc < fsim[1]
            if not shrink:
                sim[1], fsim[1] = xcc, fxcc
        if shrink:
            sim[1] = sim[0] + 0.5 * (sim[1] - sim[0])
            fsim[1], calls = f(sim[1]), calls + 1
    return sim[0]


def ww_mp_fit(evals: np.ndarray, q: float, m: int) -> dict[str, float]:
    """weightwatcher 0.7.7's ``mp_fit`` (``rescale=True``) without plots: see the module table.

    Returns:
        ``{"num_spikes", "sigma_mp", "mp_softrank", "bulk_min", "bulk_max", "W_scale"}``.
    """
    w_scale = math.sqrt(evals.size) / math.sqrt(float(evals.sum()))
    x = evals * w_scale**2
    s = math.sqrt(float(x.max()) / (1 + 1 / math.sqrt(q)) ** 2)
    to_fit = np.sqrt(x) if q == 1 else x
    xde = np.linspace(0, float(to_fit.max()) + 0.5, 1000)
    yde = _linear_kde(to_fit, xde, _BANDWIDTH)
    keep = yde > _DENSITY_FLOOR
    peak = float(xde[np.argmax(yde)])
    grid = np.arange(0.05 * s, 2.0 * s, 0.01 * s)
    costs = [_mp_objective(float(g), xde[keep], yde[keep], q, peak) for g in grid]
    sigma = _nelder_mead(lambda v: _mp_objective(v, xde[keep], yde[keep], q, peak), float(grid[int(np.argmin(costs))]))
    bulk_max = (sigma * (1 + 1 / math.sqrt(q))) ** 2
    bulk_min = (sigma * (1 - 1 / math.sqrt(q))) ** 2
    tw = bulk_max ** (2 / 3) * m ** (-2 / 3) / math.sqrt(q)
    return {"num_spikes": int(np.count_nonzero(x > bulk_max + math.sqrt(tw))), "sigma_mp": sigma,
            "mp_softrank": bulk_max / float(x.max()), "bulk_min": bulk_min / w_scale**2,
            "bulk_max": bulk_max / w_scale**2, "W_scale": w_scale}


def random_columns(evals: Tensor, slices: Tensor, scale: float, q: float, m: int, rng: np.random.Generator,
                   **spectrum_options: Any) -> dict[str, float | int]:
    """The ``randomize=True`` columns of one matrix (see the module table).

    Args:
        evals: The original ESD (sorted, same units as ``scale`` gives the shuffled one).
        slices: The ``(k, N, M)`` stack the ESD came from.
        scale: Eigenvalue factor of the shuffled copies.
        q: Aspect ratio ``N / M`` of one slice.
        m: ``M``, the smaller side of one slice.
        rng: Source of the permutations (seeded by ``analyze(seed=...)``).
        **spectrum_options: The original's eigenvalue routine (see :func:`shuffled_eigenvalues`).
    """
    ev = sorted_float64(evals).cpu().numpy()
    first = shuffled_eigenvalues(slices, scale, rng, replicas=5 if ev.size < 100 else 1, **spectrum_options)
    second = shuffled_eigenvalues(slices, scale, rng, **spectrum_options)
    out: dict[str, float | int] = {"max_rand_eval": float(first.max()),
                                   "rand_distance": _js_distance(ev, second) if second.size == ev.size else math.nan,
                                   "ww_softrank": float(second.max() / ev.max()),
                                   "ww_maxdist": float(ev.max() - second.max())}
    try:
        fit = ww_mp_fit(first, q, m)
    except (ValueError, ZeroDivisionError, FloatingPointError):
        fit = dict.fromkeys(("num_spikes", "sigma_mp", "mp_softrank", "bulk_min", "bulk_max", "W_scale"), -1)
    out.update(rand_num_spikes=fit["num_spikes"], num_traps=fit["num_spikes"], rand_sigma_mp=fit["sigma_mp"],
               rand_mp_softrank=fit["mp_softrank"], rand_W_scale=fit["W_scale"], rand_bulk_max=fit["bulk_max"],
               rand_bulk_min=fit["bulk_min"])
    return out
