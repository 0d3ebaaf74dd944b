"""Does HT-SR early stopping work? The stopping benchmark.

For every task x seed (tasks in ``stopping_tasks.py``: MLPs, 1-D and 2-D CNNs, a transformer, a GRU; SGD and Adam;
constant and decaying learning rates) the script trains:

1. a **reference** run for the full epoch budget with ``HTSRCallback`` observing only, recording the held-out test
   accuracy after every epoch (and at every step-triggered analysis), the validation loss, and the HT-SR history;
2. a run with **the stop rule**: ``HTSRCallback(stop_on="heavy_tailed")`` with its defaults (weights only: no
   labels, no loss, no validation data enter the rule);
3. a run with the peer, Lightning's ``EarlyStopping(monitor="val_loss", patience=5)`` (it needs a validation set).

Runs are seeded and deterministic on CPU (one thread), so the stopped runs follow the reference run's trajectory up
to their stop: the script checks that the rule replayed on the reference history stops at the same epoch as the live
run. The replay is also how other rules and the every-k-steps schedule are measured (``--rule``, ``--study``).

For each run: epochs run, test accuracy at the stop, the reference's best test accuracy, the loss (points). Summary:
share of runs within 1 accuracy point of the reference best, mean share of epochs saved, runs that never stopped.

    python benchmarks/bench_stopping.py                       # full run (about 30 min on 2 cores)
    python benchmarks/bench_stopping.py --quick               # tiny budgets: a smoke test of the script
    python benchmarks/bench_stopping.py --json out.json --cache .stopping_cache
    python benchmarks/bench_stopping.py --tasks gru_seq --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stopping_tasks import TASKS, Task  # noqa: E402

from lightning_htsr import HTSRCallback  # noqa: E402
from lightning_htsr.phases import PhaseTracker  # noqa: E402
from lightning_htsr.sinks import read_history  # noqa: E402
from lightning_htsr.stopping import StopCriteria, over_trained, replay_stop  # noqa: E402

HISTORY_COLUMNS = ("name", "N", "M", "num_evals", "status", "phase", "alpha", "entropy", "stable_rank",
                   "mp_softrank", "log_spectral_norm", "log_norm", "D", "num_spikes", "warning")
WITHIN_POINTS = 1.0


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
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), prog_bar=False)

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
        correct = sum(int((module(x).argmax(-1) == y).sum()) for x, y in zip(self.x.split(1024), self.y.split(1024)))
        module.train(was_training)
        return 100.0 * correct / len(self.y)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.steps.append({"step": step, "epoch": trainer.current_epoch, "test_acc": self._accuracy(pl_module)})

    def on_train_epoch_end(self, trainer, pl_module):
        val = trainer.callback_metrics.get("val_loss")
        self.epochs.append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                            "test_acc": self._accuracy(pl_module),
                            "val_loss": float(val) if val is not None else math.nan})


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
          every_n_steps: int | None = None, quick: bool = False) -> tuple[Recorder, pl.Trainer]:
    """One seeded, deterministic training run; returns the recorder (curves) and the trainer."""
    pl.seed_everything(seed, workers=True, verbose=False)
    train_split, val_split, test_split = splits(task, seed, quick)
    model = Classifier(task.model(seed), task, epochs)
    recorder = Recorder(test_split, every_n_steps)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         callbacks=[recorder, *callbacks], deterministic=True, num_sanity_val_steps=0)
    trainer.fit(model, _loader(train_split, task.batch_size, True, seed), _loader(val_split, 1024, False, seed))
    return recorder, trainer


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
        recorder, _ = train(task, seed, epochs, [htsr], root, quick=quick)
    return {"epochs_run": len(recorder.epochs), "stopped": htsr.stopped_epoch >= 0,
            "test_acc": recorder.epochs[-1]["test_acc"], "message": htsr.stopping_reason_message}


def early_stopping_run(task: Task, seed: int, epochs: int, quick: bool = False) -> dict[str, Any]:
    """The peer: Lightning's ``EarlyStopping(monitor="val_loss", patience=5)``."""
    with tempfile.TemporaryDirectory() as root:
        es = EarlyStopping(monitor="val_loss", patience=5)
        recorder, _ = train(task, seed, epochs, [es], root, quick=quick)
    return {"epochs_run": len(recorder.epochs), "stopped": es.stopped_epoch > 0,
            "test_acc": recorder.epochs[-1]["test_acc"]}


