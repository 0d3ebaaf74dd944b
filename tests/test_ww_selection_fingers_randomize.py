"""weightwatcher 0.7.7 parity: layer selection under ``ww_compat``, ``fix_fingers`` and ``randomize``."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_htsr import analyze
from lightning_htsr.analysis import AnalysisOptions, analyze_matrices
from lightning_htsr.spectra.randomize import RANDOMIZE_COLUMNS, ww_mp_fit
from lightning_htsr.weights.matrix import WeightMatrix
from lightning_htsr.weights.ww_select import ww_layer_shape, ww_skip_reason

ww = pytest.importorskip("weightwatcher")
RMT_Util = pytest.importorskip("weightwatcher.RMT_Util")


@pytest.fixture(autouse=True)
def _quiet_weightwatcher():
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


def _selection_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(256, 512, (64, 1)),  # M * rf = 16384 > max_evals: weightwatcher skips it
        nn.Conv2d(1, 128, (512, 1)),  # 512 single-column slices: weightwatcher analyzes them
        nn.Conv2d(4, 3, (1, 2)),  # out < in, rf even: weightwatcher counts M * rf = 4 * 2 = 8 (we have 6 evals)
        nn.Conv2d(3, 5, (1, 3)),
        nn.Linear(7, 40),  # 7 < min_evals
        nn.MultiheadAttention(32, 4),  # in_proj not analyzed, out_proj (a Linear) is
        nn.LSTM(16, 16),
        nn.Embedding(20, 9),
        nn.Conv1d(8, 16, 3),  # weightwatcher: M = min(shape) = 3 < 8
        nn.ConvTranspose2d(16, 16, 3),  # not a type weightwatcher knows
    )


def test_ww_compat_selects_the_layers_weightwatcher_selects() -> None:
    model = _selection_model()
    ref = ww.WeightWatcher(model=model).analyze()
    ours = analyze(model, ww_compat=True)
    analyzed = ours[ours["status"] != "skipped"]
    assert list(analyzed["name"]) == list(ref["longname"]) == ["1", "2", "3", "5.out_proj", "7"]
    np.testing.assert_allclose(analyzed["alpha"].to_numpy(float), ref["alpha"].to_numpy(float), rtol=1e-6)
    reasons = dict(zip(ours["name"], ours["skip_reason"]))
    assert reasons["0"] == "weightwatcher: M * rf = 16384 > max_evals=15000"
    assert "does not analyze MultiheadAttention" in reasons["5.in_proj.q"]
    assert "does not analyze ConvTranspose2d" in reasons["9"]
    default = analyze(model)  # default selection unchanged
    assert default.set_index("name").loc["0", "status"] == "success"
    assert default.set_index("name").loc["1", "status"] == "skipped"


def test_ww_layer_shape_counts_as_weightwatcher() -> None:
    assert ww_layer_shape("conv2d", (512, 256, 64, 1)) == (512, 256, 64)
    assert ww_layer_shape("conv2d", (128, 1, 512, 1)) == (128, 1, 512)  # "channels first" detected
    assert ww_layer_shape("conv2d", (128, 256, 2, 2)) == (128, 256, 4)  # one swap per slice: rf even, no swap
    assert ww_layer_shape("conv2d", (128, 256, 3, 3)) == (256, 128, 9)
    assert ww_layer_shape("embedding", (60000, 8)) == (60000, 8, 1)
    assert ww_skip_reason(60000, 8, 1) == "weightwatcher: N = 60000 > max_N=50000"
    assert ww_skip_reason(128, 1, 512) is None


@pytest.mark.parametrize("mode", ["clip_xmax", "xmin_peak"])
def test_fix_fingers_as_weightwatcher_with_its_default_package(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 300))
    ref = ww.WeightWatcher(model=model).analyze(fix_fingers=mode)
    if mode == "xmin_peak":
        with pytest.warns(UserWarning, match="only powerlaw supports fix_fingers"):
            ours = analyze(model, ww_compat=True, fix_fingers=mode)
    else:
        ours = analyze(model, ww_compat=True, fix_fingers=mode)
    if mode == "xmin_peak":  # 0.7.7 logs "Only powerlaw supports fix_fingers" and its fit fails
        assert (ref["alpha"] == -1).all()
        assert ours["alpha"].isna().all() and (ours["status"] == "degenerate").all()
        assert ours["skip_reason"].str.contains("only powerlaw supports fix_fingers").all()
        assert "num_fingers" not in ours.columns
        return
    assert list(ours["num_fingers"]) == list(ref["num_fingers"]) == [7, 2]
    for col in ("alpha", "raw_alpha", "xmin", "xmax", "D", "sigma", "num_pl_spikes"):
        np.testing.assert_allclose(ours[col].to_numpy(float), ref[col].to_numpy(float), rtol=1e-6, err_msg=col)
    assert "num_fingers" not in analyze(model, ww_compat=True).columns


@pytest.mark.parametrize("shape", [(300, 100), (200, 200), (500, 50)])
def test_mp_fit_of_the_shuffled_esd_matches_weightwatchers_fit(shape: tuple[int, int]) -> None:
    n, m = shape
    w = np.random.default_rng(n).standard_t(3, size=shape)
    ev = np.linalg.svd(w, compute_uv=False) ** 2
    q = n / m
    ref_sigma = RMT_Util.fit_density_with_range(ev * ev.size / ev.sum(), q)[0]
    fit = ww_mp_fit(ev, q, m)
    assert fit["sigma_mp"] == pytest.approx(ref_sigma, rel=1e-12)
    assert fit["W_scale"] == pytest.approx(math.sqrt(ev.size / ev.sum()))
    assert fit["bulk_max"] == pytest.approx((ref_sigma * (1 + 1 / math.sqrt(q))) ** 2 / fit["W_scale"] ** 2)


def trap_model(kind: str) -> nn.Module:
    """The randomize test models (``scripts/ww_randomize_reference.py`` imports this): i.i.d. Gaussian,
    Student-t(2.5) entries, or Gaussian with one planted entry of 40."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(200, 400), nn.Linear(300, 300), nn.Conv2d(32, 64, 3))
    with torch.no_grad():
        if kind == "heavy":
            for p in m.parameters():
                p.copy_(torch.distributions.StudentT(2.5).sample(p.shape))
        if kind == "trap":
            m[0].weight[3, 5] = 40.0
            m[1].weight[7, 7] = 40.0
            m[2].weight[1, 2, 1, 1] = 40.0
    return m


