"""The examples' ``--quick`` paths run and show what they promise.

quickstart and rank_collapse run in-process (their ``main(argv)`` returns what they printed); transformer_lm runs
in a subprocess with ``--devices 2 --strategy ddp`` because Lightning's ddp launcher re-executes ``sys.argv``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import lightning_htsr as htsr

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PHASES = {"random_like", "bleeding_out", "bulk_plus_spikes", "bulk_decay", "heavy_tailed", "rank_collapse"}

pytest.importorskip("sklearn")
EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator


@pytest.fixture(autouse=True)
def _restore_lightning_log_levels():
    """The examples quiet Lightning's loggers for a clean console; give other tests their levels back."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses/pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def test_quickstart(tmp_path, capsys) -> None:
    quickstart = load_example("quickstart")
    logdir = tmp_path / "runs"
    result = quickstart.main(["--quick", "--logdir", str(logdir)])
    out = capsys.readouterr().out

    assert f"tensorboard --logdir {logdir}" in out
    # the final table: one row per hidden layer with a numeric alpha, an entropy and a phase
    for name, shape in (("net.0", "512x64"), ("net.2", "512x512")):
        row = re.search(rf"^{re.escape(name)}\s+{shape}\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
        assert row, f"no table row for {name}:\n{out}"
        alpha, entropy, phase = row.groups()
        assert 1.0 < float(alpha) < 20.0 and 0.0 < float(entropy) <= 1.0
        assert phase in PHASES
    assert "validation accuracy" in out and result["val_acc"] > 0.3
    assert result["analysis_count"] == 3  # baseline + 2 epochs

    records = {r["name"]: r for r in result["records"]}
    assert records["net.2"]["phase"] in PHASES and math.isfinite(records["net.2"]["alpha"])
    history = pd.read_csv(result["history_path"])
    assert sorted(history["analysis"].unique()) == [0, 1, 2]

    events = list(Path(result["log_dir"]).glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(result["log_dir"], size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("htsr/net.0/alpha", "htsr/net.2/alpha", "htsr/net.2/entropy", "htsr/net.2/phase",
                "htsr/alpha_mean"):
        assert tag in scalars, (tag, sorted(scalars))
    assert len(acc.Scalars("htsr/net.2/alpha")) == 3
    # the printed model means are TensorBoard's, and the demo's checkpoint gives the same numbers offline
    assert acc.Scalars("htsr/alpha_mean")[-1].value == pytest.approx(result["summary"]["alpha"], rel=1e-6)
    from lightning_htsr.views.cli import main as cli_main

    assert cli_main(["analyze", result["checkpoint"], "--quiet"]) == 0
    assert f"mean alpha {result['summary']['alpha']:.3f}" in capsys.readouterr().out


def test_transformer_model_has_attention_matrices() -> None:
    lm = load_example("transformer_lm")
    model = lm.build_model(d_model=64, nhead=4, num_layers=1, dim_feedforward=128, max_len=16)
    names = set(htsr.analyze(model)["name"])
    for part in ("q", "k", "v"):
        assert f"encoder.layers.0.self_attn.in_proj.{part}" in names
    assert {"encoder.layers.0.self_attn.out_proj", "encoder.layers.0.linear1", "embed", "head"} <= names
    train, val, chain = lm.make_dataloaders(num_train=8, num_val=4, seq_len=16, batch_size=4)
    x, y = next(iter(train))
    assert x.shape == y.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    assert model(x).shape == (4, 16, 32)
    sequences = chain.sample(64, 17, seed=5)
    assert chain.loss_floor(sequences) < chain.bigram_loss(sequences) < math.log(32)


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="torch.distributed unavailable")
def test_transformer_lm_ddp(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "transformer_lm.py"), "--quick", "--devices", "2", "--strategy", "ddp",
         "--logdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = proc.stdout
    assert "on 2 process(es)" in out
    for part in ("q", "k", "v"):
        row = re.search(rf"^encoder\.layers\.0\.self_attn\.in_proj\.{part}\s+attention_in_proj\s+64x64\s+\S+\s+(\S+)",
                        out, re.M)
        assert row, f"in_proj.{part} missing from the report:\n{out}"
        assert row.group(1) in PHASES
    assert out.count("\nencoder.layers.0.self_attn.in_proj.") == 3  # printed once, by rank 0 only
    history = pd.read_csv(next(tmp_path.glob("transformer_lm/version_*/htsr_history.csv")))
    last = history[history["analysis"] == history["analysis"].max()]
    assert {f"encoder.layers.0.self_attn.in_proj.{p}" for p in "qkv"} <= set(last["name"])
    assert set(last["rank"]) == {0, 1}  # the two ranks shared the work
    assert last["name"].is_unique


def test_rank_collapse(capsys) -> None:
    example = load_example("rank_collapse")
    out = example.main(["--quick"])
    printed = capsys.readouterr().out
    decayed = out["decayed"]["frame"].set_index("name")
    normal = out["normal"]["frame"].set_index("name")
    assert decayed.loc["net.2", "phase"] == "rank_collapse"
    assert decayed.loc["net.2", "frac_zero"] >= htsr.PhaseConfig().zero_fraction
    assert decayed.loc["net.2", "matrix_rank"] < 256
    assert (decayed.drop(index="net.2")["phase"] != "rank_collapse").all()
    assert (normal["phase"] != "rank_collapse").all()
    assert normal.loc["net.2", "matrix_rank"] == 256
    assert out["rank_collapse_only_in_decayed_layer"]
    assert "=> net.2 is rank_collapse only under strong weight decay" in printed
