"""The ``analyze`` command's weightwatcher options and backend errors, through ``main([...])`` on real files."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from lightning_htsr.cli import main

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
    code, out, err = run(capsys, "analyze", checkpoint, "--backend", "cupy", "--device", "cuda")
    assert code == 2 and "lightning-htsr[cupy]" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_gpu_is_one_line_and_exit_2(checkpoint, capsys) -> None:
    code, out, err = run(capsys, "analyze", checkpoint, "--device", "cuda", "--backend", "cupy")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no CUDA device" in err
