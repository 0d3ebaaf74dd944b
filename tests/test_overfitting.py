"""The over-fitting signal, the best analysis and handing back its weights: pure functions, the kept copy, and real
``Trainer`` runs with moving weights where the rule must fire (and restore) and where it must not."""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import ShiftNet, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_htsr import HTSRCallback
from lightning_htsr.spectra.phases import PhaseTracker
from lightning_htsr.training.best_weights import KeptWeights
from lightning_htsr.training.sinks import read_history
from lightning_htsr.training.sinks.summary import MOVING_HINT
from lightning_htsr.training.stopping import (
    EntropyLow,
    StopCriteria,
    StopReason,
    StopState,
    evaluate_stop,
    forget_replaced,
    replay_stop,
    structure_score,
    turned_matrices,
    update_lows,
)

# ------------------------------------------------------------------------------------------- pure functions


def _analysis(entropies: dict[str, float], phase: str = "heavy_tailed") -> tuple[list[dict], dict[str, str]]:
    records = [{"name": n, "alpha": 3.0, "entropy": e} for n, e in entropies.items()]
    return records, {n: phase for n in entropies}


def test_a_matrix_turns_only_after_staying_above_its_minimum_for_the_patience() -> None:
    lows: dict[str, EntropyLow] = {}
    trail = [0.90, 0.80, 0.70, 0.702, 0.71, 0.72, 0.69, 0.75]  # 0.702 is within 0.5 % of 0.70; 0.69 a new low
    turned = []
    for progress, e in enumerate(trail, start=1):
        lows = update_lows(lows, [{"name": "fc", "entropy": e}], 0.005, progress=float(progress))
        turned.append(bool(turned_matrices(lows, [{"name": "fc"}], 1.0, float(progress))))
    assert turned == [False, False, False, False, False, True, False, False]
    assert lows["fc"] == EntropyLow(0.69, above_since=8.0)


def test_over_fitting_stops_when_half_the_learning_matrices_turned_and_names_the_best_analysis() -> None:
    crit = StopCriteria(stop_on="heavy_tailed")
    trail = {"a": [0.9, 0.8, 0.7, 0.75, 0.78], "b": [0.9, 0.85, 0.82, 0.81, 0.80], "c": [0.9, 0.8, 0.7, 0.74, 0.8]}
    state, decisions = StopState(), []
    for i in range(5):
        records, phases = _analysis({n: v[i] for n, v in trail.items()})
        decision, state = evaluate_stop(crit, state, records, phases, epoch=i, step=10 * i, analysis=i + 1)
        decisions.append(decision)
    # a and c are above their minimum (epoch 2) from epoch 3 on, for 1 epoch at epoch 4: 2 of 3 matrices turned
    assert [d.should_stop for d in decisions] == [False, False, False, False, True]
    assert [d.new_best for d in decisions] == [True, True, True, False, False]
    stop = decisions[-1]
    assert stop.reason is StopReason.OVERFITTING and stop.restore_best
    assert state.best.analysis == 3 and state.best.step == 20 and state.best.epoch == 2
    assert "entropy rising in 2 of 3 learning weight matrices" in stop.message and "epoch 2" in stop.message


def test_still_learning_or_random_like_matrices_never_trigger_it() -> None:
    crit = StopCriteria(stop_on="heavy_tailed")
    state = StopState()
    for i, e in enumerate([0.9, 0.8, 0.7, 0.65, 0.62, 0.61]):  # still falling: never turned
        decision, state = evaluate_stop(crit, state, *_analysis({"a": e}), epoch=i)
        assert not decision.should_stop and decision.new_best
    state = StopState()
    for i, e in enumerate([0.9, 0.8, 0.85, 0.9, 0.95]):  # random-like matrices are not learning matrices
        decision, state = evaluate_stop(crit, state, *_analysis({"a": e}, "random_like"), epoch=i)
        assert not decision.should_stop
    off = StopCriteria(stop_on="heavy_tailed", overfitting=False)
    state = StopState()
    for i, e in enumerate([0.9, 0.7, 0.8, 0.9, 0.95]):
        decision, state = evaluate_stop(off, state, *_analysis({"a": e}), epoch=i)
        assert not decision.should_stop and state.best is None