# -------------------------------------------------------------------------------------------- replays


def replay(reference: dict[str, Any], rule: dict[str, Any], schedule: str = "epoch") -> dict[str, Any]:
    """The stop rule on the reference history: where it would have stopped (same code as the callback).

    ``schedule="epoch"`` uses the epoch-end analyses (the callback's default); ``"steps"`` every analysis (about three
    per epoch). Returns the stop's epoch (0-based; ``None`` = never), fractional epochs run, and test accuracy there.
    """
    analyses = reference["analyses"] if schedule == "steps" else epoch_end_analyses(reference)
    spe = reference["steps_per_epoch"]
    stop = replay_stop([{**a, "progress": a["step"] / spe} for a in analyses], **rule)
    curve = reference["curve"]
    if stop is None:
        return {"stop_epoch": None, "epochs_run": len(curve), "test_acc": curve[-1]["test_acc"], "stopped": False}
    accuracy = {c["step"]: c["test_acc"] for c in reference["step_curve"] + curve}
    return {"stop_epoch": stop["epoch"], "epochs_run": stop["step"] / spe, "test_acc": accuracy[stop["step"]],
            "stopped": True, "message": stop["message"]}


def epoch_end_analyses(reference: dict[str, Any]) -> list[dict[str, Any]]:
    """The baseline and the analyses at epoch ends (the callback's default schedule); an epoch end may have been
    triggered by the step schedule."""
    ends = {c["step"] for c in reference["curve"]}
    return [a for a in reference["analyses"] if a["trigger"] == "train_start" or a["step"] in ends]


def early_stopping_replay(reference: dict[str, Any], patience: int = 5, min_delta: float = 0.0) -> dict[str, Any]:
    """``EarlyStopping(monitor="val_loss", mode="min", patience, min_delta)`` on the reference validation curve."""
    best, wait = math.inf, 0
    for point in reference["curve"]:
        if point["val_loss"] < best - min_delta:
            best, wait = point["val_loss"], 0
        else:
            wait += 1
            if wait >= patience:
                return {"stop_epoch": point["epoch"], "epochs_run": point["epoch"] + 1, "test_acc": point["test_acc"],
                        "stopped": True}
    return {"stop_epoch": None, "epochs_run": len(reference["curve"]), "test_acc": reference["curve"][-1]["test_acc"],
            "stopped": False}


#: Rules compared by ``--study`` (replayed on the reference runs): the 0.1 rule, and variants of the settled rule.
CANDIDATES: dict[str, dict[str, Any]] = {
    "phase_fraction 0.8 (0.1 default)": {"rule": "phase_fraction", "stop_fraction": 0.8},
    "phase_fraction 0.5": {"rule": "phase_fraction", "stop_fraction": 0.5},
    "phase_fraction 0.5, patience 5": {"rule": "phase_fraction", "stop_fraction": 0.5, "patience": 5},
    "settled (default): alpha 5%, entropy 1%, 7 ep": {},
    "settled: alpha 5%, entropy 1%, 6 ep (chosen on seeds 0-2)": {"patience": 6},
    "settled: alpha 3%, entropy 1%, 7 ep": {"alpha_tolerance": 0.03},
    "settled: alpha 10%, entropy 1%, 7 ep": {"alpha_tolerance": 0.10},
    "settled: alpha 5%, entropy 0.5%, 7 ep": {"entropy_tolerance": 0.005},
    "settled: alpha 5%, entropy 2%, 7 ep": {"entropy_tolerance": 0.02},
    "settled: alpha 5%, entropy 1%, 4 ep": {"patience": 4},
    "settled: alpha 5%, entropy 1%, 10 ep": {"patience": 10},
    "settled: entropy only (1%), 7 ep": {"alpha_tolerance": math.inf},
    "settled: alpha only (5%), 7 ep": {"entropy_tolerance": math.inf},
}


