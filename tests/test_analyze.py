"""analyze(): random-matrix theory, agreement with weightwatcher 0.7.7, summaries."""

from __future__ import annotations

import contextlib
import io
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import lightning_htsr as htsr
from lightning_htsr.records import COLUMNS
from lightning_htsr.spectra import synthetic
from lightning_htsr.spectra.marchenko_pastur import mp_support, tracy_widom_scale


def set_weight(layer: nn.Module, w: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(w.reshape(layer.weight.shape))
    return layer


# --------------------------------------------------------------------------------------------- theory


@pytest.mark.parametrize("out_f,in_f", [(1024, 256), (512, 512), (300, 900)])
def test_gaussian_layer_is_random_like_with_mp_bulk(out_f: int, in_f: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f)
    nn.init.normal_(layer.weight, std=0.05)
    row = htsr.analyze(layer).iloc[0]
    N, M = max(out_f, in_f), min(out_f, in_f)
    assert (row.N, row.M) == (N, M)
    Q = N / M
    lo, hi = mp_support(Q, 0.05**2)
    assert row.lambda_plus == pytest.approx(hi, rel=0.02)
    assert row.spectral_norm < hi + 4 * tracy_widom_scale(N, Q, 0.05**2)
    assert row.sigma_mp == pytest.approx(0.05, rel=0.01)
    assert row.phase == "random_like"
    assert row.num_spikes == 0
    # lambda_max sits within a few Tracy-Widom widths of the edge, so lambda_+ / lambda_max is 1 to that precision
    assert row.mp_softrank == pytest.approx(1.0, abs=5 * tracy_widom_scale(N, Q, 0.05**2) / hi)
    assert row.ks_mp < 0.02
    assert 0.9 < row.entropy <= 1.0  # a random spectrum is nearly flat


@pytest.mark.parametrize("mu,tolerance", [(0.5, 0.1), (1.0, 0.1), (1.5, 0.25)])
def test_pareto_entries_give_alpha_mu_over_2_plus_1(mu: float, tolerance: float) -> None:
    """Martin & Mahoney (2021) Table 1: mu < 2 gives alpha = mu/2 + 1 in the N -> inf limit.

    Tolerance: the finite-size bias grows as mu -> 2 (alpha comes out high by ~0.1-0.15 at mu = 1.5 for M = 500,
    as in THEORY_DOSSIER section 2.4); we average 3 seeds per aspect ratio.
    """
    for Q in (1, 2):
        alphas = []
        for seed in range(3):
            layer = nn.Linear(500, 500 * Q, bias=False)
            set_weight(layer, synthetic.pareto(500 * Q, 500, mu, seed=seed))
            row = htsr.analyze(layer).iloc[0]
            assert row.phase == "heavy_tailed"
            assert row.warning == "very heavy-tailed"
            alphas.append(row.alpha)
        assert np.mean(alphas) == pytest.approx(mu / 2 + 1, abs=tolerance)


def test_scale_convention_divides_by_N() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(200, 800)
    ours = htsr.analyze(layer).iloc[0]
    ww_style = htsr.analyze(layer, ww_compat=True).iloc[0]
    assert ours.norm == pytest.approx(ww_style.norm / 800, rel=1e-5)
    assert ours.log_spectral_norm == pytest.approx(ww_style.log_spectral_norm - math.log10(800), rel=1e-5)
    assert ours.stable_rank == pytest.approx(ww_style.stable_rank, rel=1e-4)  # scale-free


def test_every_column_present_and_one_row_per_matrix() -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Conv2d(3, 16, 3), nn.LSTM(16, 32), nn.Linear(32, 4))
    df = htsr.analyze(model)
    assert list(df.columns) == list(COLUMNS)
    assert df["name"].is_unique
    assert set(df["status"]) <= {"success", "degenerate", "skipped"}


def test_summarize_means_over_valid_rows_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256), nn.Linear(256, 3))
    df = htsr.analyze(model)
    summary = htsr.summarize(df)
    ok = df[df.status == "success"]
    assert summary["num_layers"] == 3 and summary["num_valid"] == len(ok) == 2
    assert summary["alpha"] == pytest.approx(ok.alpha.mean())
    assert summary["alpha_n"] == 2
    assert summary["frac_random_like"] == 1.0
    assert htsr.summarize(df, max_alpha=0.0)["alpha_n"] == 0


# ------------------------------------------------------------------------------- weightwatcher parity

ww = pytest.importorskip("weightwatcher")
PARITY_COLUMNS = ["alpha", "D", "xmin", "log_norm", "log_spectral_norm", "stable_rank", "entropy",
                  "sv_max", "sv_min", "lambda_max", "detX_val", "detX_val_unrescaled"]
PARITY_COUNTS = ["num_pl_spikes", "num_evals", "matrix_rank", "rf", "weak_rank_loss", "detX_num", "num_ERG_spikes",
                 "ERG_gap"]


