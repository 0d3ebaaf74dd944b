"""HTSRCallback in real Lightning Trainer runs (CPU, no mocks): loggers, TensorBoard files, stopping, resume."""

from __future__ import annotations

import logging
import math
import os
import warnings

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from conftest import TinyNet, trainer_kwargs
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import lightning_htsr as htsr
from lightning_htsr import HTSRCallback
from lightning_htsr.training.sinks import HISTORY_COLUMNS, read_history
from lightning_htsr.training.stopping import StopReason

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator

MATRICES = ["net.0", "net.2", "net.4"]  # net.6 (128 -> 2) has 2 eigenvalues: skipped by min_evals


def read_events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


class Diverge(pl.Callback):
    """Fills every parameter with NaN at the start of epoch ``at_epoch`` (diverged weights)."""

    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.at_epoch:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


def fit(tmp_path, model=None, callbacks=(), **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=list(callbacks), **trainer_kwargs(tmp_path, **kwargs))
    trainer.fit(model or TinyNet())
    return trainer


# ------------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_event_file_has_scalars_histograms_images_and_text(tmp_path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = HTSRCallback(log_figures_every=2)
    model = TinyNet(lr=0.05)
    baseline = htsr.analyze(TinyNet(lr=0.05)).set_index("name")  # same seed: the weights before training
    fit(tmp_path, model, [callback], logger=logger, max_epochs=3)
    acc = read_events(logger.log_dir)
    tags = acc.Tags()
    for name in ("net.2", "net.4"):
        for metric in ("alpha", "entropy", "phase", "alpha_weighted", "stable_rank", "mp_softrank", "num_spikes"):
            assert f"htsr/{name}/{metric}" in tags["scalars"], (name, metric)
        assert f"htsr/{name}/log10_eigenvalues" in tags["histograms"]
        assert f"htsr/{name}/esd" in tags["images"]
    for key in ("alpha_mean", "entropy_mean", "frac_heavy_tailed", "compute_seconds"):
        assert f"htsr/{key}" in tags["scalars"]
    assert "htsr/phase_map" in tags["images"]
    assert "custom_scalars__config__" in tags["tensors"]
    assert {"htsr/latest/text_summary", "htsr/phase_legend/text_summary"} <= set(tags["tensors"])
    # one analysis before training (step 0) and one per epoch (8 steps each)
    steps = [e.step for e in acc.Scalars("htsr/net.2/alpha")]
    assert steps == [0, 8, 16, 24]
    # the baseline is exactly what analyze() gives on the untrained weights (TensorBoard stores float32)
    first = acc.Scalars("htsr/net.2/alpha")[0].value
    assert first == pytest.approx(baseline.loc["net.2", "alpha"], rel=1e-5)
    phase_code = acc.Scalars("htsr/net.2/phase")[0].value
    assert htsr.Phase.from_code(int(phase_code)).value == baseline.loc["net.2", "phase"]
    # ESD figures every 2nd analysis (0 and 2); the phase map at every analysis
    assert [e.step for e in acc.Images("htsr/net.2/esd")] == [0, 16]
    assert [e.step for e in acc.Images("htsr/phase_map")] == [0, 8, 16, 24]
    assert len(acc.Histograms("htsr/net.2/log10_eigenvalues")) == 4
    # the histogram holds the log10 eigenvalues of the matrix
    hist = acc.Histograms("htsr/net.2/log10_eigenvalues")[0].histogram_value
    assert hist.num == 256
    assert hist.max == pytest.approx(math.log10(baseline.loc["net.2", "spectral_norm"]), rel=1e-4)


