"""Twin tasks: can *any* weights-only stop rule catch over-fitting on label noise? A measured answer.

A twin keeps a label-noise task's training set exactly (the inputs, the noisy labels, their order, the seeds) and
relabels only the held-out data: each validation and test example gets the label of its nearest training example
(1-NN in input space; token sequences by their token counts). In the original task the flipped training labels are
noise, and memorizing them lowers held-out accuracy. In the twin they are rare sub-populations that the held-out data
shares (the long tail of Feldman, "Does learning require memorization?", 2020), and memorizing them raises it.

Training never reads held-out labels, so the two runs follow one trajectory, weight for weight: the script checks that
their HT-SR histories are identical. A rule that reads only the weights (or only the training data) therefore stops at
the same epoch, and hands back the same model, in both. On a pair it can be within 1 point of the best in both only if
some epoch is. The script reports, per task x seed:

- each twin's best epoch and what stopping at the other twin's best would cost;
- the **minimax loss**: the smallest, over every epoch end, of the larger of the two losses. This is the best any
  weights-only rule choosing among the run's epoch ends can guarantee on the pair;
- the default rule (``HTSRCallback(stop_on="heavy_tailed")``, replayed: one stop, scored on both twins) and the
  validation-based rules (``EarlyStopping`` and ``monitor=`` on ``val_loss`` and on ``val_acc``, replayed on each
  twin's own validation labels).

    python benchmarks/stopping_twins.py --jobs 2 --cache .stop_cache
    python benchmarks/stopping_twins.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stopping_heldout  # (registers the held-out tasks by name, here and in worker processes)
import stopping_tasks
from bench_stopping import (
    HERE,
    WITHIN_POINTS,
    cached,
    code_key,
    early_stopping_replay,
    in_processes,
    pair_arguments,
    quiet,
    reference_key,
)
from bench_stopping import replay as replay_rule
from stopping_heldout import _key as heldout_key
from stopping_runs import QUICK_EPOCHS, reference_run
from stopping_tasks import Data, Task

#: The label-noise tasks that over-fit: two of the benchmark's and four held-out ones (MLPs, a 2-D and a 1-D CNN, a
#: transformer; random labels, labels sampled from a noisy teacher, class-dependent flips). Not the language models:
#: a window's next tokens copied from its nearest training window are not a task's held-out data.
TWINNED = ("mlp_digits_noisy", "mlp_tabular_small", "cnn2d_digits_noisy", "transformer_noisy", "mlp_teacher_sampled",
           "cnn1d_mnist1d_pairflip")
#: The rules replayed on both twins: weights only (one stop for both), and two that read each twin's validation labels.
RULES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "htsr (weights only)": lambda ref: replay_rule(ref, {}),
    'htsr monitor="val_loss"': lambda ref: replay_rule(ref, {"monitor": "val_loss"}),
    'htsr monitor="val_acc"': lambda ref: replay_rule(ref, {"monitor": "val_acc", "monitor_mode": "max"}),
    "EarlyStopping(val_loss, 5)": early_stopping_replay,
    "EarlyStopping(val_acc, 5)": lambda ref: early_stopping_replay(ref, 5, 0.0, "val_acc", "max"),
}


def features(x: torch.Tensor) -> torch.Tensor:
    """The space the nearest neighbour is found in: the flattened input, or a token sequence's token counts."""
    if x.dtype in (torch.int64, torch.int32):
        return torch.nn.functional.one_hot(x, int(x.max()) + 1).sum(1).float()
    return x.flatten(1).float()


