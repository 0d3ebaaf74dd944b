"""The ``analyze`` command's weightwatcher options and backend errors, through ``main([...])`` on real files."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from lightning_htsr.views.cli import main

HAS_CUPY = importlib.util.find_spec("cupy") is not None


def run(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48))
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed here")
@pytest.mark.parametrize("extra", [[], ["--device", "cpu"]])
def test_backend_cupy_without_cupy_or_cuda_is_one_line_and_exit_2(extra, checkpoint, capsys) -> None:
    code, out, err = run(capsys, "analyze", checkpoint, "--backend", "cupy", *extra)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("lightning-htsr: error: --backend cupy: ")


@pytest.mark.skipif(HAS_CUPY or not torch.cuda.is_available(), reason="needs CUDA without CuPy")
def test_backend_cupy_on_cuda_without_cupy_names_the_extra(checkpoint, capsys) -> None:
    code, _, err = run(capsys, "analyze", checkpoint, "--backend", "cupy", "--device", "cuda")
    assert code == 2 and "lightning-htsr[cupy]" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_gpu_is_one_line_and_exit_2(checkpoint, capsys) -> None:
    code, _, err = run(capsys, "analyze", checkpoint, "--device", "cuda", "--backend", "cupy")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no CUDA device" in err


@pytest.mark.parametrize("argv, kwargs", [
    (["--randomize", "--seed", "3"], {"randomize": True, "seed": 3}),
    (["--fix-fingers", "clip_xmax", "--finger-thresh", "0.5", "--max-fingers", "40"],
     {"fix_fingers": "clip_xmax", "finger_thresh": 0.5, "max_fingers": 40}),
    (["--xmax", "-2", "--ww-compat"], {"xmax": -2, "ww_compat": True}),
    (["--xmax", "3.5"], {"xmax": 3.5}),
])
def test_weightwatcher_options_reach_the_analysis(argv, kwargs, checkpoint, tmp_path, capsys) -> None:
    import pandas as pd

    from lightning_htsr import analyze_state_dict

    code, _, err = run(capsys, "analyze", checkpoint, *argv, "--csv", tmp_path / "t.csv")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "t.csv")
    expected = analyze_state_dict(torch.load(checkpoint), **kwargs)
    for column in ["alpha", "xmin", "xmax", "D", *[c for c in ("num_fingers", "raw_alpha", "rand_alpha")
                                                   if c in expected.columns]]:
        assert column in table.columns
        assert table[column].to_numpy(float) == pytest.approx(expected[column].to_numpy(float), rel=1e-12,
                                                              nan_ok=True), column


@pytest.mark.parametrize("argv, message", [
    (["--fix-fingers", "clip_xmax", "--xmax", "-2"], "can not be combined with xmax"),
    (["--xmax", "0"], "xmax can not be 0"),
    (["--xmax", "abc"], "not a number"),
    (["--fix-fingers", "clip"], "invalid choice"),
])
def test_bad_weightwatcher_options_exit_2_in_one_line(argv, message, checkpoint, capsys) -> None:
    code, _, err = run(capsys, "analyze", checkpoint, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_plots_with_a_truncated_fit_write_esds_without_fit_diagnostics(tmp_path, capsys) -> None:
    pytest.importorskip("powerlaw")
    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    torch.save({"fc.weight": torch.randn(40, 20)}, path)
    code, _, err = run(capsys, "analyze", path, "--fit", "TPL", "--plots", tmp_path / "p", "--csv", tmp_path / "t.csv")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "p").glob("*.png")) == ["esd_fc.png"]
    assert "Lambda" in (tmp_path / "t.csv").read_text().splitlines()[0]