def test_histograms_and_figures_can_be_turned_off(tmp_path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    fit(tmp_path, TinyNet(), [HTSRCallback(log_histograms=False, log_figures_every=None)], logger=logger,
        max_epochs=1)
    tags = read_events(logger.log_dir).Tags()
    assert not tags["histograms"]
    assert tags["images"] == ["htsr/phase_map"]


# -------------------------------------------------------------------------------------- other loggers


def test_csv_logger_receives_every_scalar(tmp_path) -> None:
    logger = CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, TinyNet(), [HTSRCallback()], logger=logger, max_epochs=2)
    metrics = pd.read_csv(os.path.join(logger.log_dir, "metrics.csv"))
    rows = metrics.dropna(subset=["htsr/net.2/alpha"])
    assert list(rows["step"]) == [0, 8, 16]
    assert list(rows["epoch"]) == [0, 0, 1]
    for column in ("htsr/net.4/entropy", "htsr/alpha_mean", "htsr/frac_heavy_tailed", "htsr/net.2/phase"):
        assert rows[column].notna().all(), column
    assert (rows["htsr/net.0/phase"] == -1).all()  # 32 eigenvalues: analyzed, too few to classify
    assert "htsr/net.6/alpha" not in metrics  # skipped by min_evals: no scalars at all


def test_metrics_reach_callback_metrics_for_early_stopping_and_checkpointing(tmp_path) -> None:
    stopper = EarlyStopping(monitor="htsr/alpha_mean", patience=2, mode="min", check_on_train_epoch_end=True)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="htsr/alpha_mean", mode="min")
    trainer = fit(tmp_path, TinyNet(lr=0.0), [HTSRCallback(), stopper, ckpt], logger=False, max_epochs=10,
                  enable_checkpointing=True)
    assert "htsr/alpha_mean" in trainer.callback_metrics
    # lr = 0: alpha_mean never improves, so the user's EarlyStopping on our metric stops after its patience
    assert stopper.stopping_reason.name == "PATIENCE_EXHAUSTED"
    assert trainer.current_epoch < 9
    assert ckpt.best_model_path and ckpt.best_model_score == pytest.approx(
        float(trainer.callback_metrics["htsr/alpha_mean"]))


def test_no_logger_warns_still_writes_history_and_still_stops(tmp_path) -> None:
    callback = HTSRCallback(stop_on="heavy_tailed", stop_rule="phase_fraction", stop_fraction=0.5)
    with pytest.warns(UserWarning, match="has no logger"):
        trainer = fit(tmp_path, TinyNet(heavy=True), [callback], logger=False, max_epochs=6)
    assert callback.stopping_reason is StopReason.PHASE_FRACTION
    assert trainer.current_epoch == 1  # the end of epoch 0 qualifies (patience 1); the baseline never stops
    assert callback.history_path == os.path.join(str(tmp_path), "htsr_history.csv")
    history = read_history(callback.history_path)
    assert list(history.columns) == list(HISTORY_COLUMNS)
    assert history["stopping_reason"].dropna().str.contains("heavy_tailed").any()


def test_fast_dev_run_computes_but_never_stops(tmp_path) -> None:
    callback = HTSRCallback(stop_on="heavy_tailed", patience=1)
    trainer = pl.Trainer(fast_dev_run=True, callbacks=[callback], default_root_dir=str(tmp_path),
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyNet(heavy=True))
    assert callback.analysis_count == 2  # baseline + the single epoch
    assert callback.stopping_reason is StopReason.NOT_STOPPED
    assert "htsr/alpha_mean" in trainer.callback_metrics
    assert os.listdir(tmp_path) == []  # like Lightning's loggers and checkpoints: a smoke run writes no files


def test_two_callbacks_with_different_prefixes_write_their_own_files(tmp_path) -> None:
    """A second callback's default history and spectra files carry its prefix (they once shared one file, their rows
    interleaved with nothing to tell them apart)."""
    first = HTSRCallback(include="net.0", print_summary=False, log_figures_every=None)
    second = HTSRCallback(exclude="net.0", prefix="hb", print_summary=False, log_figures_every=None)
    fit(tmp_path, TinyNet(lr=0.05), [first, second], max_epochs=2, logger=CSVLogger(str(tmp_path), name="csv"))
    assert os.path.basename(first.history_path) == "htsr_history.csv"
    assert os.path.basename(second.history_path) == "htsr_history-hb.csv"
    assert os.path.basename(second.spectra_path) == "htsr_spectra-hb.npz"
    assert set(read_history(first.history_path)["name"]) == {"net.0"}
    assert set(read_history(second.history_path)["name"]) == {"net.2", "net.4", "net.6"}
    assert set(htsr.training.sinks.read_spectra(second.spectra_path)[0]) <= {"net.2", "net.4", "net.6"}


