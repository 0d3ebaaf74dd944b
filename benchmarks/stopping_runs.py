"""The training runs of ``bench_stopping.py``: a reference run observing the whole budget, the stop rule live, and
Lightning's ``EarlyStopping`` live. Seeded and deterministic on CPU (one thread).

Kept apart from the benchmark's replays and tables so that the cache key of a reference run (this file, the tasks
and the package's analysis code) does not change when only the scoring changes.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from stopping_tasks import Task
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_htsr import HTSRCallback
from lightning_htsr.training.sinks import read_history

HISTORY_COLUMNS = ("name", "N", "M", "num_evals", "status", "phase", "alpha", "entropy", "stable_rank",
                   "mp_softrank", "log_spectral_norm", "log_norm", "D", "num_spikes", "warning", "num_pl_spikes",
                   "ERG_gap", "num_ERG_spikes", "matrix_rank", "xmin")


# -------------------------------------------------------------------------------------------- training


class Classifier(pl.LightningModule):
    """Cross-entropy classifier around any ``nn.Module``; the optimizer and per-epoch schedule come from the task."""

    def __init__(self, net: nn.Module, task: Task, epochs: int) -> None:
        super().__init__()
        self.net, self.task, self.epochs = net, task, epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=False)
        # argmax over dim 1: the classes of (batch, classes) and of a language model's (batch, vocab, length)
        self.log("val_acc", 100.0 * (logits.argmax(1) == y).float().mean(), prog_bar=False)

    def configure_optimizers(self):
        opt, sched = self.task.optimizer(self.parameters(), self.epochs)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}


class Recorder(pl.Callback):
    """Test accuracy (held-out, never seen by any stop rule) after every epoch and every ``every_n_steps``."""

    def __init__(self, test: tuple[torch.Tensor, torch.Tensor], every_n_steps: int | None) -> None:
        self.x, self.y = test
        self.every_n_steps = every_n_steps
        self.epochs: list[dict[str, float]] = []
        self.steps: list[dict[str, float]] = []

    @torch.no_grad()
    def _accuracy(self, module: pl.LightningModule) -> float:
        was_training = module.training
        module.eval()
        # argmax over dim 1: the classes of (batch, classes) and of a language model's (batch, vocab, length)
        correct = sum(int((module(x).argmax(1) == y).sum()) for x, y in zip(self.x.split(1024), self.y.split(1024)))
        module.train(was_training)
        return 100.0 * correct / self.y.numel()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.steps.append({"step": step, "epoch": trainer.current_epoch, "test_acc": self._accuracy(pl_module)})

    def on_train_epoch_end(self, trainer, pl_module):
        val = {k: trainer.callback_metrics.get(k) for k in ("val_loss", "val_acc")}
        self.epochs.append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                            "test_acc": self._accuracy(pl_module),
                            **{k: float(v) if v is not None else math.nan for k, v in val.items()}})


def _loader(split: tuple[torch.Tensor, torch.Tensor], batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(*split), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


#: ``--quick``: epochs per run and examples per split (a smoke test of the script, not a measurement).
QUICK_EPOCHS, QUICK_EXAMPLES = 2, 256


def splits(task: Task, seed: int, quick: bool = False) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The task's (train, val, test) splits; ``quick`` keeps the first :data:`QUICK_EXAMPLES` of each."""
    data = task.data(seed)
    return tuple((x[:QUICK_EXAMPLES], y[:QUICK_EXAMPLES]) for x, y in data) if quick else data


def train(task: Task, seed: int, epochs: int, callbacks: list[pl.Callback], root: str,
          every_n_steps: int | None = None, quick: bool = False) -> tuple[Recorder, float]:
    """One seeded, deterministic training run; returns the recorder (curves) and the test accuracy of the model that
    ``trainer.fit`` leaves in memory (what a user evaluates or saves next: restored weights where a callback restored
    them, otherwise the last epoch's)."""
    pl.seed_everything(seed, workers=True, verbose=False)
    train_split, val_split, test_split = splits(task, seed, quick)
    model = Classifier(task.model(seed), task, epochs)
    recorder = Recorder(test_split, every_n_steps)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         callbacks=[recorder, *callbacks], deterministic=True, num_sanity_val_steps=0)
    trainer.fit(model, _loader(train_split, task.batch_size, True, seed), _loader(val_split, 1024, False, seed))
    return recorder, recorder._accuracy(model)


def steps_per_epoch(task: Task, seed: int, quick: bool = False) -> int:
    return math.ceil(len(splits(task, seed, quick)[0][1]) / task.batch_size)


# ------------------------------------------------------------------------------------------------ runs


def reference_run(task: Task, seed: int, epochs: int, quick: bool = False) -> dict[str, Any]:
    """Full budget, the callback observing at every epoch end and about three times per epoch in steps."""
    every = max(1, steps_per_epoch(task, seed, quick) // 3)
    with tempfile.TemporaryDirectory() as root:
        history = os.path.join(root, "history.csv")
        htsr = HTSRCallback(every_n_steps=every, log_histograms=False, log_figures_every=None, history_file=history,
                            spectra_file=None, print_summary=False)
        start = time.perf_counter()
        recorder, _ = train(task, seed, epochs, [htsr], root, every_n_steps=every, quick=quick)
        seconds = time.perf_counter() - start
        frame = read_history(history)
    analyses = []
    groups = frame.groupby(["analysis", "epoch", "global_step", "trigger"], sort=True)
    for (index, epoch, step, trigger), rows in groups:
        records = [{c: _plain(r[c]) for c in HISTORY_COLUMNS if c in r} for r in rows.to_dict("records")]
        analyses.append({"analysis": int(index), "epoch": int(epoch), "step": int(step), "trigger": trigger,
                         "records": records})
    return {"task": task.name, "seed": seed, "epochs": epochs, "every_n_steps": every, "seconds": seconds,
            "steps_per_epoch": steps_per_epoch(task, seed, quick), "curve": recorder.epochs,
            "step_curve": recorder.steps,
            "analyses": analyses}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and math.isnan(value) else value


def rule_run(task: Task, seed: int, epochs: int, rule: dict[str, Any], quick: bool = False) -> dict[str, Any]:
    """The stop rule live: ``HTSRCallback(stop_on="heavy_tailed", **rule)``, weights only."""
    kwargs = {"stop_on": "heavy_tailed", **{("stop_rule" if k == "rule" else k): v for k, v in rule.items()}}
    with tempfile.TemporaryDirectory() as root:
        htsr = HTSRCallback(log_histograms=False, log_figures_every=None, history_file=None, spectra_file=None,
                            print_summary=False, **kwargs)
        recorder, final = train(task, seed, epochs, [htsr], root, quick=quick)
    best = htsr.best_analysis
    return {"epochs_run": len(recorder.epochs), "stopped": htsr.stopped_epoch >= 0, "test_acc": final,
            "last_acc": recorder.epochs[-1]["test_acc"], "message": htsr.stopping_reason_message,
            "restored_step": best.step if best is not None and htsr.restored else None}


def early_stopping_run(task: Task, seed: int, epochs: int, quick: bool = False, monitor: str = "val_loss",
                       mode: str = "min") -> dict[str, Any]:
    """The peer: Lightning's ``EarlyStopping(monitor, mode=mode, patience=5)`` (``val_loss`` or ``val_acc``)."""
    with tempfile.TemporaryDirectory() as root:
        es = EarlyStopping(monitor=monitor, mode=mode, patience=5)
        recorder, final = train(task, seed, epochs, [es], root, quick=quick)
    return {"epochs_run": len(recorder.epochs), "stopped": es.stopped_epoch > 0, "test_acc": final}
