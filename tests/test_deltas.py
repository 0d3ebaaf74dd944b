"""Base-model deltas (``analyze(model, base_model=...)``, ``analyze_checkpoint(path, base=...)``, ``--base``): matched
by name and shape, both sides streamed, unmatched / unchanged / low-rank deltas as rows saying why, and agreement
with weightwatcher 0.7.7's ``base_model=``."""

from __future__ import annotations

import copy
import logging
import os

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lightning_htsr as htsr
from lightning_htsr import pairs
from lightning_htsr.views.cli import main
from lightning_htsr.weights.matrix import SkipKind


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Conv2d(16, 32, 3),
                         nn.Linear(128, 10))


def fine_tuned(base: nn.Module, *, rank: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``base`` with a known rank-``rank`` update of layer 0 (a merged LoRA), a full-rank update of layer 2 and
    the conv, and the head unchanged."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        b, a = torch.randn(256, rank, generator=g) * 0.1, torch.randn(rank, 128, generator=g) * 0.1
        ft[0].weight.copy_(base[0].weight + b @ a)
        ft[2].weight.add_(torch.randn(128, 256, generator=g) * 0.01)
        ft[4].weight.add_(torch.randn(32, 16, 3, 3, generator=g) * 0.01)
    return ft.to(dtype)


def by_name(frame: pd.DataFrame) -> dict[str, dict]:
    return {str(r["name"]): r for r in frame.to_dict("records")}


def test_rank_2_update_is_a_low_rank_delta_row_and_full_updates_are_analyzed() -> None:
    base = base_model()
    with pytest.warns(UserWarning, match="low-rank delta: rank 2 of 128"):
        rows = by_name(htsr.analyze(fine_tuned(base), base_model=base))
    low = rows["0"]
    assert (low["status"], low["skip_kind"]) == ("skipped", SkipKind.LOW_RANK_DELTA.value)
    assert "low-rank delta: rank 2 of 128" in low["skip_reason"]
    assert low["matrix_rank"] == 2 and np.isnan(low["alpha"]) and pd.isna(low["phase"])  # no fit of the noise
    assert rows["2"]["status"] == "success" and rows["2"]["matrix_rank"] == 128 and np.isfinite(rows["2"]["alpha"])
    assert rows["4"]["status"] == "success" and rows["4"]["note"] == "W - W_base"
    assert (rows["5"]["status"], rows["5"]["skip_kind"]) == ("skipped", "unchanged")


def test_options_deltas_do_not_apply_are_refused_not_ignored() -> None:
    base = base_model()
    with pytest.raises(ValueError, match="layers cannot be combined with a base model"):
        htsr.analyze(fine_tuned(base), base_model=base, layers=[1])
    with pytest.raises(ValueError, match="lora cannot be combined with a base model"):
        htsr.analyze(fine_tuned(base), base_model=base, lora="delta")
    with pytest.raises(ValueError, match="adapter_config cannot be combined with a base model"):
        htsr.analyze_state_dict(fine_tuned(base).state_dict(), base=base.state_dict(), adapter_config={"r": 8})


def test_delta_of_the_model_itself_is_unchanged_everywhere_and_routine() -> None:
    base = base_model()
    frame = htsr.analyze(copy.deepcopy(base), base_model=base)  # no warning: unchanged is routine
    assert set(frame["skip_kind"]) == {"unchanged"} and len(frame) == 4


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_merged_lora_in_bfloat16_is_still_low_rank(rank: int) -> None:
    """bf16 rounding of the merged weight adds full-rank noise many decades below the update: the near-zero
    cluster of the phase classifier separates it, so the row still says rank r."""
    base = base_model()
    with pytest.warns(UserWarning, match="low-rank delta"):
        row = by_name(htsr.analyze(fine_tuned(base, rank=rank, dtype=torch.bfloat16),
                                   base_model=base.to(torch.bfloat16)))["0"]
    assert row["skip_kind"] == "low_rank_delta" and f"rank {rank} of 128" in row["skip_reason"]


def test_a_wide_update_of_rank_60_is_low_rank_by_its_near_zero_cluster() -> None:
    base = base_model()
    with pytest.warns(UserWarning, match="rank 60 of 128"):
        row = by_name(htsr.analyze(fine_tuned(base, rank=60), base_model=base))["0"]
    assert row["skip_kind"] == "low_rank_delta"


def test_unmatched_matrices_are_rows_with_a_reason() -> None:
    base = base_model()
    sd = dict(fine_tuned(base).state_dict())
    sd["5.weight"] = torch.randn(12, 128)  # a resized head
    sd["extra.weight"] = torch.randn(64, 64)  # a new layer
    with pytest.warns(UserWarning, match="low-rank"):
        rows = by_name(htsr.analyze_state_dict(sd, base=base.state_dict()))
    assert rows["5"]["skip_kind"] == "unmatched" and rows["5"]["skip_reason"] == (
        "no delta: shape 12x128 here, 10x128 in the base model")
    assert rows["extra"]["skip_reason"] == "no delta: not in the base model"
    assert rows["2"]["status"] == "success"


def test_transposed_weight_of_the_same_tall_shape_is_not_matched() -> None:
    sd = {"w.weight": torch.randn(64, 128)}
    frame = htsr.analyze_state_dict(sd, base={"w.weight": torch.randn(128, 64)})
    assert frame["skip_reason"].tolist() == ["no delta: shape 64x128 here, 128x64 in the base model"]


def test_checkpoint_deltas_equal_the_module_deltas_and_read_each_base_tensor_once(tmp_path, monkeypatch) -> None:
    base = base_model()
    ft = fine_tuned(base)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    torch.save(ft.state_dict(), tmp_path / "ft.pt")
    reads: list[str] = []
    read = pairs._TensorReader.read
    monkeypatch.setattr(pairs._TensorReader, "read", lambda self, info: reads.append(info.name) or read(self, info))
    with pytest.warns(UserWarning, match="low-rank"):
        from_files = htsr.analyze_checkpoint(tmp_path / "ft.pt", base=tmp_path / "base.safetensors")
    with pytest.warns(UserWarning, match="low-rank"):
        from_modules = htsr.analyze(ft, base_model=base)
    assert from_files["name"].tolist() == from_modules["name"].tolist()
    np.testing.assert_allclose(from_files["alpha"].to_numpy(float), from_modules["alpha"].to_numpy(float),
                               rtol=1e-9, equal_nan=True)
    assert from_files["skip_kind"].tolist() == from_modules["skip_kind"].tolist()
    assert reads == ["0.weight", "2.weight", "4.weight", "5.weight"]  # one tensor at a time, each once


def test_fused_qkv_is_split_then_deltaed_reading_the_base_tensor_once(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    base = nn.MultiheadAttention(64, 4)
    ft = copy.deepcopy(base)
    with torch.no_grad():
        ft.in_proj_weight.add_(torch.randn(192, 64) * 0.01)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    save_file({k: v.contiguous() for k, v in ft.state_dict().items()}, str(tmp_path / "ft.safetensors"))
    reads: list[str] = []
    read = pairs._TensorReader.read
    monkeypatch.setattr(pairs._TensorReader, "read", lambda self, info: reads.append(info.name) or read(self, info))
    frame = htsr.analyze_checkpoint(tmp_path / "ft.safetensors", base=tmp_path / "base.safetensors", min_evals=20)
    assert frame["name"].tolist()[:3] == ["in_proj.q", "in_proj.k", "in_proj.v"]
    assert frame["status"].tolist()[:3] == ["success"] * 3
    assert reads.count("in_proj_weight") == 1
    module_rows = htsr.analyze(ft, base_model=base, min_evals=20)
    np.testing.assert_allclose(frame["alpha"].to_numpy(float), module_rows["alpha"].to_numpy(float), rtol=1e-9,
                               equal_nan=True)


def test_agrees_with_weightwatcher_base_model() -> None:
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    base = base_model()
    ft = copy.deepcopy(base)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in ft.parameters():  # a full-rank, heavy-tailed update: weightwatcher fits it as we do
            p.add_(torch.distributions.StudentT(3.0).sample(p.shape) * 0.01)
    ours = htsr.analyze(ft, base_model=base, ww_compat=True)
    theirs = ww.WeightWatcher(model=ft, base_model=base).analyze()
    assert ours["name"].tolist() == theirs["name"].astype(str).tolist()
    for column in ("alpha", "D", "log_norm", "log_spectral_norm", "alpha_weighted", "stable_rank", "entropy"):
        np.testing.assert_allclose(ours[column].to_numpy(float), theirs[column].to_numpy(float), rtol=1e-6,
                                   err_msg=column)


def test_cli_base_prints_the_low_rank_row_and_writes_the_table(tmp_path, capsys) -> None:
    base = base_model()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    torch.save(fine_tuned(base).state_dict(), tmp_path / "ft.pt")
    code = main(["analyze", str(tmp_path / "ft.pt"), "--base", str(tmp_path / "base.safetensors"), "--csv",
                 str(tmp_path / "d.csv")])
    out, err = capsys.readouterr()
    assert code == 0
    assert "low-rank delta: rank 2 of 128" in out and "unchanged" in out
    assert "note: 1 matrices not fully analyzed" in err
    table = pd.read_csv(tmp_path / "d.csv")
    assert table["skip_kind"].fillna("").tolist() == ["low_rank_delta", "", "", "unchanged"]


@pytest.mark.parametrize("bad", ["missing.pt", "text.pt"])
def test_cli_bad_base_file_is_one_line_and_exit_2(bad: str, tmp_path, capsys) -> None:
    torch.save(base_model().state_dict(), tmp_path / "ft.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    code = main(["analyze", str(tmp_path / "ft.pt"), "--base", str(tmp_path / bad)])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lightning-htsr: error: ") and bad in err
    assert "Traceback" not in err and os.fspath(tmp_path) in err