def test_a_fresh_run_never_appends_to_an_earlier_runs_history(tmp_path) -> None:
    """Two fresh runs into one directory (``logger=False``): the first run's history is moved aside, not mixed."""
    paths = []
    for _ in range(2):
        callback = HTSRCallback(print_summary=False, log_figures_every=None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(tmp_path, TinyNet(lr=0.05), [callback], max_epochs=2, logger=False)
        paths.append(callback.history_path)
    assert paths[0] == paths[1]
    assert [w for w in caught if "held an earlier run's history; moved to" in str(w.message)]
    for path in (paths[1], os.path.join(tmp_path, "htsr_history.1.csv")):
        history = read_history(path)
        assert history.groupby("analysis").size().tolist() == [len(MATRICES) + 1] * 3  # baseline + 2 epochs


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers stepped every batch: ``global_step`` advances by 2 per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)
        self.data = torch.randn(64, 64)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        for opt in self.optimizers():
            opt.zero_grad()
            loss = (self.b(self.a(x)) - x).pow(2).mean()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.01)]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.data), batch_size=8)


def test_every_n_steps_counts_optimizer_steps_when_they_jump(tmp_path) -> None:
    """Two optimizer steps per batch: every_n_steps=3 analyzes once per 3 steps (at 4, 6, 10, 12, 16), not only at
    the multiples of 6 a modulo of the step count hits."""
    callback = HTSRCallback(every_n_epochs=0, every_n_steps=3, print_summary=False, log_figures_every=None,
                            analyze_on_train_start=False)
    fit(tmp_path, TwoOptimizers(), [callback], max_epochs=1, logger=False)
    steps = sorted(set(read_history(callback.history_path)["global_step"]))
    assert steps == [4, 6, 10, 12, 16]


# -------------------------------------------------------------------------------------- early stopping


def test_default_rule_stops_once_the_spectra_have_settled_and_says_why(tmp_path, caplog, capsys) -> None:
    callback = HTSRCallback(stop_on="heavy_tailed", patience=3)
    # Lightning's "lightning.pytorch" logger may not propagate to the root logger caplog listens on: listen on ours
    ours = logging.getLogger("lightning.pytorch.callbacks.htsr")
    ours.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger=ours.name):
            trainer = fit(tmp_path, TinyNet(lr=0.0, heavy=True), [callback], logger=False, max_epochs=10)
    finally:
        ours.removeHandler(caplog.handler)
    # lr = 0: the spectra never move. Anchored at the end of epoch 0, held for epochs 1-3 -> stop after epoch 3
    assert callback.stopping_reason is StopReason.SETTLED and callback.stopped_epoch == 3
    assert trainer.current_epoch == 4
    assert "all 2 learning weight matrices (2 heavy_tailed)" in callback.stopping_reason_message
    ours_records = {id(r): r for r in caplog.records if r.name == ours.name}  # once, even if it also propagated
    lines = [r.getMessage() for r in ours_records.values()]
    assert len(lines) == 1 and "HT-SR settled" in lines[0] and "epoch 3" in lines[0]  # one line, without verbose
    out = capsys.readouterr().out
    assert "HT-SR summary" in out and "Stopped early: HT-SR settled" in out
    assert "since epoch 0" in out  # net.2 and net.4 settled since their first analysis
    history = read_history(callback.history_path)
    assert history["stopping_reason"].dropna().str.contains("settled").any()