def test_structure_score_is_the_mean_entropy_of_classified_matrices() -> None:
    records = [{"name": "a", "entropy": 0.5}, {"name": "b", "entropy": 0.7}, {"name": "c", "entropy": float("nan")}]
    assert structure_score(records, {"a": "heavy_tailed", "b": "random_like", "c": "heavy_tailed"}) == 0.6
    assert structure_score(records, {}) != structure_score(records, {})  # NaN: nothing classified


def test_replay_says_which_analysis_would_be_restored_and_the_state_round_trips(tmp_path) -> None:
    baseline = [{"name": "a", "alpha": 3.0, "entropy": 0.95, "phase": "heavy_tailed", "status": "success"}]
    analyses = [{"epoch": 0, "trigger": "train_start", "step": 0, "analysis": 0, "records": baseline}]
    for i, e in enumerate([0.8, 0.7, 0.76, 0.78, 0.8]):
        analyses.append({"epoch": i, "trigger": "epoch_end", "step": 8 * (i + 1), "analysis": i + 1,
                         "records": [{"name": "a", "alpha": 3.0, "entropy": e, "phase": "heavy_tailed",
                                      "status": "success"}]})
    stop = replay_stop(analyses, phase_hysteresis=1)
    assert stop["reason"] == "OVERFITTING" and stop["epoch"] == 3 and stop["restore_step"] == 16
    state = StopState(best=None)
    crit = StopCriteria(stop_on="heavy_tailed")
    for a in analyses[1:4]:
        _, state = evaluate_stop(crit, state, a["records"], {"a": "heavy_tailed"}, epoch=a["epoch"], step=a["step"])
    torch.save({"s": state.state_dict()}, tmp_path / "s.pt")
    assert StopState.from_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["s"]) == state


def test_criteria_reject_nonsense_over_fitting_thresholds() -> None:
    for kwargs in ({"overfit_tolerance": -1}, {"overfit_fraction": 0}, {"overfit_patience": -1}):
        with pytest.raises(ValueError):
            StopCriteria(stop_on="heavy_tailed", **kwargs)


# ------------------------------------------------------------------------------------------- the kept copy


def test_kept_weights_copy_back_exactly_and_survive_a_file(tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    model(torch.randn(32, 8))  # moves the BatchNorm running statistics (buffers are kept too)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = KeptWeights()
    assert kept.empty and not kept.restore(model)
    kept.take(model, analysis=3)
    assert kept.nbytes == sum(v.numel() * v.element_size() for v in before.values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(32, 8))
    kept.save(str(tmp_path / "best.pt"))
    fresh = KeptWeights()
    fresh.load(str(tmp_path / "best.pt"))
    assert fresh.analysis == 3 and fresh.restore(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not fresh.restore(torch.nn.Linear(8, 16))  # a different model: nothing written


# ------------------------------------------------------------------------------------ real Trainer runs


def test_kept_weights_follow_a_module_that_lost_a_layer() -> None:
    """A copy taken after a layer was removed holds only the layers the module has (it once kept the removed one's
    tensors too, so restoring found the copy "not fitting" and kept the last weights)."""
    kept = KeptWeights()
    kept.take(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)), analysis=1)
    smaller = torch.nn.Sequential(torch.nn.Linear(8, 8))
    kept.take(smaller, analysis=2)
    expected = smaller[0].weight.detach().clone()
    with torch.no_grad():
        smaller[0].weight.add_(1.0)
    assert kept.restore(smaller) and torch.equal(smaller[0].weight, expected)


def _fit(tmp_path, model, callback, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=[callback, *kwargs.pop("callbacks", [])],
                         **trainer_kwargs(tmp_path, **{"logger": False, "max_epochs": 20, **kwargs}))
    trainer.fit(model)
    return trainer


