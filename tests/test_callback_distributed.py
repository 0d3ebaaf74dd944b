"""DDP (2 CPU processes, gloo) and FSDP2 (ModelParallelStrategy, DTensor weights) give the same per-matrix results as
one process, each rank analyzes its own share, and all ranks stop together; a peft LoRA fine-tune too (the factors
sharded under FSDP2), whose live analysis is that of the weights merged by hand.

All four configurations run in one invocation of tests/distributed_run.py in a subprocess (Lightning's ``ddp`` and
``ModelParallelStrategy`` launchers re-execute ``sys.argv``, which inside pytest would re-run the test session); ddp and
fsdp2 share the same two processes, so the module pays four Python start-ups instead of eight.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).with_name("distributed_run.py")
MODES = ("single", "ddp", "ddp_spawn", "fsdp2")
# global_step differs by design: each DDP rank takes half the batches of the single process
COMPARED = ["analysis", "epoch", "trigger", "name", "N", "M", "status", "alpha", "D", "entropy",
            "stable_rank", "num_spikes", "phase", "smoothed_phase"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    if not __import__("torch").distributed.is_available():
        pytest.skip("torch.distributed is not available")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    folder = tmp_path_factory.mktemp("distributed")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(folder)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=str(SCRIPT.parent))
    assert proc.returncode == 0, f"distributed runs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {mode: folder / mode for mode in MODES}


def history(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "htsr_history.csv")


def result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


@pytest.mark.parametrize("mode", ["ddp", "ddp_spawn", "fsdp2"])
def test_same_per_matrix_results_as_one_process(runs: dict[str, Path], mode: str) -> None:
    single, other = history(runs["single"]), history(runs[mode])
    assert len(single) == len(other) > 0
    pd.testing.assert_frame_equal(single[COMPARED].reset_index(drop=True), other[COMPARED].reset_index(drop=True),
                                  check_exact=False, rtol=1e-6)


@pytest.mark.parametrize("mode", ["ddp", "ddp_spawn", "fsdp2"])
def test_each_rank_analyzes_a_disjoint_share(runs: dict[str, Path], mode: str) -> None:
    h = history(runs[mode])
    per_analysis = h[h.analysis == 0]
    assert set(per_analysis["rank"]) == {0, 1}
    assert per_analysis["name"].is_unique  # every matrix once: no rank duplicates another's work
    # the assignment is stable across analyses
    owners = h.groupby("name")["rank"].nunique()
    assert (owners == 1).all()


@pytest.mark.parametrize("mode", ["ddp", "ddp_spawn", "fsdp2"])
def test_ranks_agree_on_the_stop(runs: dict[str, Path], mode: str) -> None:
    one, other = result(runs["single"]), result(runs[mode])
    assert other["world_size"] == 2
    assert other["stopped_epoch"] == one["stopped_epoch"] == 2
    if mode != "ddp_spawn":  # ddp_spawn does not send the loop's progress back to the parent process
        assert other["current_epoch"] == one["current_epoch"]
    for key in ("htsr/alpha_mean", "htsr/entropy_mean", "htsr/frac_heavy_tailed"):
        assert other["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6)


def test_fsdp2_weights_are_dtensors(runs: dict[str, Path]) -> None:
    assert result(runs["fsdp2"])["dtensor"] is True
    assert result(runs["ddp"])["dtensor"] is False


@pytest.mark.parametrize("mode", ["single", "ddp", "fsdp2"])
def test_every_rank_hands_back_the_best_weights_after_an_over_fitting_stop_also_after_a_resume(
        runs: dict[str, Path], mode: str) -> None:
    reports = [json.loads(f.read_text()) for f in sorted(runs[mode].glob("restore_rank*.json"))]
    assert len(reports) == (1 if mode == "single" else 2)
    for report in reports:
        assert report["reason"] == "OVERFITTING" and report["restored"]
        assert report["best_epoch"] < report["stopped_epoch"]
        assert report["equal_to_best"] and report["differs_from_last"]
        # interrupted after its best analysis and resumed: the same stop, the same weights handed back (each rank
        # read its own kept file: under FSDP2 the shards differ)
        assert report["resumed_stopped_epoch"] == report["stopped_epoch"] and report["resumed_restored"]
        assert report["resumed_equal"] and report["kept_file"] == "htsr_best_weights.pt"
    if mode != "single":
        assert {f.name for f in (runs[mode] / "first").glob("htsr_best_weights*.pt")} == {
            "htsr_best_weights-rank0.pt", "htsr_best_weights-rank1.pt"}
    assert len({(r["stopped_epoch"], r["best_epoch"]) for r in reports}) == 1  # the ranks agree
    full = 3 * 256 * 128 * 4 + 512 * 128 * 4  # weight, low_rank, full_rank (float32), inputs: bytes
    if mode == "fsdp2":  # each rank keeps only its shard of the weight (the buffers are replicated)
        assert all(r["local_shape"] == [128, 128] for r in reports)
        assert all(r["kept_bytes"] == full - 128 * 128 * 4 for r in reports)
    else:
        assert all(r["kept_bytes"] == full for r in reports)


LORA_ADAPTED = [f"model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
LORA_COMPARED = ["analysis", "epoch", "trigger", "name", "N", "M", "status", "alpha", "D", "entropy", "stable_rank",
                 "num_spikes", "phase"]


def lora_history(folder: Path, tuner: str = "lora") -> pd.DataFrame:
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    return pd.read_csv(folder / tuner / "htsr_history.csv").sort_values(["analysis", "name"]).reset_index(drop=True)


@pytest.mark.parametrize("tuner", ["lora", "dora"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_a_lora_fine_tune_gives_the_same_per_matrix_results_as_one_process(runs: dict[str, Path], mode: str,
                                                                            tuner: str) -> None:
    """A peft LoRA (and DoRA) fine-tune of a tiny Llama (the factors sharded per decoder layer under FSDP2) on
    identical examples follows the same trajectory in one process and two: the adapted matrices' merged spectra
    agree."""
    single, other = lora_history(runs["single"], tuner), lora_history(runs[mode], tuner)
    assert len(single) == len(other) == 4 * 16
    assert not other["name"].str.contains("lora_|base_layer|base_model").any()  # one row per merged matrix
    pd.testing.assert_frame_equal(single[LORA_COMPARED], other[LORA_COMPARED], check_exact=False, rtol=1e-5)
    assert set(other[other.analysis == 0]["rank"]) == {0, 1}
    alpha = other.pivot(index="analysis", columns="name", values="alpha")
    assert all(alpha[name].nunique() == 4 for name in LORA_ADAPTED)  # every analysis sees the adapters move


@pytest.mark.parametrize("mode", ["single", "ddp", "fsdp2"])
def test_the_live_lora_analysis_is_that_of_the_hand_merged_weights(runs: dict[str, Path], mode: str) -> None:
    """The last analysis of each adapted matrix equals an offline analysis of ``W + scale * B A``, computed by hand
    from the gathered factors at the end of training (DTensors under FSDP2)."""
    import torch

    from lightning_htsr import analyze_state_dict

    last = lora_history(runs[mode]).query("analysis == 3").set_index("name")
    final = json.loads((runs[mode] / "lora" / "lora_final.json").read_text())
    assert final["dtensor"] is (mode == "fsdp2") and final["world_size"] == (1 if mode == "single" else 2)
    merged = {f"{name}.weight": torch.tensor(w, dtype=torch.float32) for name, w in final["merged"].items()}
    offline = analyze_state_dict(merged).set_index("name")
    assert sorted(offline.index) == sorted(LORA_ADAPTED)
    for column in ("alpha", "entropy", "stable_rank"):
        assert offline[column].to_numpy() == pytest.approx(last.loc[offline.index, column].to_numpy(), rel=1e-5)
