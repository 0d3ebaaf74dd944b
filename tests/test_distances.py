"""``lightning_htsr.distances`` / ``lightning-htsr distances`` and ``lightning-htsr compare``: exact properties,
agreement with weightwatcher 0.7.7's ``distances()`` where the conventions coincide, unmatched rows, streaming, and
the command line (CSV/JSON, bad files)."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lightning_htsr as htsr
from lightning_htsr import pairs
from lightning_htsr.analysis import AnalysisOptions
from lightning_htsr.compare import alpha_hat, compare_models
from lightning_htsr.views.cli import main


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.Conv2d(3, 8, 3), nn.Conv2d(16, 8, 3),
                         nn.Embedding(100, 24))


def save(m: nn.Module | dict, path) -> str:
    sd = m.state_dict() if isinstance(m, nn.Module) else m
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def test_a_model_and_itself_are_at_distance_0_with_similarity_1() -> None:
    m = model()
    frame = htsr.distances(m, copy.deepcopy(m))
    assert frame["name"].tolist() == ["0", "2", "3", "4", "5"]
    assert (frame["status"] == "success").all()
    assert (frame["frobenius"] == 0).all() and (frame["relative"] == 0).all()
    np.testing.assert_allclose(frame[["cosine", "cka"]].to_numpy(float), 1.0, rtol=1e-12)


def test_w_against_2w_is_half_relative_and_fully_similar() -> None:
    m = model()
    doubled = {k: 2 * v for k, v in m.state_dict().items()}
    frame = htsr.distances(m.state_dict(), doubled)
    np.testing.assert_allclose(frame["relative"], 0.5, rtol=1e-12)
    np.testing.assert_allclose(frame["cosine"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(frame["frobenius"], frame["norm_a"], rtol=1e-12)  # ||W - 2W|| = ||W||
    negated = htsr.distances(m.state_dict(), {k: -v for k, v in m.state_dict().items()})
    np.testing.assert_allclose(negated["cosine"], -1.0, rtol=1e-12)
    np.testing.assert_allclose(negated["relative"], 2.0, rtol=1e-12)


def test_agrees_with_weightwatcher_distances_where_conventions_coincide() -> None:
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    a, b = model(0), model(1)
    ours = htsr.distances(a, b).set_index("name")
    watcher = ww.WeightWatcher()
    raw = watcher.distances(a, b, method="raw")[2].set_index("name")["delta_W"]
    cka = watcher.distances(a, b, method="cka")[2].set_index("name")["delta_W"]
    names = ["0", "2", "3", "4", "5"]
    np.testing.assert_allclose(ours.loc[names, "frobenius"], raw.loc[names].astype(float), rtol=1e-5)
    # cka: convolutions (tall slices in both) and Linear/Embedding layers with out >= in; weightwatcher keeps the
    # out x in layout of the 16 x 64 Linear "2" and so contracts its longer side
    same = ["0", "3", "4", "5"]
    np.testing.assert_allclose(ours.loc[same, "cka"], cka.loc[same].astype(float), rtol=1e-5)
    assert abs(ours.loc["2", "cka"] - cka.loc["2"]) > 0.1


def test_unmatched_names_and_shapes_are_rows_with_a_reason() -> None:
    a = dict(model().state_dict())
    b = dict(a)
    a["only_a.weight"] = torch.randn(20, 10)
    b["only_b.weight"] = torch.randn(20, 10)
    b["0.weight"] = torch.randn(32, 64)  # transposed: same tall shape, not the same matrix
    frame = htsr.distances(a, b).set_index("name")
    assert frame.loc["0", ["status", "reason"]].tolist() == ["unmatched", "shape 64x32 here, 32x64 in B"]
    assert frame.loc["only_a", "reason"] == "not in B"
    assert frame.loc["only_b", ["status", "reason"]].tolist() == ["unmatched", "only in B"]
    assert list(frame.index)[-1] == "only_b"  # A's matrices first, in order, then B's extra ones
    assert np.isnan(frame.loc["only_a", "frobenius"])
    assert (frame.loc[["2", "3", "4", "5"], "frobenius"] == 0).all()


def test_checkpoints_are_streamed_and_equal_the_modules(tmp_path, monkeypatch) -> None:
    a, b = model(0), model(1)
    path_a, path_b = save(a, tmp_path / "a.safetensors"), tmp_path / "b.pt"
    torch.save({"state_dict": b.state_dict()}, path_b)  # a Lightning-style nesting
    reads: list[str] = []
    read = pairs._TensorReader.read
    monkeypatch.setattr(pairs._TensorReader, "read", lambda self, info: reads.append(info.name) or read(self, info))
    from_files = htsr.distances(path_a, path_b)
    from_modules = htsr.distances(a, b)
    numbers = ["N", "M", "num_slices", "frobenius", "relative", "cosine", "cka", "norm_a", "norm_b"]
    assert from_files["name"].tolist() == from_modules["name"].tolist()
    pd.testing.assert_frame_equal(from_files[numbers], from_modules[numbers], rtol=1e-12)
    assert reads == ["0.weight", "2.weight", "3.weight", "4.weight", "5.weight"]


def test_cli_distances_prints_and_writes_csv_and_json(tmp_path, capsys) -> None:
    a = save(model(0), tmp_path / "a.safetensors")
    sd = dict(model(0).state_dict())
    sd["2.weight"] = 2 * sd["2.weight"]
    b = save(sd, tmp_path / "b.safetensors")
    code = main(["distances", a, b, "--csv", str(tmp_path / "d.csv"), "--json", str(tmp_path / "d.json")])
    out, err = capsys.readouterr()
    assert code == 0 and "frobenius" in out and "5 of 5 matrices paired" in out
    table = pd.read_csv(tmp_path / "d.csv").set_index("name")
    assert table.loc[2, "relative"] == pytest.approx(0.5) and table.loc[0, "relative"] == 0
    records = json.loads((tmp_path / "d.json").read_text())
    assert [r["name"] for r in records] == ["0", "2", "3", "4", "5"]
    assert "wrote" in err


@pytest.mark.parametrize("command", ["distances", "compare"])
def test_cli_bad_file_is_one_line_and_exit_2(command: str, tmp_path, capsys) -> None:
    good = save(model(), tmp_path / "a.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    code = main([command, good, str(tmp_path / "bad.safetensors")])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "bad.safetensors" in err and "Traceback" not in err


def test_compare_rows_are_the_summaries_with_alpha_hat_in_the_w_t_w_convention(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    paths = []
    weights = {"a.weight": torch.randn(512, 256), "b.weight": torch.randn(256, 128)}
    for i, scale in enumerate((1.0, 3.0)):
        paths.append(save({k: v * scale for k, v in weights.items()}, tmp_path / f"m{i}.safetensors"))
    code = main(["compare", *paths, "--csv", str(tmp_path / "c.csv")])
    out, _ = capsys.readouterr()
    assert code == 0 and "alpha_hat" in out and "m1.safetensors" in out
    table = pd.read_csv(tmp_path / "c.csv")
    for path, row in zip(paths, table.to_dict("records")):
        frame = htsr.analyze_checkpoint(path)
        summary = htsr.summarize(frame)
        assert row["alpha"] == pytest.approx(summary["alpha"]) and row["classified"] == 2
        assert row["log_norm"] == pytest.approx(summary["log_norm"])
        assert row["n_random_like"] == 2
        # alpha-hat: alpha * log10 lambda_max(W^T W), lambda_max = sigma_max^2 of the stored matrix
        sd = load_file(path)
        sigma = [float(torch.linalg.svdvals(sd[f"{n}.weight"])[0]) for n in frame["name"]]
        expected = np.mean(frame["alpha"].to_numpy(float) * np.log10(np.square(sigma)))
        assert row["alpha_hat"] == pytest.approx(expected, rel=1e-5)
    # scaling W by 3 leaves alpha alone and moves alpha-hat by alpha * log10 9
    assert table["alpha"][0] == pytest.approx(table["alpha"][1], rel=1e-4)
    assert table["alpha_hat"][1] - table["alpha_hat"][0] == pytest.approx(table["alpha"][0] * np.log10(9), rel=1e-3)


def test_alpha_hat_under_ww_compat_is_weightwatchers_alpha_weighted() -> None:
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    m = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256))
    ours = htsr.analyze(m, ww_compat=True)
    theirs = ww.WeightWatcher(model=m).analyze()
    np.testing.assert_allclose(alpha_hat(ours, AnalysisOptions.weightwatcher()), theirs["alpha_weighted"],
                               rtol=1e-6)
    default = htsr.analyze(m, fit="exact", min_tail=2)  # W^T W / N, alpha as weightwatcher's on these layers
    np.testing.assert_allclose(alpha_hat(default, AnalysisOptions()) / default["alpha"],
                               theirs["alpha_weighted"] / theirs["alpha"], rtol=1e-5)  # log10 lambda_max(W^T W)


def test_compare_models_takes_modules_and_state_dicts() -> None:
    m = model()
    frame = compare_models([m, m.state_dict()], labels=["module", "state dict"])
    assert frame["model"].tolist() == ["module", "state dict"]
    np.testing.assert_allclose(frame["alpha"][0], frame["alpha"][1], rtol=1e-9)


@pytest.mark.parametrize("what", ["deltas", "distances"])
def test_peak_memory_of_two_streamed_checkpoints_is_a_few_matrices(what: str, tmp_path) -> None:
    """Two checkpoints of 6 bf16 tensors of 24 MiB (144 MiB each on disk, 288 MiB each in float32): reading both
    whole and upcasting would add >= 864 MiB; streaming adds one read budget per file plus a few matrices (measured:
    about 250 MiB for distances with cka, 360 MiB for deltas, whose eigenvalue analysis needs more)."""
    gen = torch.Generator().manual_seed(1)
    base = {f"layers.{i}.weight": torch.randn(65536, 192, generator=gen, dtype=torch.bfloat16) for i in range(6)}
    save(base, tmp_path / "base.safetensors")
    save({k: (v.float() + torch.randn(65536, 2, generator=gen) @ torch.randn(2, 192, generator=gen)).bfloat16()
          for k, v in base.items()}, tmp_path / "ft.safetensors")
    call = {"deltas": "htsr.analyze_checkpoint({ft!r}, base={base!r})", "distances": "htsr.distances({ft!r}, {base!r})"}
    script = textwrap.dedent(f"""
        import warnings, torch, lightning_htsr as htsr
        from safetensors.torch import save_file
        warnings.simplefilter("ignore")
        def status_mib(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
        save_file({{"warm.weight": torch.randn(64, 32)}}, {str(tmp_path / "warm.safetensors")!r})
        warm = {str(tmp_path / "warm.safetensors")!r}
        htsr.analyze_checkpoint(warm, base=warm), htsr.distances(warm, warm)  # imports everything
        before = status_mib("VmRSS")
        table = {call[what].format(ft=str(tmp_path / "ft.safetensors"), base=str(tmp_path / "base.safetensors"))}
        assert len(table) == 6, table
        print(status_mib("VmHWM") - before)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    added = float(result.stdout.strip().splitlines()[-1])
    assert added < 450, f"{what} added {added:.0f} MiB for two 144 MiB bf16 checkpoints"