def study(references: Sequence[dict[str, Any]]) -> None:
    """Replay every candidate rule (epoch and every-1/3-epoch schedules) and the over-trained warning's timing."""
    print(f"\n{'candidate rule (replayed)':<58} {'schedule':>9} {'within 1pt':>11} {'epochs saved':>13} "
          f"{'never stopped':>14} {'max loss':>9}")
    for name, rule in CANDIDATES.items():
        for schedule in ("epoch", "steps"):
            s = summary([row(ref, name, replay(ref, rule, schedule)) for ref in references])
            print(f"{name:<58} {schedule:>9} {s['within_1pt']:>11.0%} {s['epochs_saved']:>13.0%} "
                  f"{s['never_stopped']:>14.0%} {s['max_loss']:>9.2f}")
    over_trained_study(references)


def over_trained_study(references: Sequence[dict[str, Any]]) -> None:
    """How often a heavy-tailed matrix's alpha falls below 2 while test accuracy still improves by > 1 point."""
    events = []
    for ref in references:
        accs = {c["epoch"]: c["test_acc"] for c in ref["curve"]}
        tracker, seen = PhaseTracker(k=2), set()
        for a in epoch_end_analyses(ref):
            smoothed = tracker.update_records(a["records"])
            if a["trigger"] == "train_start":
                continue
            for name in (n for n in over_trained(a["records"], smoothed) if n not in seen):  # the callback's test
                seen.add(name)
                later = max(v for e, v in accs.items() if e >= a["epoch"])
                events.append((ref["task"], ref["seed"], name, a["epoch"], later - accs[a["epoch"]]))
    runs = {(t, s) for t, s, *_ in events}
    improving = [e for e in events if e[4] > WITHIN_POINTS]
    print(f"\nalpha < 2 (over-trained warning) on a heavy-tailed matrix: {len(events)} matrices in {len(runs)} of "
          f"{len(references)} runs; accuracy still rose by > {WITHIN_POINTS:g} point afterwards for {len(improving)} "
          f"of them ({len({(t, s) for t, s, *_ in improving})} runs).")
    for task, seed, name, epoch, gain in events:
        print(f"  {task:<16} seed {seed}  {name:<32} alpha < 2 from epoch {epoch:>3}; later gain {gain:+.1f} points")


# -------------------------------------------------------------------------------------------- summary


@dataclass
class Row:
    task: str
    seed: int
    budget: int
    best: float
    best_epoch: int
    method: str
    epochs_run: float
    stopped: bool
    test_acc: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.best - self.test_acc

    @property
    def saved(self) -> float:
        return 1.0 - self.epochs_run / self.budget


def row(reference: dict[str, Any], method: str, result: dict[str, Any]) -> Row:
    accs = [c["test_acc"] for c in reference["curve"]]
    best = max(accs)
    return Row(reference["task"], reference["seed"], reference["epochs"], best, accs.index(best), method,
               result["epochs_run"], result["stopped"], result["test_acc"],
               {k: v for k, v in result.items() if k not in ("epochs_run", "stopped", "test_acc")})


def summary(rows: Sequence[Row]) -> dict[str, float]:
    n = len(rows)
    return {"runs": n, "within_1pt": sum(r.loss <= WITHIN_POINTS + 1e-9 for r in rows) / n,
            "epochs_saved": sum(r.saved for r in rows) / n, "never_stopped": sum(not r.stopped for r in rows) / n,
            "mean_loss": sum(r.loss for r in rows) / n, "max_loss": max(r.loss for r in rows)}