# Means over NumPy seeds 0-4 of weightwatcher 0.7.7's analyze(randomize=True) per layer (Linear 200->400,
# Linear 300x300, Conv2d 32->64 3x3). Regenerate: OMP_NUM_THREADS=1 python scripts/ww_randomize_reference.py
WW_RANDOMIZE = {
    "gauss": {
        "max_rand_eval": (1.90724, 1.3239, 0.106152), "rand_distance": (0.00516588, 0.00468084, 0.0100094),
        "ww_softrank": (1.00802, 0.998737, 0.982924), "ww_maxdist": (-0.0149635, 0.00164186, 0.00182583),
        "num_traps": (0, 0, 0), "rand_sigma_mp": (1.00485, 1.00744, 1.00551),
        "rand_mp_softrank": (1.02386, 1.02702, 1.02405), "rand_W_scale": (1.22765, 1.72858, 5.20636),
        "rand_bulk_max": (1.9525, 1.35868, 0.108704), "rand_bulk_min": (0.0574763, 0, 0.00319995),
    },
    "heavy": {
        "max_rand_eval": (23531.5, 34440.5, 5303.57), "rand_distance": (0.0143442, 0.0177979, 0.0203728),
        "ww_softrank": (0.995019, 1.08039, 0.998655), "ww_maxdist": (106.859, -2579.49, 7.07974),
        "num_traps": (14.2, 9.6, 19.6), "rand_sigma_mp": (0.896709, 1.00169, 0.813829),
        "rand_mp_softrank": (0.194938, 0.178694, 0.0581347), "rand_W_scale": (0.0227534, 0.0256779, 0.0791528),
        "rand_bulk_max": (4526.76, 6087.1, 308.093), "rand_bulk_min": (133.256, 0, 9.06941),
    },
    "trap": {
        "max_rand_eval": (1601.01, 1600.67, 800.053), "rand_distance": (0.0014152, 0.00114646, 0.00116821),
        "ww_softrank": (0.999963, 0.999988, 1), "ww_maxdist": (0.0597766, 0.0188509, -0.00134302),
        "num_traps": (1, 1, 1), "rand_sigma_mp": (0.398161, 0.608896, 0.493805),
        "rand_mp_softrank": (0.0025, 0.00525138, 0.0025), "rand_W_scale": (0.339745, 0.420034, 0.596055),
        "rand_bulk_max": (4.00252, 8.40575, 2.00013), "rand_bulk_min": (0.117823, 0, 0.0588784),
    },
}
#: Relative tolerance of the 5-seed means (measured worst case: 4.6 %, heavy max_rand_eval).
_RTOL = {"rand_W_scale": 1e-5, "rand_distance": 0.35, "num_traps": 0.15}