def test_default_rule_never_stops_a_model_that_stays_random_like_and_the_summary_says_why(tmp_path, capsys) -> None:
    callback = HTSRCallback(stop_on="heavy_tailed", patience=1)
    trainer = fit(tmp_path, TinyNet(lr=0.0), [callback], logger=False, max_epochs=4)
    assert callback.stopping_reason is StopReason.NOT_STOPPED and trainer.current_epoch == 4
    assert "Not stopped by HT-SR: no learning weight matrix is heavy_tailed yet" in capsys.readouterr().out
    quiet = HTSRCallback(stop_on="heavy_tailed", print_summary=False)
    fit(tmp_path / "quiet", TinyNet(lr=0.0), [quiet], logger=False, max_epochs=1)
    assert "HT-SR summary" not in capsys.readouterr().out


def test_settled_patience_counts_epochs_of_training_not_analyses(tmp_path) -> None:
    # analyses every 4 of the 8 steps per epoch (progress 0.5, 1.0, 1.5, ...): anchored at 0.5, settled 1.5 epochs
    # later -> the analysis at progress 2.0, the last step of epoch 1
    callback = HTSRCallback(every_n_epochs=0, every_n_steps=4, stop_on="heavy_tailed", patience=1.5)
    trainer = fit(tmp_path, TinyNet(lr=0.0, heavy=True), [callback], logger=False, max_epochs=6)
    assert callback.stopping_reason is StopReason.SETTLED and callback.stopped_epoch == 1
    assert trainer.global_step == 16 and callback.stop_state.progress == pytest.approx(2.0)
    assert callback.stop_state.anchors["net.2"].progress == pytest.approx(0.5)


def test_phase_fraction_rule_stops_on_a_heavy_tailed_model_and_not_on_a_random_one(tmp_path) -> None:
    heavy = HTSRCallback(stop_on="heavy_tailed", stop_rule="phase_fraction", stop_fraction=0.6, patience=3)
    trainer = fit(tmp_path / "heavy", TinyNet(heavy=True), [heavy], logger=False, max_epochs=8)
    # epochs 0, 1, 2 qualify -> the third consecutive analysis (end of epoch 2) stops; the baseline does not count
    assert heavy.stopping_reason is StopReason.PHASE_FRACTION
    assert heavy.stopped_epoch == 2 and trainer.current_epoch == 3
    # net.0 (M = 32) is too small to classify; net.2 and net.4 are the classified ones
    assert "100% of 2 classified weight matrices are heavy_tailed" in heavy.stopping_reason_message

    random = HTSRCallback(stop_on="heavy_tailed", stop_rule="phase_fraction", stop_fraction=0.6, patience=1)
    trainer = fit(tmp_path / "random", TinyNet(), [random], logger=False, max_epochs=3)
    assert random.stopping_reason is StopReason.NOT_STOPPED
    assert trainer.current_epoch == 3
    assert set(random.tracker.smoothed.values()) == {"random_like"}


def test_min_epochs_delays_the_stop(tmp_path) -> None:
    callback = HTSRCallback(stop_on="heavy_tailed", patience=1, min_epochs=3)
    fit(tmp_path, TinyNet(heavy=True), [callback], logger=False, max_epochs=8)
    assert callback.stopped_epoch == 3


def test_stops_when_a_layer_becomes_over_trained(tmp_path) -> None:
    callback = HTSRCallback(stop_on_over_trained=True)
    fit(tmp_path, TinyNet(heavy=True), [callback], logger=False, max_epochs=5)
    assert callback.stopping_reason is StopReason.OVER_TRAINED
    assert "alpha < 2" in callback.stopping_reason_message
    assert callback.stopped_epoch == 0


