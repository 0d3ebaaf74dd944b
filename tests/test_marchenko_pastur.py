"""Marchenko-Pastur law, Tracy-Widom table and the MP fit against random-matrix theory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_htsr.spectra import synthetic
from lightning_htsr.spectra.eigenvalues import eigenvalues
from lightning_htsr.spectra.marchenko_pastur import (
    _TW1_S0,
    _TW1_STEP,
    _TW1_TAIL,
    fit_marchenko_pastur,
    mp_cdf,
    mp_median,
    mp_pdf,
    mp_support,
    tracy_widom_quantile,
    tracy_widom_scale,
)

scipy = pytest.importorskip("scipy")
from scipy import integrate, special  # noqa: E402


def tw1_cdf(s: float, nodes: int = 80, length: float = 14.0) -> float:
    """Bornemann's Nystrom discretisation of F_1(s) = det(I - K_1), K_1(x, y) = Ai((x + y) / 2) / 2."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    x = s + (x + 1.0) * length / 2.0
    w = w * length / 2.0
    kernel = 0.5 * special.airy((x[:, None] + x[None, :]) / 2.0)[0]
    root = np.sqrt(w)
    return float(np.linalg.det(np.eye(nodes) - root[:, None] * kernel * root[None, :]))


def test_tracy_widom_table_matches_fredholm_determinant() -> None:
    for i, tail in enumerate(_TW1_TAIL):
        s = _TW1_S0 + _TW1_STEP * i
        assert 1.0 - tw1_cdf(s) == pytest.approx(tail, rel=1e-4, abs=1e-10)


def test_tracy_widom_quantiles_are_the_known_ones() -> None:
    # TW1 quantiles (Bornemann 2010; Johnstone 2001 Table 1): 95 % 0.9793, 99 % 2.0234.
    assert tracy_widom_quantile(0.05) == pytest.approx(0.9793, abs=2e-3)
    assert tracy_widom_quantile(0.01) == pytest.approx(2.0234, abs=2e-3)


@pytest.mark.parametrize("Q", [1.0, 1.5, 4.0, 10.0])
def test_mp_density_integrates_to_one_and_cdf_agrees_with_quadrature(Q: float) -> None:
    lo, hi = mp_support(Q, 2.0)
    total = integrate.quad(lambda x: float(mp_pdf(np.array([x]), Q, 2.0)[0]), lo, hi, limit=200)[0]
    assert total == pytest.approx(1.0, abs=1e-6)
    for q in (0.1, 0.5, 0.9):
        x = lo + q * (hi - lo)
        by_quad = integrate.quad(lambda t: float(mp_pdf(np.array([t]), Q, 2.0)[0]), lo, x, limit=200)[0]
        assert float(mp_cdf(x, Q, 2.0)) == pytest.approx(by_quad, abs=1e-5)
    med = mp_median(Q)
    assert float(mp_cdf(med, Q)) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("N,M", [(4096, 384), (1000, 500), (768, 768), (2000, 250)])
def test_gaussian_eigenvalues_fill_the_marchenko_pastur_support(N: int, M: int) -> None:
    """i.i.d. N(0, s^2) entries: the ESD of W^T W / N lies in [lambda_-, lambda_+] up to TW edge fluctuations."""
    s2 = 0.37
    w = torch.randn(N, M, generator=torch.Generator().manual_seed(N + M), dtype=torch.float64) * math.sqrt(s2)
    ev = eigenvalues(w, precision="float64").numpy()
    Q = N / M
    lo, hi = mp_support(Q, s2)
    width = tracy_widom_scale(N, Q, s2)
    # largest eigenvalue within a few TW widths of the edge (TW1: 99.9 % below 3.3, 0.1 % below -3.9)
    assert -6 * width < ev.max() - hi < 4 * width
    if Q > 1:
        assert ev.min() > lo - 6 * width
    # the whole spectrum follows MP: KS distance to the law of order 1/M
    steps = np.arange(1, M + 1) / M
    ks = np.max(np.abs(mp_cdf(np.sort(ev), Q, s2) - steps))
    assert ks < 0.02
    fit = fit_marchenko_pastur(ev, N, M)
    assert fit.sigma_mp == pytest.approx(math.sqrt(s2), rel=0.01)
    assert fit.num_spikes == 0
    assert fit.mp_softrank == pytest.approx(1.0, abs=0.05)


def test_tracy_widom_statistics_of_the_largest_eigenvalue() -> None:
    """(lambda_max - lambda_+) / s_TW over many Gaussian draws has the TW1 mean (-1.21) and spread (1.27)."""
    z = []
    for seed in range(40):
        w = torch.randn(800, 400, generator=torch.Generator().manual_seed(seed))
        fit = fit_marchenko_pastur(eigenvalues(w), 800, 400)
        z.append(fit.max_gap_tw)
    assert np.mean(z) == pytest.approx(-1.21, abs=0.5)
    assert 0.8 < np.std(z) < 1.9


@pytest.mark.parametrize("Q", [1.0, 4.0])
def test_spike_above_bbp_threshold_is_detected_where_theory_puts_it(Q: float) -> None:
    M = 500
    N = int(Q * M)
    strength = 3.0  # theta / theta_c
    w = synthetic.spiked(N, M, [strength], seed=0)
    ev = eigenvalues(w).numpy()
    fit = fit_marchenko_pastur(ev, N, M)
    assert fit.num_spikes == 1
    theta = strength * synthetic.bbp_threshold(Q)
    expected = synthetic.spike_location(theta, Q) * fit.sigma_mp**2
    assert ev.max() == pytest.approx(expected, rel=0.03)
    assert synthetic.spike_strength(ev.max(), Q, fit.sigma_mp**2) == pytest.approx(strength, rel=0.05)


def test_signal_below_bbp_threshold_leaves_no_spike() -> None:
    w = synthetic.spiked(1000, 500, [0.6, 0.8], seed=0)
    assert fit_marchenko_pastur(eigenvalues(w), 1000, 500).num_spikes == 0


def test_pooled_slices_use_a_family_wise_threshold() -> None:
    fits = [fit_marchenko_pastur(np.linspace(1, 2, 100), 200, 100, num_slices=k) for k in (1, 9, 49)]
    thresholds = [f.spike_threshold for f in fits]
    assert thresholds[0] < thresholds[1] < thresholds[2]


def test_degenerate_input_gives_undefined_fit() -> None:
    fit = fit_marchenko_pastur(np.array([0.0, 0.0, 1.0]), 10, 3)
    assert math.isnan(fit.sigma_mp) and fit.num_spikes == 0
