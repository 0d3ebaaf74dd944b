"""Does HT-SR early stopping work? The stopping benchmark.

For every task x seed (tasks in ``stopping_tasks.py``: MLPs, 1-D and 2-D CNNs, a transformer, a GRU; SGD and Adam;
constant and decaying learning rates) the script trains:

1. a **reference** run for the full epoch budget with ``HTSRCallback`` observing only, recording the held-out test
   accuracy after every epoch (and at every step-triggered analysis), the validation loss, and the HT-SR history;
2. a run with **the stop rule**: ``HTSRCallback(stop_on="heavy_tailed")`` with its defaults (weights only: no
   labels, no loss, no validation data enter the rule);
3. runs with the peers, Lightning's ``EarlyStopping(monitor="val_loss", patience=5)`` and the same on ``val_acc``
   (they need a validation set).

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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stopping_runs import QUICK_EPOCHS, early_stopping_run, reference_run, rule_run, splits, train  # noqa: E402,F401
from stopping_signals import signal_table  # noqa: E402
from stopping_tasks import OVERFITTING, TASKS  # noqa: E402

from lightning_htsr.spectra.phases import PhaseTracker  # noqa: E402
from lightning_htsr.training.stopping import StopCriteria, over_trained, replay_stop  # noqa: E402

WITHIN_POINTS = 1.0
#: The peers, Lightning's ``EarlyStopping`` with patience 5: name -> (cache slug, (monitor, mode)).
PEERS: dict[str, tuple[str, tuple[str, str]]] = {
    "EarlyStopping(val_loss, 5)": ("early_stopping", ("val_loss", "min")),
    "EarlyStopping(val_acc, 5)": ("early_stopping_val_acc", ("val_acc", "max")),
}
#: Seeds the thresholds were chosen on; the others are held out (the figure that counts).
TUNING_SEEDS: tuple[int, ...] = (0, 1, 2)
#: The groups every summary is split by: which tasks, which seeds.
GROUPS: dict[str, Callable[[Any], bool]] = {
    "plateau tasks": lambda r: r.task not in OVERFITTING,
    "over-fitting tasks": lambda r: r.task in OVERFITTING,
    "tuning seeds": lambda r: r.seed in TUNING_SEEDS,
    "held-out seeds": lambda r: r.seed not in TUNING_SEEDS,
}


# -------------------------------------------------------------------------------------------- replays


def replay(reference: dict[str, Any], rule: dict[str, Any], schedule: str = "epoch") -> dict[str, Any]:
    """The stop rule on the reference history: where it would have stopped (same code as the callback).

    ``schedule="epoch"`` uses the epoch-end analyses (the callback's default); ``"steps"`` every analysis (about three
    per epoch). Returns the stop's epoch (0-based; ``None`` = never), fractional epochs run, and the test accuracy of
    the model ``trainer.fit`` leaves in memory: at the stop, or at the restored analysis when the rule hands back the
    weights of an earlier one.
    """
    analyses = reference["analyses"] if schedule == "steps" else epoch_end_analyses(reference)
    spe = reference["steps_per_epoch"]
    rule = dict(rule)
    restore = rule.pop("restore_best_weights", None)
    restore = rule.get("monitor") is not None if restore is None else restore  # the callback's default
    monitor = rule.get("monitor")
    val = {c["step"]: c.get(monitor) for c in reference["curve"]} if monitor else {}  # a missing metric: None
    stop = replay_stop([{**a, "progress": a["step"] / spe, "monitored": val.get(a["step"])} for a in analyses],
                       **rule)
    curve = reference["curve"]
    if stop is None:
        return {"stop_epoch": None, "epochs_run": len(curve), "test_acc": curve[-1]["test_acc"], "stopped": False}
    accuracy = {c["step"]: c["test_acc"] for c in reference["step_curve"] + curve}
    kept = stop["restore_step"] if restore and stop.get("restore_step") is not None else stop["step"]
    return {"stop_epoch": stop["epoch"], "epochs_run": stop["step"] / spe, "test_acc": accuracy[kept],
            "stopped": True, "message": stop["message"], "restored_step": stop.get("restore_step")}


def epoch_end_analyses(reference: dict[str, Any]) -> list[dict[str, Any]]:
    """The baseline and the analyses at epoch ends (the callback's default schedule); an epoch end may have been
    triggered by the step schedule."""
    ends = {c["step"] for c in reference["curve"]}
    return [a for a in reference["analyses"] if a["trigger"] == "train_start" or a["step"] in ends]


def early_stopping_replay(reference: dict[str, Any], patience: int = 5, min_delta: float = 0.0,
                          monitor: str = "val_loss", mode: str = "min") -> dict[str, Any]:
    """``EarlyStopping(monitor, mode, patience, min_delta)`` on the reference validation curve."""
    sign = 1.0 if mode == "min" else -1.0
    best, wait = math.inf, 0
    for point in reference["curve"]:
        if sign * point[monitor] < best - min_delta:
            best, wait = sign * point[monitor], 0
        else:
            wait += 1
            if wait >= patience:
                return {"stop_epoch": point["epoch"], "epochs_run": point["epoch"] + 1, "test_acc": point["test_acc"],
                        "stopped": True}
    return {"stop_epoch": None, "epochs_run": len(reference["curve"]), "test_acc": reference["curve"][-1]["test_acc"],
            "stopped": False}


#: Rules compared by ``--study`` (replayed on the reference runs): 0.1's rule, round 2's settled rule alone, and
#: variants of the over-fitting signal (``restore_best_weights`` is the callback's option, not a StopCriteria field).
CANDIDATES: dict[str, dict[str, Any]] = {
    "phase_fraction 0.8 (0.1 default)": {"rule": "phase_fraction", "stop_fraction": 0.8},
    "settled only (round 2 default)": {"overfitting": False},
    "settled + entropy turn 1 %, half, 1 ep (default)": {},
    "  + restore the analysis before the turn": {"restore_best_weights": True},
    "settled + entropy turn 0.2 %, half, 1 ep": {"overfit_tolerance": 0.002},
    "settled + entropy turn 0.5 %, half, 1 ep": {"overfit_tolerance": 0.005},
    "  + restore the analysis before the turn ": {"overfit_tolerance": 0.005, "restore_best_weights": True},
    "settled + entropy turn 2 %, half, 1 ep": {"overfit_tolerance": 0.02},
    "settled + entropy turn 1 %, any matrix, 1 ep": {"overfit_fraction": 1e-9},
    "settled + entropy turn 1 %, every matrix, 1 ep": {"overfit_fraction": 1.0},
    "settled + entropy turn 1 %, half, 0.5 ep": {"overfit_patience": 0.5},
    "settled + entropy turn 1 %, half, 2 ep": {"overfit_patience": 2.0},
    "settled patience 6 + entropy turn (default)": {"patience": 6},
    "settled patience 10 + entropy turn (default)": {"patience": 10},
}


def study(references: Sequence[dict[str, Any]]) -> None:
    """Replay every candidate rule (epoch-end analyses) per group of seeds and tasks, the candidate signals' timing,
    and the over-trained warning's timing."""
    groups = {name: GROUPS[name] for name in ("tuning seeds", "held-out seeds", "plateau tasks", "over-fitting tasks")}
    print(f"\n{'candidate rule (replayed; within 1 pt / epochs saved / never stopped)':<56} "
          + " ".join(f"{g:>20}" for g in groups))
    for name, rule in CANDIDATES.items():
        rows = [row(ref, name, replay(ref, rule)) for ref in references]
        cells = []
        for keep in groups.values():
            chosen = [r for r in rows if keep(r)]
            s = summary(chosen) if chosen else None
            cells.append(f"{s['within_1pt']:.0%} / {s['epochs_saved']:.0%} / {s['never_stopped']:.0%}" if s else "-")
        print(f"{name:<56} " + " ".join(f"{c:>20}" for c in cells))
    signal_table(references, OVERFITTING, epoch_end_analyses)
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
    for task in dict.fromkeys(t for t, *_ in events):
        mine = [e for e in events if e[0] == task]
        print(f"  {task:<18} {len(mine):>3} matrices, first from epoch {min(e[3] for e in mine):>3}; accuracy rose "
              f"by > {WITHIN_POINTS:g} point afterwards for {sum(e[4] > WITHIN_POINTS for e in mine)}")


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
    width = max(16, *(len(r.task) for r in rows))
    print(f"\n{'task':<{width}} {'seed':>4} {'best':>6} {'@ep':>4} | " + " | ".join(f"{m[:22]:>22}" for m in methods))
    print(f"{'':<{width}} {'':>4} {'':>6} {'':>4} | " + " | ".join(f"{'epochs   acc   loss':>22}" for _ in methods))
    keyed = {(r.task, r.seed, r.method): r for r in rows}
    for task, seed in sorted({(r.task, r.seed) for r in rows}, key=lambda k: (list(TASKS).index(k[0]), k[1])):
        ref = keyed[(task, seed, methods[0])]
        cells = []
        for m in methods:
            r = keyed[(task, seed, m)]
            run = f"{r.epochs_run:.1f}" if r.stopped else f"{r.budget}*"
            cells.append(f"{run:>6}/{r.budget:<3} {r.test_acc:5.1f} {r.loss:+5.1f}")
        print(f"{task:<{width}} {seed:>4} {ref.best:6.1f} {ref.best_epoch:>4} | " + " | ".join(f"{c:>22}" for c in cells))
    print("(* = never stopped; loss = reference best - accuracy at the stop, points)\n")
    print(f"{'method':<28} {'runs':>5} {'within 1pt':>11} {'epochs saved':>13} {'never stopped':>14} {'mean loss':>10}"
          f" {'max loss':>9}")
    for m in methods:
        s = summary([r for r in rows if r.method == m])
        print(f"{m:<28} {s['runs']:>5} {s['within_1pt']:>11.0%} {s['epochs_saved']:>13.0%} {s['never_stopped']:>14.0%}"
              f" {s['mean_loss']:>10.2f} {s['max_loss']:>9.2f}")


def print_groups(rows: Sequence[Row], methods: Sequence[str]) -> None:
    """The summary per group: plateauing vs over-fitting tasks, tuning vs held-out seeds."""
    print(f"{'group':<22} {'method':<28} {'runs':>5} {'within 1pt':>11} {'epochs saved':>13} {'never stopped':>14}"
          f" {'mean loss':>10} {'max loss':>9}")
    for group, keep in GROUPS.items():
        for m in methods[1:]:
            chosen = [r for r in rows if r.method == m and keep(r)]
            if not chosen:
                continue
            s = summary(chosen)
            print(f"{group:<22} {m:<28} {s['runs']:>5} {s['within_1pt']:>11.0%} {s['epochs_saved']:>13.0%} "
                  f"{s['never_stopped']:>14.0%} {s['mean_loss']:>10.2f} {s['max_loss']:>9.2f}")


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
                elif r is not None and method == "htsr stop rule":  # never stopped: the model at the budget's end
                    ax.plot(r.epochs_run, r.test_acc, "x", color=color, ms=7, mew=1.8)
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
    handles.append(plt.Line2D([], [], ls="", marker="x", color="tab:red", mew=1.8, label="HT-SR never stopped"))
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "lightning_htsr"
#: Files whose code decides a reference run's numbers: the tasks and the runs, and the package's analysis stages.
#: The stop rule and its plumbing (``stopping.py``, ``best_weights.py``, ``callback.py``, the sinks) do not change the
#: recorded numbers (a column the replay needs but the history lacks fails loudly); a live run that stops elsewhere
#: than its replay on the reference (a mismatch, exit code 1) is how a stale reference would show.
REFERENCE_CODE = ("stopping_tasks.py", "stopping_runs.py")
REFERENCE_MODULES = ("weights", "spectra", "records.py", "analysis.py", "distributed.py")  # files, or every file of a folder


def code_key(paths: Sequence[Path]) -> str:
    """A short hash of the source files (and the torch / Lightning versions) that produced a cached run."""
    import hashlib

    digest = hashlib.sha256(f"{torch.__version__} {pl.__version__}".encode())
    for path in sorted(paths):
        digest.update(path.name.encode() + path.read_bytes())  # a missing file is an error, not a silent miss
    return digest.hexdigest()[:10]


def reference_key() -> str:
    """The reference runs' code (:data:`REFERENCE_CODE`, :data:`REFERENCE_MODULES`)."""
    modules = [p for f in REFERENCE_MODULES for p in ((PACKAGE / f).rglob("*.py") if (PACKAGE / f).is_dir()
                                                       else [PACKAGE / f])]
    return code_key([HERE / f for f in REFERENCE_CODE] + modules)


def live_key() -> str:
    """A live run's code: everything (the stop rule included)."""
    return code_key([HERE / f for f in REFERENCE_CODE] + list(PACKAGE.rglob("*.py")))


def peer_key() -> str:
    """The EarlyStopping peer's code: the tasks and this script (it does not run lightning_htsr)."""
    return code_key([HERE / f for f in REFERENCE_CODE])


def rule_key(rule: dict[str, Any]) -> str:
    """A file-name-safe key of every setting of a rule (defaults included: changing a default misses the cache)."""
    import hashlib

    criteria = StopCriteria(**{"stop_on": "heavy_tailed", **rule})
    text = "_".join(f"{f.name}={getattr(criteria, f.name)}" for f in fields(criteria))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


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


def run_task_seed(name: str, seed: int, rule: dict[str, Any], live: str, cache: Path | None,
                  quick: bool) -> dict[str, Any]:
    """The reference run and, per ``live``, the live rule and peer runs of one task x seed (each cached by code)."""
    quiet()
    torch.set_num_threads(1)
    task = TASKS[name]
    epochs = QUICK_EPOCHS if quick else task.epochs
    base = f"{name}-{seed}-{epochs}"
    out = {"reference": cached(cache, f"{base}-reference-{reference_key()}",
                               lambda: reference_run(task, seed, epochs, quick), quick)}
    if live == "all":
        out["rule"] = cached(cache, f"{base}-rule-{rule_key(rule)}-{live_key()}",
                             lambda: rule_run(task, seed, epochs, rule, quick), quick)
    if live in ("all", "peer"):
        out["peers"] = {name: cached(cache, f"{base}-{slug}-{peer_key()}",
                                     lambda m=monitor: early_stopping_run(task, seed, epochs, quick, *m), quick)
                        for name, (slug, monitor) in PEERS.items()}
    return out


def observed_run(name: str, seed: int, observer: pl.Callback, quick: bool = False) -> dict[str, Any]:
    """One task x seed for its full budget (``quick``: the smoke-test budget) with ``observer`` beside the test
    recorder: the study scripts' runs (task, seed, epochs and the test-accuracy curve; the observer keeps the rest)."""
    quiet()
    torch.set_num_threads(1)
    task = TASKS[name]
    epochs = QUICK_EPOCHS if quick else task.epochs
    with tempfile.TemporaryDirectory() as root:
        recorder, _ = train(task, seed, epochs, [observer], root, quick=quick)
    return {"task": name, "seed": seed, "epochs": epochs, "curve": recorder.epochs}


def run_all(pairs: Sequence[tuple[str, int]], rule: dict[str, Any], live: str, cache: Path | None, quick: bool,
            jobs: int) -> list[dict[str, Any]]:
    """:func:`run_task_seed` for every pair, in ``jobs`` processes (one thread each), in order."""
    return in_processes(run_task_seed, [(n, s, rule, live, cache, quick) for n, s in pairs], jobs)


def in_processes(function: Callable[..., Any], calls: Sequence[tuple[Any, ...]], jobs: int) -> list[Any]:
    """``function(*args)`` for every ``args`` in ``calls``, results in order: here when ``jobs <= 1``, otherwise in
    ``jobs`` spawned processes (``function`` must be importable by name from a module)."""
    if jobs <= 1:
        return [function(*args) for args in calls]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(function, *args) for args in calls]
        return [f.result() for f in futures]


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*too few eigenvalues.*")
    warnings.filterwarnings("ignore", message=".*deterministic.*")


