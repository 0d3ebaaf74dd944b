"""Smoke test of examples/batch_size_phases.py, tiny and in-process: batch sizes 2 and 256, 3 epochs, 1 seed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "batch_size_phases.py"


def load_example():
    spec = importlib.util.spec_from_file_location("batch_size_phases", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_batch_size_run_writes_figure_and_table(tmp_path):
    example = load_example()
    summary = example.main(["--batch-sizes", "2", "256", "--epochs", "3", "--seeds", "1", "--jobs", "1",
                            "--out", str(tmp_path)])

    png, md = tmp_path / "batch_size_phases.png", tmp_path / "batch_size_phases.md"
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| layer |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["layer", "batch size", "steps", "alpha", "entropy", "mp_softrank", "stable_rank",
                       "phase (count / seeds)", "train acc", "test acc"]
    assert text.count("| fc1 (512x64) |") == 2 and text.count("| fc2 (512x512) |") == 2
    assert "## Discussion" in text

    assert set(summary["layer"]) == {"fc1", "fc2"}
    assert sorted(summary["batch_size"].unique()) == [2, 256]
    assert summary[["alpha", "entropy", "mp_softrank", "stable_rank"]].notna().all().all()
    # same number of epochs, so the smaller batch takes ~100x more steps (the point of the experiment)
    steps = summary.drop_duplicates("batch_size").set_index("batch_size")["steps"]
    assert steps[2] == 3 * 674 and steps[256] == 3 * 6

    # Even after 3 epochs the small-batch fc1 grows eigenvalues above the MP edge (soft rank < ~0.98, vs ~1.02 at
    # batch 256; margin >= 0.03 on seeds 0-5). The alpha of fc2 is not asserted: at this size both runs are
    # random-like and their alphas (4-22) are noise.
    fc1 = summary[summary["layer"] == "fc1"].set_index("batch_size")["mp_softrank"]
    assert fc1[2] < fc1[256] - 0.01
