"""One story in every view: TensorBoard, the history, summarize(), the CLI's and the report's means and phase names
agree, and the functional API gives the numbers the records hold."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_htsr as htsr
from lightning_htsr import HTSRCallback, PhaseConfig
from lightning_htsr import functional as F
from lightning_htsr.spectra.synthetic import pareto
from lightning_htsr.views.cli import main as cli_main
from lightning_htsr.views.report import load_history

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("story")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    model = TinyNet(lr=0.05)
    callback = HTSRCallback(log_figures_every=None, log_histograms=False, extra_scalars=["ERG_gap", "sv_max"])
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, logger=logger, max_epochs=2))
    trainer.fit(model)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {"model": model, "callback": callback, "acc": acc, "trainer": trainer, "tmp": tmp_path}


def last_scalar(acc, tag: str) -> float:
    return acc.Scalars(tag)[-1].value


def test_tensorboard_history_and_offline_analysis_give_the_same_model_means(run) -> None:
    acc, callback = run["acc"], run["callback"]
    history = load_history(callback.history_path)
    last = history[history["analysis"] == history["analysis"].max()]
    from_history = htsr.summarize(last)
    offline = htsr.summarize(htsr.analyze(run["model"]))
    # the test model has an unclassified matrix with a raw alpha (net.0: 32 eigenvalues), so the definition matters
    assert not last.set_index("name").loc["net.0", "phase"] and last.set_index("name").loc["net.0", "alpha"] > 0
    for key, column in (("alpha_mean", "alpha"), ("entropy_mean", "entropy"), ("stable_rank_mean", "stable_rank")):
        board = last_scalar(acc, f"htsr/{key}")
        assert board == pytest.approx(from_history[column], rel=1e-6), key  # TensorBoard stores float32
        assert from_history[column] == pytest.approx(offline[column], rel=1e-12), key
    for key in ("num_valid", "num_analyzed", "num_classified"):
        assert last_scalar(acc, f"htsr/{key}") == from_history[key] == offline[key], key
    assert from_history["num_classified"] == 2 and from_history["num_analyzed"] == 3
    assert last_scalar(acc, "htsr/frac_random_like") == pytest.approx(from_history["frac_random_like"])
    assert last_scalar(acc, "htsr/smoothed_frac_random_like") == pytest.approx(
        from_history["smoothed_frac_random_like"])


def test_unclassified_alpha_is_not_logged_as_a_finding_and_phase_names_match_the_history(run) -> None:
    acc, callback = run["acc"], run["callback"]
    tags = set(acc.Tags()["scalars"])
    assert "htsr/net.0/alpha" not in tags and "htsr/net.0/alpha_unclassified" in tags
    assert {"htsr/net.2/alpha", "htsr/net.2/phase", "htsr/net.2/smoothed_phase"} <= tags
    history = load_history(callback.history_path)
    for name in ("net.2", "net.4"):
        rows = history[history["name"] == name]
        for column in ("phase", "smoothed_phase"):
            logged = [e.value for e in acc.Scalars(f"htsr/{name}/{column}")]
            assert logged == [float(htsr.Phase(p).code) for p in rows[column]], (name, column)
    assert all(e.value == -1.0 for e in acc.Scalars("htsr/net.0/phase"))


def test_cli_summary_line_uses_the_same_definition(run, capsys) -> None:
    ckpt = run["tmp"] / "final.ckpt"
    run["trainer"].save_checkpoint(ckpt)
    assert cli_main(["analyze", str(ckpt)]) == 0
    out = capsys.readouterr().out
    s = htsr.summarize(htsr.analyze(run["model"]))
    assert f"3 analyzed, 2 classified | mean alpha {s['alpha']:.3f}" in out.splitlines()[-1]
    assert "(too small)" in out


def test_min_evals_is_one_notion_in_the_callback() -> None:
    options = HTSRCallback(min_evals=20).options
    assert options.phase_config.min_evals == 20 and options.min_evals == 10
    options = HTSRCallback(phase_config=PhaseConfig(min_evals=30, max_alpha=5.0)).options
    assert options.phase_config == PhaseConfig(min_evals=30, max_alpha=5.0)
    row = htsr.analyze(nn.Linear(32, 256), min_evals=20).iloc[0]  # 32 eigenvalues: classified now
    assert row.phase == "random_like"


def test_argparse_abbreviations_are_refused(capsys) -> None:
    assert cli_main(["analyze", "model.ckpt", "--plot", "x"]) == 2
    assert "unrecognized arguments: --plot" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ functional = records


def test_functional_fits_agree_with_the_records() -> None:
    w = pareto(512, 384, 1.5, seed=3).float()  # heavy tail over many decades: the float32 floor matters
    for precision in ("float32", "float64"):
        record = htsr.analyze_state_dict({"w.weight": w}, precision=precision).iloc[0]
        ev = F.eigenvalues(w, precision=precision)
        assert ev.dtype == getattr(torch, precision)
        fit = F.fit_power_law(ev)  # float32 eigenvalues keep the float32 resolution floor
        assert (fit.alpha, fit.num_pl_spikes) == (pytest.approx(record.alpha, rel=1e-12), record.num_pl_spikes)
        mp = F.fit_marchenko_pastur(ev, 512, 384)  # default false-spike rate = the records' 0.01 %
        assert mp.num_spikes == record.num_spikes and mp.spike_threshold == pytest.approx(record.spike_threshold)
        assert F.classify_phase(ev, 512, 384).phase.value == record.phase


def test_classify_phase_takes_eps_from_a_float32_tensor() -> None:
    ev = torch.linspace(1e-9, 1.0, 200, dtype=torch.float32)
    assert math.isclose(F.classify_phase(ev, 400, 200).frac_zero, F.classify_phase(ev.numpy(), 400, 200).frac_zero)
    assert F.default_zero_tol(1.0, 200, torch.float32) == F.default_zero_tol(1.0, 200, ev.numpy().dtype)


def test_extra_scalars_are_logged_when_asked(run) -> None:
    acc, callback = run["acc"], run["callback"]
    last = {r["name"]: r for r in callback.latest_records}
    for column in ("ERG_gap", "sv_max"):
        assert last_scalar(acc, f"htsr/net.2/{column}") == pytest.approx(last["net.2"][column], rel=1e-6)
