"""Bad input never raises out of ``analyze``: every row says what happened (``status``, ``skip_reason``), and one
``UserWarning`` names the matrices whose *weights* were the problem (size-based skips are routine and silent).

Reference values (norms, spectral norms) are computed independently with ``numpy.linalg.svd`` in float64.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import lightning_htsr
from lightning_htsr import functional
from lightning_htsr.analysis import bad_input_rows, warn_bad_input
from lightning_htsr.spectra.eigenvalues import compute_spectra

# --------------------------------------------------------------------------------------------------------------------
# helpers


def linear_with(weight: torch.Tensor) -> nn.Linear:
    """A bias-free Linear whose weight is exactly ``weight`` (shape ``(out, in)``), dtype preserved."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)  # float8 has no random init: set it after
    layer.weight = nn.Parameter(weight.clone(), requires_grad=weight.is_floating_point())
    return layer


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def svd_evals(w: torch.Tensor | np.ndarray) -> np.ndarray:
    a = w.detach().to(torch.float64).numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float64)
    return np.sort(np.linalg.svd(a, compute_uv=False) ** 2)


def run(model: nn.Module, **kwargs: Any) -> tuple[pd.DataFrame, list[str]]:
    """``analyze`` (must not raise) -> (rows indexed by name, messages of this package's warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = lightning_htsr.analyze(model, **kwargs)
    ours = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "lightning-htsr" in
            str(w.message)]
    assert df["name"].is_unique
    return df.set_index("name"), ours


def warned_names(messages: list[str]) -> set[str]:
    """Matrix names listed in the (single) bad-input warning: ``name (status: reason)`` entries."""
    assert len(messages) == 1, messages
    return set(re.findall(r"(?:: |; )([\w.]+) \((?:skipped|degenerate): ", messages[0]))


def assert_consistent(df: pd.DataFrame) -> None:
    """Every row explains itself."""
    assert set(df["status"]) <= {"success", "degenerate", "skipped"}
    for name, row in df.iterrows():
        if row["status"] == "success":
            assert row["skip_reason"] == "", name
            assert math.isfinite(row["alpha"]) and math.isfinite(row["norm"]), name
        else:
            assert isinstance(row["skip_reason"], str) and row["skip_reason"], name
        if row["status"] == "skipped":
            assert math.isnan(row["alpha"]) and math.isnan(row["norm"]) and math.isnan(row["entropy"]), name


def missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def same_row(a: pd.Series, b: pd.Series) -> None:
    """Bit-identical rows, except the name. Missing values (NaN, or None, which pandas may turn into NaN in a
    column that has values in other rows) compare equal."""
    for column in a.index:
        x, y = a[column], b[column]
        if missing(x) or missing(y):
            assert missing(x) and missing(y), (column, x, y)
            continue
        assert x == y, (column, x, y)


# --------------------------------------------------------------------------------------------------------------------
# non-finite, zero, rank-deficient


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_skipped(value: float) -> None:
    w = randn(200, 100, seed=1)
    w[3, 4] = value
    model = nn.ModuleDict({"good": linear_with(randn(200, 100, seed=2)), "bad": linear_with(w)})
    df, msgs = run(model)
    assert df.loc["bad", "status"] == "skipped"
    assert "non-finite" in df.loc["bad", "skip_reason"]
    assert (df.loc["bad", "N"], df.loc["bad", "M"]) == (200, 100)
    assert df.loc["good", "status"] == "success"
    assert warned_names(msgs) == {"bad"}
    assert "non-finite" in msgs[0] and "1 weight matrices" in msgs[0]
    assert_consistent(df)


def test_nan_in_one_attention_block_spares_the_others() -> None:
    """The fused in_proj is split before the spectra: a NaN in the k rows only takes down ``in_proj.k``."""
    torch.manual_seed(3)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4)})
    with torch.no_grad():
        model["attn"].in_proj_weight[32 + 5, 7] = float("nan")  # a row of the k block
    df, msgs = run(model)
    assert df.loc["attn.in_proj.k", "status"] == "skipped"
    assert "non-finite" in df.loc["attn.in_proj.k", "skip_reason"]
    for name in ("attn.in_proj.q", "attn.in_proj.v", "attn.out_proj"):
        assert df.loc[name, "status"] == "success", name
    assert warned_names(msgs) == {"attn.in_proj.k"}


def test_nan_in_conv_and_lstm() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 16, 3)
    lstm = nn.LSTM(16, 12)
    with torch.no_grad():
        conv.weight[2, 3, 1, 1] = float("nan")
        lstm.weight_hh_l0[12 * 2 + 1, 0] = float("inf")  # gate g
    df, msgs = run(nn.ModuleDict({"conv": conv, "lstm": lstm}))
    assert df.loc["conv", "status"] == "skipped" and "non-finite" in df.loc["conv", "skip_reason"]
    assert df.loc["lstm.weight_hh_l0.g", "status"] == "skipped"
    ok = [n for n in df.index if n.startswith("lstm.") and n != "lstm.weight_hh_l0.g"]
    assert len(ok) == 7 and (df.loc[ok, "status"] == "success").all()
    assert warned_names(msgs) == {"conv", "lstm.weight_hh_l0.g"}


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_all_zero_is_skipped(layer: str) -> None:
    module = linear_with(torch.zeros(120, 60)) if layer == "linear" else nn.Conv2d(16, 32, 3)
    if layer == "conv":
        nn.init.zeros_(module.weight)
    df, msgs = run(nn.ModuleDict({"z": module}))
    assert df.loc["z", "status"] == "skipped"
    assert "all-zero" in df.loc["z", "skip_reason"]
    assert warned_names(msgs) == {"z"}
    assert_consistent(df)


def rank_one(n_rows: int, m_cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, 1, generator=g) @ torch.randn(1, m_cols, generator=g)


@pytest.mark.parametrize("kind", ["rank_one", "constant", "rank_one_wide"])
def test_rank_one_and_constant_are_degenerate(kind: str) -> None:
    if kind == "rank_one":
        w = rank_one(200, 100, seed=5)
    elif kind == "rank_one_wide":
        w = rank_one(100, 200, seed=6)
    else:
        w = torch.full((200, 100), 0.3)
    df, msgs = run(nn.ModuleDict({"r1": linear_with(w)}))
    row = df.loc["r1"]
    assert row["status"] == "degenerate"
    assert "power-law" in row["skip_reason"]
    assert math.isnan(row["alpha"])
    ev = svd_evals(w) / 200
    # norms are still computed: ||W||_F^2 / N and ||W||_2^2 / N, both = the one non-zero eigenvalue
    assert row["norm"] == pytest.approx(ev.sum(), rel=1e-6)
    assert row["spectral_norm"] == pytest.approx(ev.max(), rel=1e-6)
    assert row["log_norm"] == pytest.approx(math.log10(ev.sum()), rel=1e-6)
    assert row["stable_rank"] == pytest.approx(1.0, rel=1e-6)
    assert (row["matrix_rank"], row["rank_loss"]) == (1, 99)
    assert row["precision"] == "float64"  # auto recomputes a spectrum mostly below the float32 floor
    assert warned_names(msgs) == {"r1"}
    assert "degenerate" in msgs[0]


@pytest.mark.parametrize("kind", ["rank_one", "constant"])
def test_rank_one_and_constant_are_rank_collapse(kind: str) -> None:
    w = rank_one(200, 100, seed=5) if kind == "rank_one" else torch.full((200, 100), 0.3)
    df, _ = run(nn.ModuleDict({"r1": linear_with(w)}))
    row = df.loc["r1"]
    assert row["status"] == "degenerate"
    assert row["phase"] == "rank_collapse"  # docs/concepts/phases.md, rule 1: >= 10 % zero, and 100 >= 50 eigenvalues
    assert row["frac_zero"] == pytest.approx(0.99)


def test_small_rank_one_has_no_phase() -> None:
    w = rank_one(30, 20, seed=7)  # 20 eigenvalues: above min_evals, below the classifier's 50
    df, msgs = run(nn.ModuleDict({"r1": linear_with(w)}))
    row = df.loc["r1"]
    assert row["status"] == "degenerate"
    assert row["phase"] is None or (isinstance(row["phase"], float) and math.isnan(row["phase"]))
    assert row["norm"] == pytest.approx(svd_evals(w).sum() / 30, rel=1e-6)
    assert row["matrix_rank"] == 1
    assert warned_names(msgs) == {"r1"}


def test_tiny_layers_are_skipped_without_warning() -> None:
    torch.manual_seed(8)
    model = nn.ModuleDict(
        {
            "big": nn.Linear(64, 128),
            "tiny": nn.Linear(5, 4),
            "tinier": nn.Linear(2, 3),
            "emb": nn.Embedding(9, 3),
            "column": nn.Linear(1, 40),  # 40x1: a single column
            "pointwise": nn.Conv2d(1, 4, 1),  # 4x1 slice
        }
    )
    df, msgs = run(model)
    assert msgs == []
    assert df.loc["big", "status"] == "success"
    for name, evals in (("tiny", 4), ("tinier", 2), ("emb", 3)):
        assert df.loc[name, "status"] == "skipped", name
        assert df.loc[name, "skip_reason"] == f"{evals} eigenvalues < min_evals=10", name
        assert df.loc[name, "num_evals"] == evals
    assert (df.loc["tiny", "N"], df.loc["tiny", "M"]) == (5, 4)
    for name in ("column", "pointwise"):
        assert df.loc[name, "status"] == "skipped"
        assert "single column" in df.loc[name, "skip_reason"]
    assert bad_input_rows(df.reset_index().to_dict("records")) == []
    assert_consistent(df)


def test_extreme_aspect_ratios() -> None:
    tall_w = randn(20000, 12, seed=9) * 0.01  # Linear(12, 20000)
    wide_w = randn(12, 20000, seed=10) * 0.01  # Linear(20000, 12)
    model = nn.ModuleDict({"tall": linear_with(tall_w), "wide": linear_with(wide_w)})
    df, msgs = run(model)
    assert msgs == []
    for name, w in (("tall", tall_w), ("wide", wide_w)):
        row = df.loc[name]
        assert row["status"] == "success", row["skip_reason"]
        assert (row["N"], row["M"], row["num_slices"], row["num_evals"]) == (20000, 12, 1, 12)
        assert row["Q"] == pytest.approx(20000 / 12)
        ev = svd_evals(w) / 20000
        assert row["norm"] == pytest.approx(ev.sum(), rel=1e-5)
        assert row["spectral_norm"] == pytest.approx(ev.max(), rel=1e-5)
        assert math.isfinite(row["alpha"]) and row["matrix_rank"] == 12


# --------------------------------------------------------------------------------------------------------------------
# storage: half precision, integers, quantized, meta, lazy


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_upcast(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(11)
    # a heavy-ish tail so that alpha is a real fit: Gaussian bulk plus a few strong rank-1 directions
    w = 0.05 * torch.randn(300, 150, generator=g)
    w += 0.5 * torch.randn(300, 4, generator=g) @ torch.randn(4, 150, generator=g) / 12
    half = linear_with(w.to(dtype))
    ref = linear_with(w.to(dtype).float())  # the same (rounded) values in fp32
    assert half.weight.dtype == dtype
    dh, msgs = run(nn.ModuleDict({"x": half}))
    dr, _ = run(nn.ModuleDict({"x": ref}))
    h, r = dh.loc["x"], dr.loc["x"]
    assert msgs == []  # fp16/bf16 values are exact in float32: nothing to warn about, only a note
    assert h["note"] == f"upcast from {dtype} (exact)" and r["note"] == ""
    assert h["status"] == "success" and r["status"] == "success"
    assert h["dtype"] == str(dtype) and r["dtype"] == "torch.float32"
    assert h["precision"] in ("float32", "float64")
    assert math.isfinite(h["alpha"])
    assert h["alpha"] == pytest.approx(r["alpha"], rel=1e-3)
    for col in ("norm", "spectral_norm", "stable_rank", "entropy", "D"):
        assert h[col] == pytest.approx(r[col], rel=1e-3), col
    assert h["matrix_rank"] == r["matrix_rank"]
    ev = svd_evals(w.to(dtype).float()) / 300
    assert h["norm"] == pytest.approx(ev.sum(), rel=1e-5)
    assert h["spectral_norm"] == pytest.approx(ev.max(), rel=1e-5)
    assert half.weight.dtype == dtype  # not converted in place


def test_half_precision_conv() -> None:
    torch.manual_seed(12)
    conv = nn.Conv2d(16, 24, 3).to(torch.bfloat16)
    ref = nn.Conv2d(16, 24, 3)
    with torch.no_grad():
        ref.weight.copy_(conv.weight.float())
    dh, msgs = run(nn.ModuleDict({"c": conv}))
    dr, _ = run(nn.ModuleDict({"c": ref}))
    assert msgs == []
    assert dh.loc["c", "status"] == dr.loc["c", "status"] == "success"
    assert dh.loc["c", "alpha"] == pytest.approx(dr.loc["c", "alpha"], rel=1e-3)
    assert dh.loc["c", "norm"] == pytest.approx(dr.loc["c", "norm"], rel=1e-5)


def test_int8_parameter_is_skipped() -> None:
    torch.manual_seed(13)
    lin = nn.Linear(30, 20)
    lin.weight = nn.Parameter(torch.randint(-8, 8, (20, 30), dtype=torch.int8), requires_grad=False)
    model = nn.ModuleDict({"q": lin, "ok": nn.Linear(30, 20)})
    df, msgs = run(model)
    row = df.loc["q"]
    assert row["status"] == "skipped"
    assert "integer" in row["skip_reason"]
    assert row["dtype"] == "torch.int8"
    assert (row["N"], row["M"]) == (30, 20)
    assert df.loc["ok", "status"] == "success"
    assert warned_names(msgs) == {"q"}
    assert "integer" in msgs[0]


def quantized_model() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 96))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation chatter
        q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return model, q


def test_dynamically_quantized_linear_is_dequantized() -> None:
    model, q = quantized_model()
    assert "quantized" in type(q[0]).__module__
    df, msgs = run(q)
    assert len(msgs) == 1 and "3 weight matrices analyzed from low-precision weights" in msgs[0]
    assert "dequantized from torch.qint8" in msgs[0]
    assert list(df.index) == ["0", "2", "4"]  # the packed-params submodules are not matrices
    for name, (n_rows, m_cols) in (("0", (128, 64)), ("2", (128, 96)), ("4", (96, 96))):
        row = df.loc[name]
        assert row["layer_type"] == "quantized_linear"
        assert row["status"] == "success", row["skip_reason"]
        assert row["note"].startswith("low precision: dequantized from torch.qint8")
        assert row["dtype"] == "torch.qint8"
        assert (row["N"], row["M"]) == (n_rows, m_cols)
        deq = q[int(name)].weight().dequantize()
        ev = svd_evals(deq) / n_rows
        assert row["norm"] == pytest.approx(ev.sum(), rel=1e-5)
        assert row["spectral_norm"] == pytest.approx(ev.max(), rel=1e-5)
        # 8-bit rounding barely moves the spectrum of the float layer it came from
        ev_float = svd_evals(model[int(name)].weight) / n_rows
        assert row["norm"] == pytest.approx(ev_float.sum(), rel=1e-2)


@pytest.mark.parametrize(("dtype", "bits", "error"), [(torch.float8_e4m3fn, 3, "6.25 %"), (torch.float8_e5m2, 2, "12.5 %")])
def test_float8_is_analyzed_with_a_low_precision_warning(dtype: torch.dtype, bits: int, error: str) -> None:
    w = randn(512, 256, seed=21) / 16
    fp8 = linear_with(w.to(dtype))
    ref = linear_with(w.to(dtype).float())  # the same rounded values in fp32
    d8, msgs = run(nn.ModuleDict({"x": fp8, "ok": linear_with(randn(512, 256, seed=22))}))
    dr, ref_msgs = run(nn.ModuleDict({"x": ref}))
    assert ref_msgs == []
    assert len(msgs) == 1
    assert msgs[0].startswith("lightning-htsr: 1 weight matrices analyzed from low-precision weights: x (success: ")
    row = d8.loc["x"]
    assert row["status"] == "success" and row["skip_reason"] == ""
    assert row["dtype"] == str(dtype)
    assert row["note"].startswith(f"low precision: upcast from {dtype} ({bits} mantissa bits")
    assert error in row["note"]
    assert d8.loc["ok", "note"] == ""
    # analyzed exactly as the upcast values would be
    for col in ("alpha", "norm", "spectral_norm", "entropy", "stable_rank"):
        assert row[col] == pytest.approx(dr.loc["x", col], rel=1e-6), col
    # ... and 8-bit rounding of a Gaussian layer leaves it random-like
    assert row["phase"] == "random_like"


def test_low_precision_warning_is_given_once_per_matrix_with_seen() -> None:
    rows = [{"name": "a", "status": "success", "skip_reason": "", "note": "low precision: upcast from x"},
            {"name": "b", "status": "success", "skip_reason": "", "note": "upcast from torch.bfloat16 (exact)"}]
    seen: set[str] = set()
    with pytest.warns(UserWarning, match=r"1 weight matrices analyzed from low-precision weights: a \(success"):
        warn_bad_input(rows, seen=seen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_bad_input(rows, seen=seen)  # already reported in this run: silent


def test_meta_device_is_skipped() -> None:
    with torch.device("meta"):
        model = nn.ModuleDict({"fc": nn.Linear(32, 64), "conv": nn.Conv2d(3, 8, 3), "lstm": nn.LSTM(8, 16)})
    assert model["fc"].weight.device.type == "meta"
    df, msgs = run(model)
    assert len(df) >= 3
    assert (df["status"] == "skipped").all()
    assert df["skip_reason"].str.contains("meta").all()
    assert (df.loc["fc", "N"], df.loc["fc", "M"]) == (64, 32)
    assert {"fc", "conv"} <= warned_names(msgs)
    assert_consistent(df)


def test_meta_conv_skip_row_has_slice_shape() -> None:
    with torch.device("meta"):
        model = nn.ModuleDict({"conv": nn.Conv2d(3, 8, 3)})
    df, _ = run(model)
    assert (df.loc["conv", "N"], df.loc["conv", "M"]) == (8, 3)


def test_uninitialized_lazy_linear_is_skipped() -> None:
    torch.manual_seed(15)
    model = nn.ModuleDict({"lazy": nn.LazyLinear(16), "ok": nn.Linear(32, 64)})
    df, msgs = run(model)
    assert df.loc["lazy", "status"] == "skipped"
    assert "lazy" in df.loc["lazy", "skip_reason"]
    assert df.loc["ok", "status"] == "success"
    assert warned_names(msgs) == {"lazy"}


def test_initialized_lazy_linear_is_analyzed() -> None:
    torch.manual_seed(16)
    lazy = nn.LazyLinear(64)
    lazy(torch.zeros(1, 32))  # materializes the weight
    df, msgs = run(nn.ModuleDict({"lazy": lazy}))
    assert df.loc["lazy", "status"] == "success"
    assert (df.loc["lazy", "N"], df.loc["lazy", "M"]) == (64, 32)
    assert msgs == []


# --------------------------------------------------------------------------------------------------------------------
# overflow, mixtures, batching


def test_float32_overflow_is_recomputed_in_float64() -> None:
    w = randn(200, 100, seed=17)
    big = w * 1e25
    assert torch.isfinite(big).all()
    assert not torch.isfinite(big.T @ big).all()  # the premise: the float32 Gram overflows
    df, msgs = run(nn.ModuleDict({"huge": linear_with(big)}))
    row = df.loc["huge"]
    assert msgs == []
    assert row["status"] == "success", row["skip_reason"]
    assert row["precision"] == "float64"
    ev = svd_evals(big) / 200
    assert row["norm"] == pytest.approx(ev.sum(), rel=1e-6)
    assert row["spectral_norm"] == pytest.approx(ev.max(), rel=1e-6)
    # shape metrics are scale-free: same as the unscaled weights
    ref, _ = run(nn.ModuleDict({"huge": linear_with(w)}), precision="float64")
    for col in ("alpha", "D", "stable_rank", "entropy", "matrix_rank"):
        assert row[col] == pytest.approx(ref.loc["huge", col], rel=1e-6), col


def test_forced_float32_overflow_is_a_skip_not_an_exception() -> None:
    big = randn(200, 100, seed=18) * 1e25
    df, msgs = run(nn.ModuleDict({"huge": linear_with(big)}), precision="float32")
    assert df.loc["huge", "status"] in ("skipped", "degenerate")
    assert df.loc["huge", "skip_reason"]
    assert warned_names(msgs) == {"huge"}


def good_layers() -> dict[str, nn.Module]:
    torch.manual_seed(19)
    return {
        "fc": nn.Linear(100, 200),
        "conv": nn.Conv2d(8, 16, 3),
        "sq": nn.Linear(64, 64),
        "attn": nn.MultiheadAttention(32, 4),
    }


def bad_layers() -> dict[str, nn.Module]:
    torch.manual_seed(20)
    nan = nn.Linear(100, 200)  # same Gram size (100) as "fc": batched into the same eigvalsh call
    inf = nn.Conv2d(8, 16, 3)  # same slices as "conv"
    int8 = nn.Linear(64, 64)
    with torch.no_grad():
        nan.weight[0, 0] = float("nan")
        inf.weight[1, 1, 0, 0] = float("inf")
    int8.weight = nn.Parameter(torch.ones(64, 64, dtype=torch.int8), requires_grad=False)
    return {
        "nan": nan,
        "inf": inf,
        "zero": linear_with(torch.zeros(200, 100)),
        "rank1": linear_with(rank_one(200, 100, seed=21)),
        "int8": int8,
        "tiny": nn.Linear(3, 3),
        "dw": nn.Conv2d(8, 8, 3, groups=8),
    }


def test_mixed_model_good_rows_unaffected() -> None:
    good, bad = good_layers(), bad_layers()
    order = ["nan", "fc", "inf", "zero", "conv", "rank1", "sq", "int8", "tiny", "attn", "dw"]
    mixed = nn.ModuleDict({k: {**good, **bad}[k] for k in order})
    df, msgs = run(mixed)
    assert list(df.index) == [
        "nan", "fc", "inf", "zero", "conv", "rank1", "sq", "int8", "tiny",
        "attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v", "attn.out_proj", "dw",
    ]  # fmt: skip
    assert_consistent(df)
    expected_status = {"nan": "skipped", "inf": "skipped", "zero": "skipped", "rank1": "degenerate",
                       "int8": "skipped", "tiny": "skipped", "dw": "skipped"}
    for name, status in expected_status.items():
        assert df.loc[name, "status"] == status, name
    assert warned_names(msgs) == {"nan", "inf", "zero", "rank1", "int8"}
    assert msgs[0].startswith("lightning-htsr: 5 weight matrices not fully analyzed")

    for name, layer in good.items():
        alone, alone_msgs = run(nn.ModuleDict({name: layer}))
        assert alone_msgs == []
        for row_name, row in alone.iterrows():
            assert row["status"] == "success", row_name
            same_row(df.loc[row_name], row)


def test_one_warning_for_many_bad_layers() -> None:
    layers = {}
    for i in range(11):
        w = randn(40, 20, seed=100 + i)
        w[i, 0] = float("nan")
        layers[f"bad{i}"] = linear_with(w)
    layers["fine"] = linear_with(randn(40, 20, seed=99))
    df, msgs = run(nn.ModuleDict(layers))
    assert len(msgs) == 1
    assert msgs[0].startswith("lightning-htsr: 11 weight matrices not fully analyzed")
    assert "and 3 more" in msgs[0]  # the first 8 are named
    assert len(warned_names(msgs)) == 8
    assert (df.loc[[f"bad{i}" for i in range(11)], "status"] == "skipped").all()
    assert df.loc["fine", "status"] == "success"


def test_warn_bad_input_helpers() -> None:
    rows = [
        {"name": "a", "status": "success", "skip_reason": ""},
        {"name": "b", "status": "skipped", "skip_reason": "12 eigenvalues < min_evals=50"},
        {"name": "c", "status": "skipped", "skip_reason": "900 eigenvalues > max_evals=100"},
        {"name": "d", "status": "skipped", "skip_reason": "slices are 1x1: a single column has no spectrum to speak of"},
        {"name": "e", "status": "skipped", "skip_reason": "non-finite weights (NaN or Inf)"},
        {"name": "f", "status": "degenerate", "skip_reason": "power-law fit: too few"},
    ]
    assert [r["name"] for r in bad_input_rows(rows)] == ["e", "f"]
    with pytest.warns(UserWarning, match=r"2 weight matrices not fully analyzed: e \(skipped: non-finite"):
        warn_bad_input(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_bad_input(rows[:4])  # routine skips only: silent


@pytest.mark.parametrize("precision", ["auto", "float32", "float64"])
def test_compute_spectra_one_bad_matrix_does_not_spoil_the_batch(precision: str) -> None:
    good1 = randn(1, 60, 20, seed=30)
    good2 = randn(3, 40, 20, seed=31)  # same Gram size 20: same batch as good1 and the bad ones
    good3 = randn(1, 50, 10, seed=32)
    nan = randn(1, 60, 20, seed=33)
    nan[0, 5, 5] = float("nan")
    inf = randn(2, 30, 20, seed=34)
    inf[1, 0, 0] = float("inf")
    stacks = [good1, nan, good2, inf, good3]
    spectra = compute_spectra(stacks, precision=precision)
    assert [sp.ok for sp in spectra] == [True, False, True, False, True]
    for i in (1, 3):
        assert "non-finite" in spectra[i].error
        assert spectra[i].eigenvalues.numel() == 0
    for i in (0, 2, 4):
        sp = spectra[i]
        alone = compute_spectra([stacks[i]], precision=precision)[0]
        assert torch.equal(sp.eigenvalues, alone.eigenvalues)
        assert sp.precision == alone.precision
        expected = np.sort(np.concatenate([svd_evals(s) for s in stacks[i]]))
        assert sp.eigenvalues.dtype == torch.float64 and sp.eigenvalues.shape == (expected.size,)
        rtol = 1e-9 if sp.precision == "float64" else 1e-4
        np.testing.assert_allclose(sp.eigenvalues.numpy(), expected, rtol=rtol, atol=rtol * expected.max())
    # the batch without the bad matrices gives the same numbers
    clean = compute_spectra([good1, good2, good3], precision=precision)
    for sp, i in zip(clean, (0, 2, 4)):
        assert torch.equal(sp.eigenvalues, spectra[i].eigenvalues)


def test_functional_eigenvalues_raises_on_nan() -> None:
    """The single-matrix helper is documented to raise (analyze is the one that never does)."""
    w = randn(30, 20, seed=40)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        functional.eigenvalues(w)


def test_which_skips_warn_depends_on_the_skip_kind_not_the_wording() -> None:
    """Rewording every ``skip_reason`` changes nothing: warnings, ww_compat's selection and the float64 redo read
    the :class:`~lightning_htsr.weights.matrix.SkipKind` (``skip_kind`` column)."""
    from dataclasses import replace

    from lightning_htsr.analysis import is_routine_skip
    from lightning_htsr.spectra.eigenvalues import Spectrum, _needs_float64
    from lightning_htsr.weights.matrix import SkipKind
    from lightning_htsr.weights.modules import weight_matrices
    from lightning_htsr.weights.ww_select import ww_select

    bad = randn(40, 20, seed=7)
    bad[0, 0] = float("nan")
    model = nn.ModuleDict({"tiny": nn.Linear(5, 8), "col": nn.Linear(1, 30), "bad": linear_with(bad),
                           "zero": linear_with(torch.zeros(40, 20)), "fine": nn.Linear(64, 96)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        records = lightning_htsr.analyze(model).to_dict("records")
    kinds = {r["name"]: r["skip_kind"] for r in records}
    assert kinds == {"tiny": "too_few_evals", "col": "single_column", "bad": "non_finite", "zero": "all_zero",
                     "fine": ""}
    reworded = [{**r, "skip_reason": f"reworded {i}" if r["skip_reason"] else ""} for i, r in enumerate(records)]
    assert [r["name"] for r in bad_input_rows(reworded)] == [r["name"] for r in bad_input_rows(records)] == [
        "bad", "zero"]
    assert [is_routine_skip(r) for r in reworded] == [True, True, False, False, False]
    # ww_compat gives single-column Conv2d slices back by kind, whatever the sentence says
    conv = nn.Sequential(nn.Conv2d(1, 128, (64, 1)))
    mats = [replace(m, skip_reason="reworded") if m.skip_reason else m for m in weight_matrices(conv)]
    assert [m.skip_kind for m in mats] == [SkipKind.SINGLE_COLUMN]
    assert ww_select(conv, mats)[0].skip_reason is None
    # the float64 redo of a float32 failure is decided by its kind
    failed = Spectrum(torch.zeros(0, dtype=torch.float64), "float32", "gram", math.nan, math.nan, "reworded",
                      error_kind=SkipKind.SOLVER_FAILED)
    assert _needs_float64(failed) and not _needs_float64(replace(failed, error_kind=SkipKind.NON_FINITE))