@pytest.mark.parametrize("kind", sorted(WW_RANDOMIZE))
def test_randomize_columns_agree_with_weightwatcher_in_distribution(kind: str) -> None:
    model = trap_model(kind)
    runs = [analyze(model, ww_compat=True, randomize=True, seed=s) for s in range(5)]
    assert set(RANDOMIZE_COLUMNS) <= set(runs[0].columns)
    for col, ref in WW_RANDOMIZE[kind].items():
        ours = np.mean([r[col].to_numpy(float) for r in runs], axis=0)
        if col == "ww_maxdist":  # a difference of two maxima (heavy tails: noisy over 5 draws): on the scale of the maxima
            scale = np.asarray(WW_RANDOMIZE[kind]["max_rand_eval"])
            assert np.all(np.abs(ours - np.asarray(ref)) <= 0.10 * scale), (col, ours, ref)
            continue
        np.testing.assert_allclose(ours, ref, rtol=_RTOL.get(col, 0.08), atol=1e-12, err_msg=col)


def test_randomize_is_seeded_and_rmt_like() -> None:
    g = torch.Generator().manual_seed(0)
    iid = WeightMatrix.from_tensor("iid", torch.randn(400, 200, generator=g))
    trap = torch.randn(400, 200, generator=g)
    trap[3, 5] = 60.0  # one planted entry: a spike that survives shuffling
    planted = WeightMatrix.from_tensor("trap", trap)
    options = AnalysisOptions(randomize=True, seed=7)
    a, b = (analyze_matrices([iid, planted], options) for _ in range(2))
    assert [r.record["max_rand_eval"] for r in a] == [r.record["max_rand_eval"] for r in b]
    other = analyze_matrices([iid], AnalysisOptions(randomize=True, seed=8))[0].record
    assert other["max_rand_eval"] != a[0].record["max_rand_eval"]
    rec_iid, rec_trap = a[0].record, a[1].record
    assert rec_iid["num_traps"] == 0 and rec_trap["num_traps"] >= 1
    assert rec_iid["rand_mp_softrank"] == pytest.approx(1.0, abs=0.1)  # shuffled i.i.d.: MP edge at its maximum
    assert rec_iid["rand_sigma_mp"] == pytest.approx(1.0, abs=0.05)  # rescaled to unit variance
    assert rec_iid["ww_softrank"] == pytest.approx(1.0, abs=0.1)
    assert rec_trap["rand_mp_softrank"] < 0.5  # the trap sits far above the shuffled bulk
    assert "num_traps" not in analyze_matrices([iid], AnalysisOptions())[0].record