def nearest_labels(train: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The (noisy) training label of each row of ``x``'s nearest training example (Euclidean, ties: the first)."""
    xt, yt = train
    return yt[torch.cdist(features(x), features(xt)).argmin(1)]


def twin_data(data: Callable[[int], Data]) -> Callable[[int], Data]:
    """``data`` with the validation and test labels replaced by :func:`nearest_labels`; training split unchanged."""

    def make(seed: int) -> Data:
        train, (xv, _), (xs, _) = data(seed)
        return train, (xv, nearest_labels(train, xv)), (xs, nearest_labels(train, xs))

    return make


def twin(task: Task) -> Task:
    return dataclasses.replace(task, name=f"{task.name}_twin", description=f"{task.description} (1-NN twin)",
                               data=twin_data(task.data))


TWINS: dict[str, Task] = {f"{n}_twin": twin(stopping_tasks.TASKS[n]) for n in TWINNED}
stopping_tasks.TASKS.update(TWINS)


def _key(name: str) -> str:
    """The original's key (as its own script caches it) or, for a twin, the reference key and this file."""
    if name in stopping_heldout.HELD_OUT:
        return heldout_key(reference_key())
    if name in TWINS:
        return f"{reference_key()}t{code_key([HERE / 'stopping_twins.py'])[:6]}"
    return reference_key()


def run_pair(name: str, seed: int, cache: Path | None, quick: bool) -> dict[str, dict[str, Any]]:
    """The full-budget reference runs of a task and of its twin (cached by code)."""
    quiet()
    torch.set_num_threads(1)
    out = {}
    for which, task in (("original", stopping_tasks.TASKS[name]), ("twin", TWINS[f"{name}_twin"])):
        epochs = QUICK_EPOCHS if quick else task.epochs
        out[which] = cached(cache, f"{task.name}-{seed}-{epochs}-reference-{_key(task.name)}",
                            lambda task=task, epochs=epochs: reference_run(task, seed, epochs, quick), quick)
    return out


def same_trajectory(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two reference runs recorded the same HT-SR history (same analyses, same numbers)."""
    return [x["records"] for x in a["analyses"]] == [x["records"] for x in b["analyses"]]


def best_accuracy(reference: dict[str, Any]) -> float:
    return max(c["test_acc"] for c in reference["curve"])


def losses(reference: dict[str, Any]) -> dict[int, float]:
    """Points below the run's best test accuracy, per epoch."""
    best = best_accuracy(reference)
    return {c["epoch"]: best - c["test_acc"] for c in reference["curve"]}


def pair_row(original: dict[str, Any], twin_ref: dict[str, Any]) -> dict[str, Any]:
    """One task x seed: best epochs, the minimax loss over epoch ends, and each rule's loss on both twins."""
    lo, lt = losses(original), losses(twin_ref)
    best_o, best_t = min(lo, key=lo.get), min(lt, key=lt.get)
    minimax_epoch = min(lo, key=lambda e: max(lo[e], lt[e]))
    row = {"task": original["task"], "seed": original["seed"], "same_trajectory": same_trajectory(original, twin_ref),
           "best_epoch": (best_o, best_t), "cross_loss": (lt[best_o], lo[best_t]),
           "minimax": (minimax_epoch, max(lo[minimax_epoch], lt[minimax_epoch])),
           "both_within": sum(max(lo[e], lt[e]) <= WITHIN_POINTS + 1e-9 for e in lo), "rules": {}}
    best_a, best_b = best_accuracy(original), best_accuracy(twin_ref)
    for name, rule in RULES.items():
        a, b = rule(original), rule(twin_ref)
        row["rules"][name] = {"epochs": (a["epochs_run"], b["epochs_run"]),
                              "loss": (best_a - a["test_acc"], best_b - b["test_acc"])}
    return row


def print_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    print(f"\n{'task':<20} {'seed':>4} {'same':>5} | {'best epoch':>10} {'cross loss':>12} | {'minimax':>12} "
          f"{'both<=1':>7} | " + " | ".join(f"{n[:24]:>24}" for n in RULES))
    print(f"{'':<20} {'':>4} {'':>5} | {'orig twin':>10} {'orig twin':>12} | {'epoch  loss':>12} {'epochs':>7} | "
          + " | ".join(f"{'loss orig   twin':>24}" for _ in RULES))
    for r in rows:
        cells = [f"{x['loss'][0]:+6.1f} {x['loss'][1]:+6.1f}" for x in r["rules"].values()]
        print(f"{r['task']:<20} {r['seed']:>4} {'yes' if r['same_trajectory'] else 'NO':>5} | "
              f"{r['best_epoch'][0]:>4} {r['best_epoch'][1]:>5} {r['cross_loss'][1]:6.1f} {r['cross_loss'][0]:5.1f} | "
              f"{r['minimax'][0]:>5} {r['minimax'][1]:6.1f} {r['both_within']:>7} | "
              + " | ".join(f"{c:>24}" for c in cells))
    print("(cross loss: on the original, stopping at the twin's best epoch; on the twin, at the original's. minimax: "
          "the epoch end whose larger loss of the two is smallest; both<=1: epoch ends within 1 point in both)")
    n = len(rows)
    out: dict[str, Any] = {"pairs": n, "same_trajectory": sum(r["same_trajectory"] for r in rows),
                           "pairs_with_an_epoch_within_1pt_in_both": sum(r["both_within"] > 0 for r in rows),
                           "median_minimax_loss": sorted(r["minimax"][1] for r in rows)[n // 2], "rules": {}}
    print(f"\n{n} pairs; identical trajectories: {out['same_trajectory']}; pairs where some epoch end is within "
          f"{WITHIN_POINTS:g} point of the best in both twins: {out['pairs_with_an_epoch_within_1pt_in_both']}; "
          f"median minimax loss {out['median_minimax_loss']:.1f} points")
    print(f"{'rule':<28} {'within 1pt: original':>21} {'twin':>6} {'both':>6}")
    for name in RULES:
        within = [[x <= WITHIN_POINTS + 1e-9 for x in r["rules"][name]["loss"]] for r in rows]
        s = out["rules"][name] = {"original": sum(w[0] for w in within) / n, "twin": sum(w[1] for w in within) / n,
                                  "both": sum(all(w) for w in within) / n}
        print(f"{name:<28} {s['original']:>21.0%} {s['twin']:>6.0%} {s['both']:>6.0%}")
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    pair_arguments(parser, list(TWINNED))
    args = parser.parse_args(argv)
    quiet()
    pairs = [(t, s) for t in args.tasks for s in args.seeds]
    results = in_processes(run_pair, [(t, s, args.cache, args.quick) for t, s in pairs], args.jobs)
    rows = [pair_row(r["original"], r["twin"]) for r in results]
    return {"rows": rows, **print_rows(rows)}


if __name__ == "__main__":
    sys.exit(0 if all(r["same_trajectory"] for r in main()["rows"]) else 1)