@pytest.mark.parametrize("rule", ["settled", "phase_fraction"])
def test_resumed_run_stops_at_the_same_epoch_as_the_uninterrupted_one(tmp_path, rule: str) -> None:
    def make() -> HTSRCallback:
        return HTSRCallback(stop_on="heavy_tailed", stop_rule=rule, stop_fraction=0.6,
                            patience=4 if rule == "phase_fraction" else 3)

    straight = make()
    fit(tmp_path / "a", TinyNet(heavy=True), [straight], logger=False, max_epochs=10)
    assert straight.stopped_epoch == 3  # phase_fraction: epochs 0-3 qualify; settled: anchored at 0, held 1-3

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_epochs=1)
    first = make()
    fit(tmp_path / "b", TinyNet(heavy=True), [first, ckpt], logger=False, max_epochs=1, enable_checkpointing=True)
    assert first.stopping_reason is StopReason.NOT_STOPPED  # stopped mid-patience
    state = torch.load(ckpt.last_model_path, weights_only=True)["callbacks"][first.state_key]  # plain types only
    assert state["stop_state"] == first.stop_state.state_dict()
    if rule == "phase_fraction":
        assert state["stop_state"]["wait_count"] == 1
    else:
        assert state["stop_state"]["anchors"]["net.2"]["epoch"] == 0 and state["stop_state"]["analyses"] == 1

    resumed = make()
    trainer = pl.Trainer(callbacks=[resumed], **trainer_kwargs(tmp_path / "b", logger=False, max_epochs=10))
    trainer.fit(TinyNet(heavy=True), ckpt_path=ckpt.last_model_path)
    # restored: baseline + epoch 0; no second baseline on resume; then epochs 1, 2, 3 and the stop
    assert resumed.analysis_count == 5
    assert resumed.stopped_epoch == straight.stopped_epoch
    assert trainer.current_epoch == 4


def test_state_dict_is_plain_python() -> None:
    callback = HTSRCallback()
    callback.tracker.update({"a": "heavy_tailed"})
    callback.phase_history.append({"step": 0, "epoch": 0, "phases": {"a": "heavy_tailed"}})
    state = callback.state_dict()

    def plain(x) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (int, float, str, bool))

    assert plain(state)
    other = HTSRCallback()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_two_callbacks_need_different_prefixes(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="state_key"):
        pl.Trainer(callbacks=[HTSRCallback(), HTSRCallback()], default_root_dir=str(tmp_path))
    a, b = HTSRCallback(prefix="htsr"), HTSRCallback(prefix="htsr_attn", include=r"net\.2")
    trainer = fit(tmp_path, TinyNet(), [a, b], logger=False, max_epochs=1)
    assert "htsr_attn/net.2/alpha" in trainer.callback_metrics and "htsr_attn/net.4/alpha" not in \
        trainer.callback_metrics
    assert "htsr/net.4/alpha" in trainer.callback_metrics


# ------------------------------------------------------------------------------------ schedule & history


def test_schedule_epochs_steps_and_baseline(tmp_path) -> None:
    by_epoch = HTSRCallback(epochs=[1, 3], analyze_on_train_start=False, history_file="h.csv")
    fit(tmp_path / "e", TinyNet(), [by_epoch], logger=False, max_epochs=4)
    h = read_history(by_epoch.history_path)
    assert sorted(set(zip(h.epoch, h.global_step, h.trigger))) == [(1, 16, "epoch_end"), (3, 32, "epoch_end")]

    by_step = HTSRCallback(every_n_epochs=0, every_n_steps=5, history_file="h.jsonl")
    fit(tmp_path / "s", TinyNet(), [by_step], logger=False, max_epochs=2)
    h = read_history(by_step.history_path)
    assert sorted(set(h.global_step)) == [0, 5, 10, 15]
    assert set(h.trigger) == {"train_start", "step"}