def pair_arguments(parser: argparse.ArgumentParser, tasks: Sequence[str],
                   seeds: Sequence[int] = (0, 1, 2, 3, 4)) -> None:
    """The options every stopping script shares: the task x seed pairs to run, processes, the cache, quick mode."""
    parser.add_argument("--tasks", nargs="+", default=list(tasks), choices=list(tasks))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(seeds))
    parser.add_argument("--jobs", type=int, default=1, help="task x seed pairs trained in parallel processes")
    parser.add_argument("--cache", type=Path, help="directory to keep runs in, keyed by the code that made them")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a smoke test of the script)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    pair_arguments(parser, list(TASKS))
    parser.add_argument("--rule", type=json.loads, default={}, help="HTSRCallback stop arguments as JSON")
    parser.add_argument("--live", choices=["all", "peer", "none"], default="all",
                        help="train the rule and the EarlyStopping peer live (all), only the peer, or replay both on "
                        "the reference runs (none: same results when training is deterministic)")
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    parser.add_argument("--figure", type=Path, help="write the accuracy curves with the stop points (PNG) here")
    parser.add_argument("--study", action="store_true", help="also replay the candidate rules and signals on the "
                        "reference runs")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(1)
    pairs = [(name, seed) for name in args.tasks for seed in args.seeds]
    results = run_all(pairs, args.rule, args.live, args.cache, args.quick, args.jobs)
    rows: list[Row] = []
    mismatches, references = [], []
    for (name, seed), result in zip(pairs, results):
        reference = result["reference"]
        references.append(reference)
        replayed = replay(reference, args.rule)
        epochs = reference["epochs"]
        rows.append(row(reference, "reference (full budget)", {"epochs_run": epochs, "stopped": False,
                                                                 "test_acc": reference["curve"][-1]["test_acc"]}))
        rows.append(row(reference, "htsr (every 1/3 epoch)", replay(reference, args.rule, "steps")))
        if "rule" in result:
            live = result["rule"]
            if (live["epochs_run"] != (replayed["stop_epoch"] + 1 if replayed["stopped"] else epochs)
                    or abs(live["test_acc"] - replayed["test_acc"]) > 1e-6):
                mismatches.append((name, seed, live["epochs_run"], replayed["stop_epoch"]))
            rows.append(row(reference, "htsr stop rule", {**live, "replay_stop_epoch": replayed["stop_epoch"]}))
        else:
            rows.append(row(reference, "htsr stop rule", replayed))
        for name, (_, monitor) in PEERS.items():
            rows.append(row(reference, name, result["peers"][name] if "peers" in result
                            else early_stopping_replay(reference, 5, 0.0, *monitor)))
        best = max(c["test_acc"] for c in reference["curve"])
        print(f"{name} seed {seed}: reference {reference['seconds']:.0f} s, best {best:.1f}, rule stops at "
              f"{replayed['stop_epoch']}", flush=True)
    methods = ["reference (full budget)", "htsr stop rule", "htsr (every 1/3 epoch)", *PEERS]
    print_table(rows, methods)
    print_groups(rows, methods)
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