def reweight(model: nn.Module, kind: str, seed: int) -> nn.Module:
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() < 2:
                continue
            fan = p[0].numel()
            if kind == "student_t":
                p.copy_(torch.from_numpy(rng.standard_t(2.5, p.shape) / np.sqrt(fan)))
            elif kind == "pareto":
                signs = rng.choice([-1.0, 1.0], p.shape)
                p.copy_(torch.from_numpy(rng.pareto(1.5, p.shape) * signs / np.sqrt(fan)))
    return model


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(300, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3),  # odd kernel, out > in
        nn.Conv2d(32, 64, 5),
        nn.Conv2d(64, 32, 2),  # even kernel with out < in: weightwatcher's N/M swap quirk
        nn.Conv2d(32, 48, 4),  # even kernel, out > in
        nn.Flatten(),
        nn.Linear(48, 10),
        nn.Embedding(600, 40),
    )


@pytest.mark.parametrize("build", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("kind", ["random", "student_t", "pareto"])
def test_ww_compat_matches_weightwatcher(build, kind: str) -> None:
    torch.manual_seed(0)
    model = reweight(build(), kind, seed=1)
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            theirs = ww.WeightWatcher(model=model).analyze(detX=True)
    finally:
        logging.disable(logging.NOTSET)
    ours = htsr.analyze(model, ww_compat=True)
    theirs = theirs.set_index("longname")
    ours = ours.set_index("name")
    assert set(theirs.index) <= set(ours.index)
    assert len(theirs) == (6 if build is cnn else 3)  # 4 conv + linear + embedding
    for name in theirs.index:
        for column in PARITY_COLUMNS:
            assert ours.loc[name, column] == pytest.approx(theirs.loc[name, column], rel=1e-6), (name, column)
        for column in PARITY_COUNTS:
            assert ours.loc[name, column] == theirs.loc[name, column], (name, column)
        assert ours.loc[name, "has_esd"] and theirs.loc[name, "has_esd"]


def test_default_and_ww_alpha_agree_on_trained_like_layers() -> None:
    """Where conventions coincide in effect (heavy tails, long fitted tails), the defaults give the same alpha."""
    layer = set_weight(nn.Linear(400, 800, bias=False), synthetic.pareto(800, 400, 1.0, seed=0))
    ours = htsr.analyze(layer).iloc[0]
    compat = htsr.analyze(layer, ww_compat=True).iloc[0]
    assert ours.alpha == pytest.approx(compat.alpha, abs=0.05)


# ----------------------------------------------------------------------------------- options


def test_include_exclude_and_types_select_rows() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Conv2d(4, 32, 3), nn.Linear(64, 64))
    assert list(htsr.analyze(model, include=r"^0$").name) == ["0"]
    assert list(htsr.analyze(model, exclude=["0", "2"]).name) == ["1"]
    assert list(htsr.analyze(model, layer_types=["conv2d"]).name) == ["1"]


def test_options_object_overrides_everything() -> None:
    layer = nn.Linear(128, 256)
    opts = htsr.AnalysisOptions(normalize=False, precision="float64", fit="exact")
    row = htsr.analyze(layer, options=opts).iloc[0]
    assert row.precision == "float64"
    ref = htsr.analyze(layer, ww_compat=True).iloc[0]
    assert row.log_norm == pytest.approx(ref.log_norm, rel=1e-6)


def test_phase_config_is_used() -> None:
    layer = nn.Linear(256, 256)
    strict = htsr.PhaseConfig(min_evals=10_000)
    row = htsr.analyze(layer, phase_config=strict).iloc[0]
    assert pd.isna(row.phase) and "needed to classify" in row.phase_reason


# ------------------------------------------------------------------------------------------ front doors


def test_every_front_door_gives_the_same_rows(tmp_path) -> None:
    """``analyze``, ``analyze_state_dict``, ``analyze_checkpoint`` and ``lightning-htsr analyze`` are one pipeline:
    the same rows (and the same warning) for the same weights, whatever the door."""
    import warnings

    from safetensors.torch import save_file

    from lightning_htsr.views.cli import main

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.Linear(128, 4), nn.Linear(1, 40))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    frames, warned = {}, {}
    for door, run in {"model": lambda **kw: htsr.analyze(model, **kw),
                      "state_dict": lambda **kw: htsr.analyze_state_dict(model.state_dict(), **kw),
                      "checkpoint": lambda **kw: htsr.analyze_checkpoint(tmp_path, **kw)}.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frames[door] = run(fit="exact", min_evals=20)
        warned[door] = [str(w.message) for w in caught if "not fully analyzed" in str(w.message)]
    assert main(["analyze", str(tmp_path), "--fit", "exact", "--min-evals", "20", "--quiet", "--json",
                 str(tmp_path / "t.json")]) == 0
    frames["cli"] = pd.read_json(tmp_path / "t.json", orient="records", dtype={"name": str})
    assert warned["model"] == warned["state_dict"] == warned["checkpoint"] and len(warned["model"]) == 1
    expected = frames["model"].drop(columns=["module_type"])
    assert expected["skip_kind"].tolist() == ["", "non_finite", "too_few_evals", "single_column"]
    for door, frame in frames.items():
        assert list(frame.columns) == list(COLUMNS), door
        got = frame.drop(columns=["module_type"])
        if door == "cli":  # JSON: empty text reads back as "" or None, integers as floats
            got = got.replace({None: np.nan, "": np.nan})
            pd.testing.assert_frame_equal(got, expected.replace({None: np.nan, "": np.nan}), check_dtype=False)
        else:
            pd.testing.assert_frame_equal(got, expected)