def print_table(rows: Sequence[Row], methods: Sequence[str]) -> None:
    print(f"\n{'task':<16} {'seed':>4} {'best':>6} {'@ep':>4} | " + " | ".join(f"{m[:22]:>22}" for m in methods))
    print(f"{'':<16} {'':>4} {'':>6} {'':>4} | " + " | ".join(f"{'epochs   acc   loss':>22}" for _ in methods))
    keyed = {(r.task, r.seed, r.method): r for r in rows}
    for task, seed in sorted({(r.task, r.seed) for r in rows}, key=lambda k: (list(TASKS).index(k[0]), k[1])):
        ref = keyed[(task, seed, methods[0])]
        cells = []
        for m in methods:
            r = keyed[(task, seed, m)]
            run = f"{r.epochs_run:.1f}" if r.stopped else f"{r.budget}*"
            cells.append(f"{run:>6}/{r.budget:<3} {r.test_acc:5.1f} {r.loss:+5.1f}")
        print(f"{task:<16} {seed:>4} {ref.best:6.1f} {ref.best_epoch:>4} | " + " | ".join(f"{c:>22}" for c in cells))
    print("(* = never stopped; loss = reference best - accuracy at the stop, points)\n")
    print(f"{'method':<28} {'runs':>5} {'within 1pt':>11} {'epochs saved':>13} {'never stopped':>14} {'mean loss':>10}"
          f" {'max loss':>9}")
    for m in methods:
        s = summary([r for r in rows if r.method == m])
        print(f"{m:<28} {s['runs']:>5} {s['within_1pt']:>11.0%} {s['epochs_saved']:>13.0%} {s['never_stopped']:>14.0%}"
              f" {s['mean_loss']:>10.2f} {s['max_loss']:>9.2f}")