def test_history_is_flushed_at_every_analysis(tmp_path) -> None:
    seen = []

    class Reader(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            seen.append(len(read_history(tmp_path / "htsr_history.csv")))

    fit(tmp_path, TinyNet(), [HTSRCallback(), Reader()], logger=False, max_epochs=3)
    per_analysis = 4  # net.0, net.2, net.4 and the skipped net.6
    assert seen == [2 * per_analysis, 3 * per_analysis, 4 * per_analysis]
    history = read_history(tmp_path / "htsr_history.csv")
    assert set(history.name) == set(MATRICES) | {"net.6"}
    skipped = history[history.name == "net.6"]
    assert (skipped.status == "skipped").all() and skipped.skip_reason.str.contains("min_evals").all()
    assert (history["rank"] == 0).all()


def test_bad_weights_during_training_warn_once_and_training_continues(tmp_path) -> None:
    class Poison(pl.Callback):
        """NaN into a matrix outside the forward pass from epoch 1 on (in the forward pass, SGD would spread it)."""

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    pl_module.spare.weight[0, 0] = float("nan")

    model = TinyNet(lr=0.01)
    model.spare = torch.nn.Linear(64, 128)
    callback = HTSRCallback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(tmp_path, model, [Poison(), callback], logger=False, max_epochs=4)
    assert trainer.current_epoch == 4
    mine = [w for w in caught if "HTSRCallback: 1 weight matrices not fully analyzed" in str(w.message)]
    assert len(mine) == 1 and "spare (skipped: non-finite" in str(mine[0].message)  # once, for four bad analyses
    history = read_history(callback.history_path)
    bad = history[(history.name == "spare") & (history.epoch >= 1)]
    assert len(bad) == 3 and (bad.status == "skipped").all() and bad.skip_reason.str.contains("non-finite").all()
    assert (history[history.name == "net.2"].status == "success").all()  # every other matrix keeps its record


def test_pytorch_lightning_namespace(tmp_path) -> None:
    ptl = pytest.importorskip("pytorch_lightning")
    from lightning_htsr.pytorch_lightning import HTSRCallback as PLCallback

    class PLTiny(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyNet().net

        def training_step(self, batch, batch_idx):
            return self.net(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self):
            return TinyNet().train_dataloader()

    logger = ptl.loggers.TensorBoardLogger(str(tmp_path), name="ptl")
    callback = PLCallback(stop_on="random_like", stop_rule="phase_fraction", stop_fraction=1.0)
    assert isinstance(callback, ptl.Callback)
    trainer = ptl.Trainer(max_epochs=3, callbacks=[callback], logger=logger, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(PLTiny())
    assert callback.stopping_reason is StopReason.PHASE_FRACTION
    tags = read_events(logger.log_dir).Tags()
    assert "htsr/net.2/alpha" in tags["scalars"]
    assert "htsr/net.2/log10_eigenvalues" in tags["histograms"]  # TensorBoard detected by capability


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "cupy"])
def test_on_gpu_the_spectra_are_computed_on_the_device_and_match_cpu(tmp_path, backend: str) -> None:
    if backend == "cupy":
        pytest.importorskip("cupy")
    model = TinyNet(lr=0.0, heavy=True)
    reference = htsr.analyze(TinyNet(lr=0.0, heavy=True)).set_index("name")
    callback = HTSRCallback(backend=backend)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, accelerator="gpu", devices=1, logger=False,
                                                                 max_epochs=1))
    trainer.fit(model)
    assert next(model.parameters()).device.type == "cuda"
    for name in ("net.2", "net.4"):
        assert float(trainer.callback_metrics[f"htsr/{name}/alpha"]) == pytest.approx(
            reference.loc[name, "alpha"], rel=1e-3)
        assert float(trainer.callback_metrics[f"htsr/{name}/entropy"]) == pytest.approx(
            reference.loc[name, "entropy"], rel=1e-4)


def test_diverged_weights_do_not_keep_stale_phases_or_stop_the_run(tmp_path) -> None:
    """After NaN takes over, no matrix is classified: the last good labels must not count (or trigger a stop)."""

    callback = HTSRCallback(stop_on="heavy_tailed", patience=1)
    with pytest.warns(UserWarning, match="not fully analyzed"):
        trainer = fit(tmp_path, TinyNet(lr=0.0, heavy=True), [Diverge(at_epoch=1), callback], logger=False,
                      max_epochs=4)
    assert callback.stopping_reason is StopReason.NOT_STOPPED and trainer.current_epoch == 4
    history = read_history(callback.history_path)
    after = history[history.epoch >= 1]
    assert (after.status == "skipped").all() and after.smoothed_phase.isna().all()
    # nothing stale in callback_metrics: per-matrix values are gone, model-level aggregates are NaN
    assert not any(k.startswith("htsr/net.") for k in trainer.callback_metrics)
    assert math.isnan(float(trainer.callback_metrics["htsr/alpha_mean"]))


