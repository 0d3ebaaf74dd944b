"""Over-fitting read from the training data alone: how often the network changes its mind about its training examples.

Every weights-only and gradient signal measured so far (``bench_stopping.py --study``, ``stopping_weight_study.py``,
``stopping_gradient_study.py``) moves the same way when a network memorizes as when it learns. This script measures
the one training-only signal the label-noise literature reports to mark the start of memorization: **prediction
changes**, the "label wave" of Yuan et al., "Early stopping against label noise without validation data" (ICLR 2024).
While a network learns what generalizes, its predictions on the training examples settle, so fewer change from one
epoch to the next. When it starts fitting the examples it cannot explain (flipped labels, a corpus' rare
continuations), each of them is pulled towards its own label and back, and the count of changed predictions rises
again. Their rule keeps the weights of the epoch with the fewest changes and stops once no epoch has had fewer for
``patience`` epochs. It needs the training inputs and labels, never held-out data.

Recorded per epoch, on the benchmark's 11 tasks and the 6 held-out tasks (argmax per example; per token for the
language models):

* ``wave``: the share of training predictions that changed since the example's previous visit, read from the
  training forward pass itself (train mode, before the step; the paper's count, free during training);
* ``flips``: the same on the whole training set at epoch ends (eval mode, one extra forward pass);
* ``flips_to_label`` / ``flips_from_label``: those of ``flips`` that moved onto / off the example's training label;
* ``train_fit``: the share of training predictions equal to their (possibly noisy) training labels.

The forward passes are read without touching the random state, so every run follows the benchmark's trajectory (its
test-accuracy curve is the reference run's, number for number). Scored like the other studies: the test accuracy of
the weights a rule keeps against the run's best; its settings chosen on seeds 0-2 of the 11 tasks and reported on
seeds 3-4 and on the held-out tasks.

    python benchmarks/stopping_prediction_study.py --jobs 2 --cache .stop_cache
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stopping_heldout  # registers the held-out tasks in stopping_tasks.TASKS (here and in worker processes)
from bench_stopping import (
    HERE,
    WITHIN_POINTS,
    cached,
    code_key,
    in_processes,
    observed_run,
    pair_arguments,
    quiet,
    reference_key,
    replay,
)
from stopping_gradient_study import GROUPS, rates
from stopping_tasks import TASKS


class PredictionChanges(pl.Callback):
    """Per epoch: how many training predictions changed (in the training pass and at the epoch's end), which way, and
    how many agree with their training labels. Reads the model without changing the random state or the weights."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.seen: dict[bytes, torch.Tensor] = {}  # each training input's prediction at its last training pass
        self.last: torch.Tensor | None = None  # the training set's predictions at the previous epoch end
        self._capture: torch.Tensor | None = None
        self._hook = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hook = pl_module.register_forward_hook(self._keep_output)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()

    def _keep_output(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._capture is not None and module.training:
            self._capture = output.detach().argmax(1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.changed = self.compared = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._capture = torch.empty(0)  # armed: the training step's forward pass fills it

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        predictions, self._capture = self._capture, None
        if predictions is None or predictions.numel() == 0:
            return
        for x, p in zip(batch[0], predictions):
            key = x.numpy().tobytes()
            before = self.seen.get(key)
            if before is not None:
                self.changed += int((before != p).sum())
                self.compared += p.numel()
            self.seen[key] = p

    @torch.no_grad()
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        x, y = trainer.train_dataloader.dataset.tensors
        was_training = pl_module.training
        pl_module.eval()
        now = torch.cat([pl_module(chunk).argmax(1) for chunk in x.split(1024)])
        pl_module.train(was_training)
        n = now.numel()
        row = {"epoch": trainer.current_epoch, "train_fit": float((now == y).sum()) / n,
               "wave": self.changed / self.compared if self.compared else math.nan,
               "flips": math.nan, "flips_to_label": math.nan, "flips_from_label": math.nan}
        if self.last is not None:
            moved = now != self.last
            row.update(flips=float(moved.sum()) / n, flips_to_label=float((moved & (now == y)).sum()) / n,
                       flips_from_label=float((moved & (self.last == y)).sum()) / n)
        self.last = now
        self.epochs.append(row)


def study_run(name: str, seed: int, quick: bool = False) -> dict[str, Any]:
    """One task x seed for its full budget with :class:`PredictionChanges` (and the test-accuracy curve)."""
    signals = PredictionChanges()
    return {**observed_run(name, seed, signals, quick), "signals": signals.epochs}


def study_key() -> str:
    return code_key([HERE / f for f in ("stopping_prediction_study.py", "stopping_tasks.py", "stopping_runs.py",
                                        "stopping_heldout.py")])


def _one(name: str, seed: int, cache: Path | None, quick: bool) -> dict[str, Any]:
    return cached(cache, f"{name}-{seed}-predictions-{study_key()}", lambda: study_run(name, seed, quick), quick)


# ------------------------------------------------------------------------------------------------ rules

#: A rule reads the recorded series and returns (the epoch it stops after, the epoch whose weights it keeps), or
#: ``None`` when it never stops (the last epoch's weights are kept, unless it restores at the end of training).
Rule = Callable[[Sequence[dict[str, float]]], tuple[int, int] | None]


def fewest(column: str, patience: int, window: int = 1, start: int = 2) -> Rule:
    """Label Wave's rule: keep the epoch where ``column`` (averaged over the last ``window`` epochs) is lowest, from
    epoch ``start`` on; stop once no epoch has had a lower value for ``patience`` epochs."""

    def rule(series: Sequence[dict[str, float]]) -> tuple[int, int] | None:
        values = [e[column] for e in series]
        best, best_epoch, wait = math.inf, None, 0
        for i in range(start, len(series)):
            recent = [v for v in values[max(0, i - window + 1):i + 1] if math.isfinite(v)]
            if not recent:
                continue
            smoothed = sum(recent) / len(recent)
            if smoothed < best:
                best, best_epoch, wait = smoothed, int(series[i]["epoch"]), 0
            else:
                wait += 1
                if wait >= patience:
                    return int(series[i]["epoch"]), best_epoch
        return None if best_epoch is None else (-1, best_epoch)  # -1: not stopped, would restore at the end

    return rule


RULES: dict[str, Rule] = {
    f"fewest {column}, patience {patience}, mean of {window}": fewest(column, patience, window)
    for column in ("wave", "flips") for window in (1, 3) for patience in (3, 5, 10)
}


def score(run: dict[str, Any], rule: Rule, restore_at_end: bool) -> tuple[float, float, bool]:
    """(loss in points, fraction of epochs saved, stopped) of the weights ``rule`` keeps. A rule that never stops
    leaves the last epoch's weights, or with ``restore_at_end`` the kept epoch's."""
    accs = [c["test_acc"] for c in run["curve"]]
    fired = rule(run["signals"])
    if fired is None or (fired[0] < 0 and not restore_at_end):
        return max(accs) - accs[-1], 0.0, False
    stop, keep = fired
    if stop < 0:
        return max(accs) - accs[keep], 0.0, False
    return max(accs) - accs[keep], 1.0 - (stop + 1) / run["epochs"], True


def print_rules(runs: Sequence[dict[str, Any]], rules: dict[str, Rule]) -> None:
    """Every rule (without and with a restore at the end of training) on every group."""
    groups = {g: [r for r in runs if keep(r)] for g, keep in GROUPS.items()}
    header = f"{'rule (within 1 pt / epochs saved / never stopped)':<52}" + "".join(
        f"{g + f' ({len(rs)})':>26}" for g, rs in groups.items())
    print("\n" + header)
    for restore in (False, True):
        for name, rule in rules.items():
            cells = [rates([score(r, rule, restore) for r in rs]) for rs in groups.values()]
            print(f"{name + (' +restore' if restore else ''):<52}"
                  + "".join(f"{f'{a:4.0%} / {b:4.0%} / {c:4.0%}':>26}" for a, b, c in cells))


#: The rule chosen on the tuning seeds (most runs within 1 point, then most epochs saved).
CHOSEN = "fewest wave, patience 5, mean of 1"


def combined(run: dict[str, Any], reference: dict[str, Any], rule: Rule) -> tuple[float, float]:
    """(loss of the default rule, loss of the default rule or ``rule``, whichever stops first), in points: the
    default ``HTSRCallback(stop_on="heavy_tailed")`` replayed on the run's reference history (the same trajectory)."""
    accs = [c["test_acc"] for c in run["curve"]]
    default = replay(reference, {"stop_on": "heavy_tailed"})
    fired = rule(run["signals"])
    first = fired is not None and fired[0] >= 0 and (not default["stopped"] or fired[0] < default["stop_epoch"])
    return max(accs) - default["test_acc"], max(accs) - (accs[fired[1]] if first else default["test_acc"])


def print_combined(runs: Sequence[dict[str, Any]], cache: Path, rule_name: str) -> None:
    """Within 1 point per group: the default rule alone and with ``rule_name`` beside it (whichever stops first),
    replayed on the reference runs ``bench_stopping.py`` and ``stopping_heldout.py`` left in ``cache``."""
    pairs = []
    for run in runs:
        name, seed = run["task"], run["seed"]
        key = stopping_heldout._key(reference_key()) if name in stopping_heldout.HELD_OUT else reference_key()
        path = cache / f"{name}-{seed}-{run['epochs']}-reference-{key}.json"
        if not path.exists():
            print(f"\n(no reference run of {name} seed {seed} in {cache}: run bench_stopping.py and stopping_heldout.py "
                  "with this cache to compare with the default rule)")
            return
        pairs.append((run, combined(run, json.loads(path.read_text()), RULES[rule_name])))
    print(f"\nwithin 1 pt: the default rule, and with `{rule_name}` beside it (whichever stops first)")
    for group, keep in GROUPS.items():
        losses = [c for r, c in pairs if keep(r)]
        print(f"{group:<24}{len(losses):>4} runs {sum(a <= WITHIN_POINTS + 1e-9 for a, _ in losses):>5} "
              f"{sum(b <= WITHIN_POINTS + 1e-9 for _, b in losses):>5}")


def print_runs(runs: Sequence[dict[str, Any]]) -> None:
    """Per run: the accuracy peak against the epochs of fewest changes."""
    print(f"\n{'task':<24}{'seed':>5}{'peak':>6}{'@ep':>5} | fewest wave @ep | fewest flips @ep | train_fit at peak / end")
    for r in runs:
        accs = [c["test_acc"] for c in r["curve"]]
        peak = max(range(len(accs)), key=accs.__getitem__)
        s = r["signals"]
        low = {c: min((e for e in s[2:] if math.isfinite(e[c])), key=lambda e: e[c], default=None)
               for c in ("wave", "flips")}
        cells = [f"{int(low[c]['epoch']):>3} ({accs[int(low[c]['epoch'])]:5.1f})" if low[c] else "  -" for c in low]
        print(f"{r['task']:<24}{r['seed']:>5}{accs[peak]:6.1f}{peak:5d} | {cells[0]:>15} | {cells[1]:>16} | "
              f"{s[peak]['train_fit']:.2f} / {s[-1]['train_fit']:.2f}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    pair_arguments(parser, list(TASKS))
    args = parser.parse_args(argv)
    quiet()
    pairs = [(t, s) for t in args.tasks for s in args.seeds]
    runs = in_processes(_one, [(t, s, args.cache, args.quick) for t, s in pairs], args.jobs)
    print_runs(runs)
    print_rules(runs, RULES)
    if args.cache is not None and not args.quick:
        print_combined(runs, args.cache, CHOSEN)
    return runs


if __name__ == "__main__":
    main()