def plot(references: Sequence[dict[str, Any]], rows: Sequence[Row], path: Path) -> None:
    """Test accuracy of every reference run, one panel per task, with where each method stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in references)]
    cols = min(4, len(tasks))
    nrows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    stops = {(r.task, r.seed, r.method): r for r in rows}
    marks = {"htsr stop rule": ("o", "tab:red", "HT-SR stop (weights only)"),
             "EarlyStopping(val_loss, 5)": ("s", "tab:blue", "EarlyStopping(val_loss, 5)")}
    for ax, task in zip(axes.flat, tasks):
        for ref in (r for r in references if r["task"] == task):
            epochs = [c["epoch"] + 1 for c in ref["curve"]]
            accs = [c["test_acc"] for c in ref["curve"]]
            ax.plot(epochs, accs, color="0.55", lw=1)
            for method, (marker, color, _) in marks.items():
                r = stops.get((task, ref["seed"], method))
                if r is not None and r.stopped:
                    ax.plot(r.epochs_run, r.test_acc, marker, color=color, ms=7, mfc="none", mew=1.8)
        low = min([c["test_acc"] for r in references if r["task"] == task for c in r["curve"][len(r["curve"]) // 4:]]
                  + [r.test_acc for r in rows if r.task == task and r.method in marks and r.stopped])
        ax.set_ylim(max(0, low - 5), 100.5 if low > 90 else None)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color="0.55", label="full-budget run (one line per seed)")]
    handles += [plt.Line2D([], [], ls="", marker=m, color=c, mfc="none", mew=1.8, label=label)
                for m, c, label in marks.values()]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def load_or_run_reference(task: Task, seed: int, epochs: int, cache: Path | None,
                          quick: bool = False) -> dict[str, Any]:
    path = cache / f"{task.name}-{seed}-{epochs}{'-quick' if quick else ''}.json" if cache else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    reference = reference_run(task, seed, epochs, quick)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(reference))
    return reference


def rule_key(rule: dict[str, Any]) -> str:
    """A file-name-safe key of every setting of a rule (defaults included: changing a default misses the cache)."""
    criteria = StopCriteria(**{"stop_on": "heavy_tailed", **rule})
    return "_".join(f"{f.name}={getattr(criteria, f.name)}" for f in fields(criteria)).replace("/", "_")


def cached(cache: Path | None, key: str, run: Callable[[], dict[str, Any]], quick: bool) -> dict[str, Any]:
    """``run()``, kept as ``<cache>/<key>.json`` (quick runs are never cached)."""
    path = cache / f"{key}.json" if cache and not quick else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    result = run()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*too few eigenvalues.*")
    warnings.filterwarnings("ignore", message=".*deterministic.*")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test of the script)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rule", type=json.loads, default={}, help="HTSRCallback stop arguments as JSON")
    parser.add_argument("--no-live", action="store_true", help="replay the rule and EarlyStopping on the reference "
                        "runs instead of training stopped runs (same results when training is deterministic)")
    parser.add_argument("--cache", type=Path, help="directory to keep reference runs in (re-used when present)")
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    parser.add_argument("--figure", type=Path, help="write the accuracy curves with the stop points (PNG) here")
    parser.add_argument("--study", action="store_true", help="also replay the candidate rules and time the "
                        "over-trained warning on the reference runs")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(1)
    rows: list[Row] = []
    mismatches, references = [], []
    for name in args.tasks:
        task = TASKS[name]
        epochs = QUICK_EPOCHS if args.quick else task.epochs
        for seed in args.seeds:
            reference = load_or_run_reference(task, seed, epochs, args.cache, args.quick)
            references.append(reference)
            replayed = replay(reference, args.rule)
            rows.append(row(reference, "reference (full budget)", {"epochs_run": epochs, "stopped": False,
                                                                     "test_acc": reference["curve"][-1]["test_acc"]}))
            rows.append(row(reference, "htsr (every 1/3 epoch)", replay(reference, args.rule, "steps")))
            if args.no_live:
                rows.append(row(reference, "htsr stop rule", replayed))
                rows.append(row(reference, "EarlyStopping(val_loss, 5)", early_stopping_replay(reference)))
            else:
                live = cached(args.cache, f"{name}-{seed}-{epochs}-rule-{rule_key(args.rule)}",
                              lambda: rule_run(task, seed, epochs, args.rule, args.quick), args.quick)
                if live["epochs_run"] != (replayed["stop_epoch"] + 1 if replayed["stopped"] else epochs):
                    mismatches.append((name, seed, live["epochs_run"], replayed["stop_epoch"]))
                rows.append(row(reference, "htsr stop rule", {**live, "replay_stop_epoch": replayed["stop_epoch"]}))
                peer = cached(args.cache, f"{name}-{seed}-{epochs}-early_stopping",
                              lambda: early_stopping_run(task, seed, epochs, args.quick), args.quick)
                rows.append(row(reference, "EarlyStopping(val_loss, 5)", peer))
            best = max(c["test_acc"] for c in reference["curve"])
            print(f"{name} seed {seed}: reference {reference['seconds']:.0f} s, best {best:.1f}, rule stops at "
                  f"{replayed['stop_epoch']}", flush=True)
    methods = ["reference (full budget)", "htsr stop rule", "htsr (every 1/3 epoch)", "EarlyStopping(val_loss, 5)"]
    print_table(rows, methods)
    if args.study:
        study(references)
    if args.figure:
        plot(references, rows, args.figure)
    if mismatches:
        print(f"live and replayed stops differ (training not deterministic?): {mismatches}")
    if args.json:
        args.json.write_text(json.dumps({"rule": args.rule, "rows": [{**asdict(r), "loss": r.loss, "saved": r.saved}
                                                                      for r in rows],
                                         "summary": {m: summary([r for r in rows if r.method == m]) for m in methods},
                                         "mismatches": mismatches}, indent=1))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