def test_a_prefix_with_a_slash_keeps_model_level_keys_apart_from_per_matrix_keys(tmp_path) -> None:
    callback = HTSRCallback(prefix="exp/htsr", log_figures_every=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = fit(tmp_path, TinyNet(lr=0.0, heavy=True), [Diverge(at_epoch=1), callback], logger=False,
                      max_epochs=2)
    # the aggregate of an analysis with nothing left to average is NaN (not dropped), per-matrix keys are gone
    assert math.isnan(float(trainer.callback_metrics["exp/htsr/alpha_mean"]))
    assert not any(k.startswith("exp/htsr/net.") for k in trainer.callback_metrics)


def test_early_stopping_on_alpha_mean_catches_divergence(tmp_path) -> None:
    stopper = EarlyStopping(monitor="htsr/alpha_mean", patience=100, check_on_train_epoch_end=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = fit(tmp_path, TinyNet(lr=0.0), [Diverge(at_epoch=2), HTSRCallback(), stopper], logger=False,
                      max_epochs=10)
    assert stopper.stopping_reason.name == "NON_FINITE_METRIC" and trainer.current_epoch == 3


def test_an_exception_inside_the_analysis_never_ends_training(tmp_path, monkeypatch) -> None:
    import lightning_htsr.training.live as live_module

    def broken(*args, **kwargs):
        raise RuntimeError("simulated eigensolver crash")

    monkeypatch.setattr(live_module, "analyze_matrices", broken)
    callback = HTSRCallback(stop_on="heavy_tailed")
    with pytest.warns(UserWarning, match="analysis failed on rank 0 .*simulated eigensolver crash"):
        trainer = fit(tmp_path, TinyNet(lr=0.01), [callback], logger=False, max_epochs=2)
    assert trainer.current_epoch == 2 and callback.analysis_count == 3
    history = read_history(callback.history_path)
    assert len(history) == 3 * 4 and (history.status == "skipped").all()
    assert history.skip_reason.str.contains("analysis error: RuntimeError: simulated eigensolver crash").all()


# ------------------------------------------------------------------------------ figures off the training thread


def _images(log_dir: str) -> dict[str, list[tuple[int, bytes]]]:
    acc = read_events(log_dir)
    return {tag: [(e.step, e.encoded_image_string) for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def test_figures_drawn_in_the_background_are_the_ones_drawn_in_the_training_thread(tmp_path) -> None:
    images = {}
    for background in (True, False):
        logger = TensorBoardLogger(str(tmp_path), name=f"background_{background}")
        fit(tmp_path, TinyNet(lr=0.05), [HTSRCallback(log_figures_every=2, background_figures=background)],
            logger=logger, max_epochs=3)
        images[background] = _images(logger.log_dir)
    assert sorted(images[True]) == ["htsr/net.0/esd", "htsr/net.2/esd", "htsr/net.4/esd", "htsr/phase_map"]
    assert [step for step, _ in images[True]["htsr/phase_map"]] == [0, 8, 16, 24]
    assert images[True] == images[False]  # same steps, same PNG bytes


class Crash(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 2:
            raise RuntimeError("crash in epoch 2")


def test_figures_of_every_analysis_before_an_exception_are_written(tmp_path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = HTSRCallback(log_figures_every=2)
    with pytest.raises(RuntimeError, match="crash in epoch 2"):
        fit(tmp_path, TinyNet(lr=0.05), [callback, Crash()], logger=logger, max_epochs=4)
    images = _images(logger.log_dir)
    assert [step for step, _ in images["htsr/phase_map"]] == [0, 8, 16]  # the baseline, epochs 0 and 1
    assert [step for step, _ in images["htsr/net.2/esd"]] == [0, 16]
    assert read_history(callback.history_path)["analysis"].max() == 2
