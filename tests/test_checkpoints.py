"""Checkpoint inputs: every supported layout gives the rows of the in-memory analysis, read one tensor at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lightning_htsr as htsr
from lightning_htsr.views.cli import main
from lightning_htsr.weights.checkpoints import CheckpointError, open_checkpoint


def llama_like() -> dict[str, torch.Tensor]:
    """Two small decoder layers in Hugging Face Llama naming, bf16, one MLP matrix Student-t (heavy-tailed)."""
    gen = torch.Generator().manual_seed(0)
    hidden, mlp, vocab = 64, 160, 256
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden, generator=gen)
        sd[p + "mlp.gate_proj.weight"] = torch.randn(mlp, hidden, generator=gen)
        sd[p + "mlp.up_proj.weight"] = torch.randn(mlp, hidden, generator=gen)
        t = torch.distributions.StudentT(2.5).sample((hidden, mlp))
        sd[p + "mlp.down_proj.weight"] = t
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
    sd["model.norm.weight"] = torch.ones(hidden)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=gen)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


def shard(sd: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    keys = list(sd)
    return [{k: sd[k] for k in keys[i::parts]} for i in range(parts)]


def write_hf(directory: Path, sd: dict[str, torch.Tensor], kind: str, parts: int = 3) -> Path:
    """A Hugging Face model directory: ``safetensors`` / ``bin`` shards with their index, or ``single``."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "single":
        save_file(sd, str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for i, part in enumerate(shard(sd, parts), start=1):
        if kind == "safetensors":
            name = f"model-{i:05d}-of-{parts:05d}.safetensors"
            save_file(part, str(directory / name))
        else:
            name = f"pytorch_model-{i:05d}-of-{parts:05d}.bin"
            torch.save(part, directory / name)
        weight_map.update({k: name for k in part})
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (directory / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return directory


def by_name(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("name").reset_index(drop=True)


def assert_same_rows(table: pd.DataFrame, expected: pd.DataFrame) -> None:
    table, expected = by_name(table), by_name(expected)
    assert table["name"].tolist() == expected["name"].tolist()
    np.testing.assert_allclose(table["alpha"].to_numpy(float), expected["alpha"].to_numpy(float), rtol=1e-9,
                               equal_nan=True)
    assert table["phase"].fillna("").tolist() == expected["phase"].fillna("").tolist()
    assert table["status"].tolist() == expected["status"].tolist()


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return llama_like()


@pytest.fixture(scope="module")
def expected(weights) -> pd.DataFrame:
    return htsr.analyze_state_dict(weights)


@pytest.mark.parametrize("layout", ["dir:safetensors", "dir:bin", "dir:single", "index:safetensors", "index:bin",
                                    "files:safetensors", "files:bin"])
def test_every_layout_gives_one_table_with_the_rows_of_the_in_memory_analysis(layout, weights, expected,
                                                                              tmp_path, capsys) -> None:
    how, kind = layout.split(":")
    directory = write_hf(tmp_path / "model", weights, kind)
    if how == "dir":
        argv = [directory]
    elif how == "index":
        argv = [next(directory.glob("*.index.json"))]
    else:
        argv = sorted(p for p in directory.iterdir() if not p.name.endswith(".json"))
        assert len(argv) == 3
    assert_same_rows(htsr.analyze_checkpoint(argv), expected)

    code = main(["analyze", *map(str, argv), "--csv", str(tmp_path / "t.csv")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert_same_rows(pd.read_csv(tmp_path / "t.csv"), expected)
    assert out.count("model: ") == 1 and "model: 16 matrices, 16 analyzed" in out  # one summary for all shards


@pytest.mark.parametrize("key", ["model_state", "module", "params", "state_dict", "model"])
def test_nested_state_dicts_under_the_keys_real_checkpoints_use(key, weights, expected, tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"step": 1000, key: weights, "optimizer_state": {"lr": 1e-3}}, path)
    assert_same_rows(htsr.analyze_checkpoint(path), expected)


def test_torchscript_archive_is_read_without_running_its_code(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96))
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    assert_same_rows(htsr.analyze_checkpoint(path), htsr.analyze(model))
    # a damaged archive: one line naming the file
    data = path.read_bytes()
    bad = tmp_path / "damaged.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged.pt: not a readable checkpoint"):
        htsr.analyze_checkpoint(bad)


@pytest.mark.parametrize("problem, message", [
    ("missing-shard", "No such file|no such file"),
    ("bad-index", "not a checkpoint index"),
    ("empty-dir", "no checkpoint in this directory"),
])
def test_bad_directories_and_indexes_exit_2_with_one_line(problem, message, weights, tmp_path, capsys) -> None:
    directory = tmp_path / "model"
    if problem == "empty-dir":
        directory.mkdir()
    else:
        write_hf(directory, weights, "safetensors")
        if problem == "missing-shard":
            next(directory.glob("model-00002-*.safetensors")).unlink()
        else:
            (directory / "model.safetensors.index.json").write_text("{not json")
    code = main(["analyze", str(directory)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("lightning-htsr: error: ") and pytest.importorskip("re").search(message, err), err


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_tensors_are_read_one_at_a_time(kind, weights, tmp_path) -> None:
    checkpoint = open_checkpoint(write_hf(tmp_path / "m", weights, kind), read_budget=0)
    alive: list[weakref.ref] = []
    names = []
    for name, tensor in checkpoint.tensors(lambda info: len(info.shape) == 2):
        assert sum(r() is not None for r in alive) == 0, "an earlier tensor is still held"
        alive.append(weakref.ref(tensor))
        names.append(name)
        del tensor
    assert sorted(names) == sorted(k for k, v in weights.items() if v.dim() == 2)


def test_analysis_drops_each_matrix_once_analyzed(weights) -> None:
    from lightning_htsr.analysis import analyze_stream
    from lightning_htsr.weights.state_dict import iter_state_dict_matrices

    held: list[weakref.ref] = []

    def items():
        for key, value in weights.items():
            copy = value.clone()  # a tensor only the stream holds, like one read from a file
            held.append(weakref.ref(copy))
            yield key, copy

    matrices = iter_state_dict_matrices(items(), shapes={k: v.shape for k, v in weights.items()}, tie=False)
    for _ in analyze_stream(matrices, batch_bytes=1):
        assert sum(r() is not None for r in held) <= 3  # the matrix just analyzed, the next one, the reader's


def test_peak_memory_is_a_few_matrices_not_the_model(tmp_path) -> None:
    """6 bf16 tensors of 24 MiB (144 MiB on disk, 288 MiB in float32): reading the file whole and upcasting every
    matrix would add >= 432 MiB; streaming adds one read budget (64 MiB) plus about two matrices."""
    gen = torch.Generator().manual_seed(1)
    (tmp_path / "model").mkdir()
    save_file({f"layers.{i}.weight": torch.randn(65536, 192, generator=gen, dtype=torch.bfloat16)
               for i in range(6)},
              str(tmp_path / "model" / "model.safetensors"))
    script = textwrap.dedent(f"""
        import torch, lightning_htsr as htsr
        from safetensors.torch import save_file
        def status_mib(field):  # VmRSS: now; VmHWM: peak of this process (ru_maxrss would include the parent's)
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
        save_file({{"warm.weight": torch.randn(64, 32)}}, {str(tmp_path / "warm.safetensors")!r})
        htsr.analyze_checkpoint({str(tmp_path / "warm.safetensors")!r})  # imports everything the analysis uses
        before = status_mib("VmRSS")
        table = htsr.analyze_checkpoint({str(tmp_path / "model")!r})
        assert len(table) == 6 and set(table["status"]) == {{"success"}}, table
        print(status_mib("VmHWM") - before)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    added = float(result.stdout.strip().splitlines()[-1])
    assert added < 250, f"analysis added {added:.0f} MiB for a 144 MiB bf16 checkpoint"


def test_torchrun_two_cpu_processes_give_the_rows_of_one_process(weights, expected, tmp_path) -> None:
    """``torchrun --nproc-per-node 2 -m lightning_htsr analyze DIR``: gloo, cost-balanced shares, rank 0 writes."""
    from lightning_htsr.distributed import assign_owners
    from lightning_htsr.offline import checkpoint_plan

    directory = write_hf(tmp_path / "model", weights, "safetensors")
    plan = checkpoint_plan(open_checkpoint(directory), htsr.AnalysisOptions())
    assert set(assign_owners(plan, 2).values()) == {0, 1}  # both processes have work
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lightning_htsr", "analyze", str(directory), "--csv", str(tmp_path / "t.csv")]
    # a session of its own, so that on a timeout the workers go too (not only the launcher)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("model: 16 matrices, 16 analyzed") == 1  # printed by rank 0 only
    table = pd.read_csv(tmp_path / "t.csv")
    assert table["name"].tolist() == [m.name for m in plan]
    assert_same_rows(table, expected)


# ---------------------------------------------------------------------------------------------- devices


def test_device_argument_moves_matrices_and_keeps_the_rows(weights, expected, tmp_path, capsys) -> None:
    directory = write_hf(tmp_path / "model", weights, "single")
    assert_same_rows(htsr.analyze_checkpoint(directory, device="cpu", threads=1), expected)
    if not torch.cuda.is_available():
        code = main(["analyze", str(directory), "--device", "cuda"])
        out, err = capsys.readouterr()
        assert code == 2 and err.strip() == "lightning-htsr: error: --device cuda: no CUDA device is available here"



@pytest.mark.parametrize("backend", ["torch", "cupy"])
@pytest.mark.parametrize("precision", ["auto", "float64"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offline_analysis_matches_cpu(backend, precision, weights, tmp_path, capsys) -> None:
    if backend == "cupy":
        pytest.importorskip("cupy")
    directory = write_hf(tmp_path / "model", weights, "safetensors")
    cpu = by_name(htsr.analyze_checkpoint(directory, precision=precision))
    cuda = by_name(htsr.analyze_checkpoint(directory, device="cuda", backend=backend, precision=precision))
    assert cuda["name"].tolist() == cpu["name"].tolist() and cuda["phase"].tolist() == cpu["phase"].tolist()
    np.testing.assert_allclose(cuda["alpha"], cpu["alpha"], rtol=1e-9 if precision == "float64" else 1e-3)
    assert set(cuda["precision"]) == set(cpu["precision"])  # the same fp32/fp64 choices on both devices
    code = main(["analyze", str(directory), "--device", "cuda", "--backend", backend, "--quiet"])
    assert code == 0 and "model: 16 matrices, 16 analyzed" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_check_script_says_so_without_cuda(tmp_path) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout.startswith("gpu_check: no CUDA device visible to")
    assert (tmp_path / "summary.md").read_text() == result.stdout


def test_a_shard_that_fails_while_streaming_gives_a_checkpoint_error(weights, tmp_path) -> None:
    from lightning_htsr.offline import checkpoint_records

    directory = write_hf(tmp_path / "model", weights, "safetensors")
    checkpoint = open_checkpoint(directory)
    next(directory.glob("model-00002-*.safetensors")).write_bytes(b"gone")  # replaced after the headers were read
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003.safetensors: cannot read tensor '.*'"):
        checkpoint_records(checkpoint, htsr.AnalysisOptions())