class Snapshots(pl.Callback):
    """The layer's weight at the end of every epoch (to check what was restored)."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.weights[trainer.current_epoch] = pl_module.layer.weight.detach().clone()


def test_an_over_fitting_run_stops_at_the_turn_and_restores_the_best_weights(tmp_path, capsys) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = HTSRCallback(stop_on="heavy_tailed", restore_best_weights=True, log_figures_every=None)
    snapshots = Snapshots()
    model = ShiftNet(switch=5)
    trainer = _fit(tmp_path, model, callback, callbacks=[snapshots], logger=logger)
    assert callback.stopping_reason is StopReason.OVERFITTING
    assert 5 <= callback.stopped_epoch <= 9 and trainer.current_epoch == callback.stopped_epoch + 1
    best = callback.best_analysis
    assert best is not None and 3 <= best.epoch < callback.stopped_epoch and callback.restored
    assert torch.equal(model.layer.weight, snapshots.weights[best.epoch])  # exactly the weights of that analysis
    assert model.distance_to(model.low_rank) < model.distance_to(model.full_rank)  # the structured map, handed back
    assert f"weights of epoch {best.epoch}" in callback.stopping_reason_message
    out = capsys.readouterr().out
    assert "Stopped early: over-fitting: spectral entropy rising" in out
    assert f"The model now holds the weights of analysis {best.analysis} (epoch {best.epoch}" in out
    history = read_history(callback.history_path)
    assert history["best_analysis"].iloc[-1] == best.analysis
    assert float(trainer.callback_metrics["htsr/best_analysis"]) == best.analysis
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("htsr/stopping_reason/text_summary")]
    assert any("restored the weights of the best analysis" in t for t in texts)


def test_without_restore_the_over_fitting_stop_keeps_the_last_weights(tmp_path) -> None:
    callback = HTSRCallback(stop_on="heavy_tailed", history_file=None, spectra_file=None, print_summary=False)
    model = ShiftNet(switch=5)
    _fit(tmp_path, model, callback)
    assert callback.stopping_reason is StopReason.OVERFITTING and not callback.restored
    assert callback.kept.empty  # nothing copied when restoring is off
    assert "Keeping the last weights" in callback.stopping_reason_message


def test_a_run_still_learning_is_not_stopped_and_observing_never_stops(tmp_path, capsys) -> None:
    learning = HTSRCallback(stop_on="heavy_tailed", restore_best_weights=True, history_file=None,
                            spectra_file=None)
    trainer = _fit(tmp_path / "a", ShiftNet(switch=None), learning, max_epochs=8)
    assert learning.stopping_reason is StopReason.NOT_STOPPED and trainer.current_epoch == 8
    assert not learning.restored and learning.best_analysis.epoch == 7  # the latest weights are the best ones
    out = capsys.readouterr().out  # weights still moving at the end: the summary says what the rule cannot see
    assert "Not stopped by HT-SR" in out and MOVING_HINT in out and "validation metrics" not in out
    validated = HTSRCallback(stop_on="heavy_tailed", history_file=None, spectra_file=None)
    _fit(tmp_path / "v", ValidatedShiftNet(switch=None), validated, max_epochs=4, limit_val_batches=1.0)
    out = capsys.readouterr().out  # ... and names the validation metric the run logs
    assert MOVING_HINT in out and "Logged validation metrics you could monitor: val_err." in out
    watching = HTSRCallback(history_file=None, spectra_file=None)  # stop_on=None
    trainer = _fit(tmp_path / "b", ShiftNet(switch=5), watching, max_epochs=10)
    assert watching.stopping_reason is StopReason.NOT_STOPPED and trainer.current_epoch == 10
    out = capsys.readouterr().out
    assert "stopping is off" in out and MOVING_HINT not in out


def test_the_settled_rule_stops_a_converging_run_whose_weights_still_move(tmp_path) -> None:
    callback = HTSRCallback(stop_on="heavy_tailed", history_file=None, spectra_file=None, print_summary=False)
    snapshots = Snapshots()
    model = ShiftNet(switch=None)  # learns the low-rank map and converges: no turn, a plateau
    trainer = _fit(tmp_path, model, callback, callbacks=[snapshots], max_epochs=60)
    assert callback.stopping_reason is StopReason.SETTLED and 20 <= callback.stopped_epoch < 59
    assert trainer.current_epoch == callback.stopped_epoch + 1
    end = callback.stopped_epoch
    moved = float((snapshots.weights[end] - snapshots.weights[end - 7]).norm() / snapshots.weights[end].norm())
    assert moved > 1e-3  # not frozen weights: they still move, the spectra no longer do (beyond the tolerances)
    assert callback.stop_state.anchors["layer"].epoch <= end - 7 + 1


def test_a_run_resumed_after_the_best_analysis_still_restores_its_weights(tmp_path) -> None:
    straight = HTSRCallback(stop_on="heavy_tailed", restore_best_weights=True, print_summary=False)
    reference = ShiftNet(switch=5)
    _fit(tmp_path / "a", reference, straight)
    assert straight.restored
    best = straight.best_analysis

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_epochs=1)
    first = HTSRCallback(stop_on="heavy_tailed", restore_best_weights=True, print_summary=False)
    _fit(tmp_path / "b", ShiftNet(switch=5), first, callbacks=[ckpt], max_epochs=best.epoch + 2,
         enable_checkpointing=True)
    assert first.stopping_reason is StopReason.NOT_STOPPED and first.best_analysis == best
    state = torch.load(ckpt.last_model_path, weights_only=True)["callbacks"][first.state_key]
    assert os.path.exists(state["best_weights_file"]) and state["stop_state"]["best"]["analysis"] == best.analysis

    resumed = HTSRCallback(stop_on="heavy_tailed", restore_best_weights=True, print_summary=False)
    model = ShiftNet(switch=5)
    trainer = pl.Trainer(callbacks=[resumed], **trainer_kwargs(tmp_path / "b", logger=False, max_epochs=20))
    trainer.fit(model, ckpt_path=ckpt.last_model_path)
    assert resumed.stopped_epoch == straight.stopped_epoch and resumed.restored
    assert torch.equal(model.layer.weight, reference.layer.weight)  # the same weights as the uninterrupted run

    os.remove(state["best_weights_file"])  # the kept copy is gone: warn, stop anyway, keep the last weights
    lost = HTSRCallback(stop_on="heavy_tailed", restore_best_weights=True, print_summary=False)
    trainer = pl.Trainer(callbacks=[lost], **trainer_kwargs(tmp_path / "b", logger=False, max_epochs=20))
    with pytest.warns(UserWarning, match="could not read the kept best weights"):
        trainer.fit(ShiftNet(switch=5), ckpt_path=ckpt.last_model_path)
    assert lost.stopping_reason is StopReason.OVERFITTING and not lost.restored
    assert "No kept copy" in lost.stopping_reason_message


class GrowingNet(ShiftNet):
    """``ShiftNet(switch=None)`` whose layer is replaced at epoch ``grow`` by a fresh, narrower one (it reads the first
    96 inputs only): model surgery mid-training, the new layer learning the same low-rank map from scratch."""

    def __init__(self, grow: int = 6) -> None:
        super().__init__(switch=None)
        self.grow = grow

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.grow:
            torch.manual_seed(1)
            self.layer = torch.nn.Linear(96, 256, bias=False)
            self.trainer.strategy.setup_optimizers(self.trainer)  # the optimizer of the new parameters

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        width = self.layer.in_features
        return torch.nn.functional.mse_loss(self.layer(x[:, :width]), x[:, :width] @ self.low_rank[:, :width].T)


def test_a_replaced_layer_is_judged_afresh_not_against_its_predecessors_spectra(tmp_path, caplog) -> None:
    records = [{"name": "fc", "alpha": 3.0, "entropy": e, "N": n, "M": 128} for e, n in ((0.6, 256), (0.9, 192))]
    crit, state = StopCriteria(stop_on="heavy_tailed"), StopState()
    for epoch, record in enumerate([records[0], records[0], records[1], records[1], records[1]]):
        decision, state = evaluate_stop(crit, state, [record], {"fc": "heavy_tailed"}, epoch=epoch)
        assert not decision.should_stop  # the wider entropy belongs to another matrix: no turn
    assert state.lows["fc"].entropy == 0.9 and state.shapes["fc"] == (192, 128, 1)
    assert StopState.from_state_dict(state.state_dict()) == state
    tracker = PhaseTracker(k=2)
    tracker.update({"fc": "heavy_tailed"})
    state, gone = forget_replaced(state, [{"name": "fc", "N": np.int64(64), "M": np.int64(32)}], tracker)
    assert gone == ["fc"] and "fc" not in tracker.smoothed and "fc" not in state.lows  # NumPy sizes (a history)
    assert tracker.update({"fc": "random_like"})["fc"] == "random_like"  # taken at once: no hysteresis

    callback = HTSRCallback(stop_on="heavy_tailed", restore_best_weights=True, spectra_file=None, print_summary=False)
    model = GrowingNet(grow=6)
    with caplog.at_level("INFO"):
        trainer = _fit(tmp_path, model, callback, max_epochs=16)
    assert model.layer.in_features == 96  # the layer was replaced and trained on
    assert "layer changed shape (a layer replaced?)" in caplog.text
    # the new layer learns the same low-rank map, its entropy falling from random: never an over-fitting turn
    assert callback.stopping_reason is not StopReason.OVERFITTING, callback.stopping_reason_message
    assert trainer.current_epoch >= 12 and callback.stop_state.shapes["layer"] == (256, 96, 1)
    history = read_history(callback.history_path)
    analyses = [{"epoch": int(rows["epoch"].iloc[0]), "trigger": rows["trigger"].iloc[0], "analysis": int(index),
                 "step": int(rows["global_step"].iloc[0]), "records": rows.to_dict("records")}
                for index, rows in history.groupby("analysis")]
    replayed = replay_stop(analyses)  # the replay reads the history the same way: the same (non-)decision
    assert (replayed["reason"] if replayed else "NOT_STOPPED") == callback.stopping_reason.name
    # the previous code's replay of the same history: a false over-fitting stop right after the surgery
    assert replay_stop([{**a, "records": [{k: v for k, v in r.items() if k not in ("N", "M")}
                                          for r in a["records"]]} for a in analyses])["reason"] == "OVERFITTING"


# ------------------------------------------------------------------------------------- a monitored metric


def test_a_monitored_metric_judges_the_best_analysis_and_stops_once_it_stalls() -> None:
    crit = StopCriteria(stop_on="heavy_tailed", monitor="val_loss", monitor_patience=3, overfitting=False)
    state, decisions = StopState(), []
    values = [1.0, 0.8, 0.7, None, 0.75, 0.71, 0.9]  # None: no validation since the previous analysis
    for i, value in enumerate(values):
        decision, state = evaluate_stop(crit, state, *_analysis({"a": 0.8 - 0.05 * i}), epoch=i, step=i,
                                        analysis=i + 1, monitored=value)
        decisions.append(decision)
    assert [d.should_stop for d in decisions] == [False] * 6 + [True]
    assert [d.new_best for d in decisions] == [True, True, True, False, False, False, False]
    stop = decisions[-1]
    assert stop.reason is StopReason.MONITOR and stop.restore_best and state.best.epoch == 2
    assert state.best.score == 0.7 and "val_loss has not improved for 3 analyses (best 0.7 at epoch 2" in stop.message


def test_a_monitored_metric_that_never_improved_does_not_stop_and_max_mode_works() -> None:
    crit = StopCriteria(stop_on="heavy_tailed", monitor="val_loss", monitor_patience=2, overfitting=False)
    state = StopState()
    for i, value in enumerate([2.302, 2.303, 2.301, 2.304, 2.305, 2.306]):  # at chance: never 1 % better than first
        decision, state = evaluate_stop(crit, state, *_analysis({"a": 0.9}), epoch=i, monitored=value)
        assert not decision.should_stop
    crit = StopCriteria(monitor="val_acc", monitor_mode="max", monitor_patience=2)  # stop_on=None: the metric alone
    state, stops = StopState(), []
    for i, value in enumerate([0.1, 0.5, 0.9, 0.8, 0.85]):
        decision, state = evaluate_stop(crit, state, *_analysis({"a": 0.9}), epoch=i, monitored=value)
        stops.append(decision.should_stop)
    assert stops == [False, False, False, False, True] and state.best.score == 0.9
    with pytest.raises(ValueError):
        StopCriteria(monitor="x", monitor_mode="up")


class ValidatedShiftNet(ShiftNet):
    """:class:`ShiftNet` with a validation metric: the error of the layer on the low-rank map (what it should keep)."""

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        (x,) = batch
        self.log("val_err", torch.nn.functional.mse_loss(self.layer(x), x @ self.low_rank.T))

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.inputs[:128] * 1.1), batch_size=64)


def test_a_monitored_validation_metric_stops_and_restores_its_best_weights(tmp_path) -> None:
    callback = HTSRCallback(stop_on="heavy_tailed", monitor="val_err", monitor_patience=2, detect_overfitting=False,
                            every_n_steps=4, history_file=None, spectra_file=None, print_summary=False)
    snapshots = Snapshots()
    model = ValidatedShiftNet(switch=5)
    trainer = _fit(tmp_path, model, callback, callbacks=[snapshots], limit_val_batches=None)
    # the metric is best at the end of epoch 5 (the first on the new map still lowers it), worse at 6 and 7: stop
    # after epoch 7. Every epoch end falls on a step analysis (every_n_steps=4, 8 steps per epoch) made before
    # validation: the metric is judged at the epoch end, at the weights it validated
    assert callback.stopping_reason is StopReason.MONITOR and callback.stopped_epoch == 7
    assert trainer.current_epoch == 8 and callback.restored and callback.restore_best_weights  # on with a monitor
    assert callback.best_analysis.epoch == 5 and callback.best_analysis.step == 48
    assert torch.equal(model.layer.weight, snapshots.weights[5])
    assert "val_err has not improved for 2 analyses" in callback.stopping_reason_message


class RepeatingAccuracyNet(ValidatedShiftNet):
    """:class:`ValidatedShiftNet` logging an accuracy-like metric that rises until epoch 3 and then repeats exactly,
    as a discrete validation accuracy does on a plateau."""

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_acc", float(min(self.current_epoch, 3)))


@pytest.mark.parametrize("every", [1, 2])
def test_a_monitored_accuracy_that_repeats_exactly_still_counts_towards_the_patience(tmp_path, every) -> None:
    """An unchanged value after a new validation is a stale epoch (it once read as "no new value", and a monitored
    accuracy never stopped training); an epoch without validation is not (``check_val_every_n_epoch``)."""
    callback = HTSRCallback(stop_on="heavy_tailed", monitor="val_acc", monitor_mode="max", monitor_patience=2,
                            detect_overfitting=False, history_file=None, spectra_file=None, print_summary=False)
    snapshots = Snapshots()
    model = RepeatingAccuracyNet(switch=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, model, callback, callbacks=[snapshots], limit_val_batches=None, check_val_every_n_epoch=every)
    # an epoch end before the first validation is not a missing metric (it once warned "not among the logged")
    assert not [w for w in caught if "not among the logged metrics" in str(w.message)]
    # every epoch: 0, 1, 2, 3, 3, 3 -> best at 3, stop after 5; every second epoch (1, 3, 5, 7): 1, 3, 3, 3 -> after 7
    assert callback.stopping_reason is StopReason.MONITOR and callback.stopped_epoch == 3 + 2 * every
    assert callback.best_analysis.epoch == 3 and callback.restored
    assert torch.equal(model.layer.weight, snapshots.weights[3])


def test_a_monitor_that_is_never_logged_warns_once_and_the_weights_rule_goes_on(tmp_path) -> None:
    callback = HTSRCallback(stop_on="heavy_tailed", monitor="val_missing", history_file=None, spectra_file=None,
                            print_summary=False)
    with pytest.warns(UserWarning, match="monitor='val_missing' is not among the logged metrics") as caught:
        _fit(tmp_path, ShiftNet(switch=5), callback)
    assert sum("val_missing" in str(w.message) for w in caught) == 1
    assert callback.stopping_reason is StopReason.OVERFITTING  # the spectra's own signal still stops it
    assert not callback.restored  # with a monitor, only the monitor's own stop hands its best back
    assert "Keeping the last weights (no analysis was judged best)" in callback.stopping_reason_message


def test_a_run_resumed_from_a_checkpoint_saved_at_validation_end_stops_at_the_same_epoch(tmp_path) -> None:
    """``ModelCheckpoint(save_on_train_epoch_end=False)`` saves after validation, before the epoch end where the
    callback counts the monitored value: the value read after validation is in the checkpoint, so the resumed run
    still counts it (it once stopped an epoch later, warning that the metric was not logged), and the history rows
    written after that checkpoint are moved aside, not duplicated."""

    def run(root, max_epochs, ckpt_path=None):
        callback = HTSRCallback(stop_on="heavy_tailed", monitor="val_err", monitor_patience=2,
                                detect_overfitting=False, print_summary=False, log_figures_every=None)
        checkpoint = ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, save_on_train_epoch_end=False)
        model = ValidatedShiftNet(switch=5)
        trainer = pl.Trainer(callbacks=[callback, checkpoint], **trainer_kwargs(
            root, logger=CSVLogger(str(root), name="", version=0), max_epochs=max_epochs, limit_val_batches=None,
            enable_checkpointing=True))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, ckpt_path=ckpt_path)
        messages = [str(w.message) for w in caught]
        assert not [m for m in messages if "not among the logged metrics" in m]
        return callback, model, messages

    full, full_model, _ = run(tmp_path / "full", 20)
    assert full.stopping_reason is StopReason.MONITOR and full.stopped_epoch == 7 and full.best_analysis.epoch == 5
    run(tmp_path / "cut", 7)  # epochs 0-6; the last checkpoint is epoch 6's validation end
    resumed, resumed_model, messages = run(tmp_path / "cut", 20, ckpt_path="last")
    assert [m for m in messages if "written after the checkpoint this run resumes from" in m]
    assert (resumed.stopped_epoch, resumed.best_analysis, resumed.restored) == (7, full.best_analysis, True)
    assert torch.equal(resumed_model.layer.weight, full_model.layer.weight)  # the same epoch-5 weights handed back
    columns = ["analysis", "epoch", "global_step", "name", "alpha", "best_analysis"]
    history = read_history(resumed.history_path)[columns]
    assert history.equals(read_history(full.history_path)[columns])
    assert (tmp_path / "cut" / "version_0" / "htsr_history.superseded1.csv").is_file()



class TrainMetricNet(ValidatedShiftNet):
    """:class:`ValidatedShiftNet` that also logs an epoch-level training metric (what a monitor may name too)."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_err", loss, on_step=False, on_epoch=True)
        return loss


def test_a_monitored_training_metric_is_read_at_the_epoch_end_also_with_validation(tmp_path) -> None:
    """With validation in the run, a monitored epoch-level *training* metric is still the epoch's own value (it is
    computed after validation ends, so reading it only there lagged an epoch and warned at epoch 0)."""
    callback = HTSRCallback(stop_on="heavy_tailed", monitor="train_err", monitor_patience=2, detect_overfitting=False,
                            history_file=None, spectra_file=None, print_summary=False)
    seen: list[float] = []

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            seen.append(float(trainer.callback_metrics["train_err"]))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, TrainMetricNet(switch=5), callback, callbacks=[Watch()], limit_val_batches=None)
    assert not [w for w in caught if "not among the logged metrics" in str(w.message)]
    best = callback.best_analysis
    upto = callback.stopped_epoch + 1 if callback.stopped_epoch >= 0 else len(seen)
    assert best is not None and seen[best.epoch] == min(seen[:upto])  # the best is judged on each epoch's own value
