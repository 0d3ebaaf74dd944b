"""Held-out tasks for the stop rule: tasks added after its thresholds were frozen, never used to choose anything.

``bench_stopping.py``'s 11 tasks chose the rule (on seeds 0-2). These three check it on kinds it has not seen, each
trained like the benchmark's (a full-budget reference run, the rule live, Lightning's ``EarlyStopping`` live):

| task | data | model | kind |
|---|---|---|---|
| ``cnn2d_digits_noisy`` | digits 8x8, 40 % of the training and validation labels random | the benchmark's 2-D CNN, Adam | over-fits: a convolutional network memorizing label noise |
| ``transformer_noisy`` | majority token, 30 % label noise | the benchmark's 2-layer transformer, Adam | over-fits: attention memorizing label noise |
| ``cnn1d_mnist1d_small`` | 400 ``mnist1d`` training rows | the benchmark's 1-D CNN, Adam | small data that plateaus |

Runs are cached like the benchmark's, keyed by this file too; scored the same way (the test accuracy of the model
``trainer.fit`` leaves in memory against the run's best).

    python benchmarks/stopping_heldout.py --jobs 2 --cache .stop_cache
    python benchmarks/stopping_heldout.py --jobs 2 --cache .stop_cache --rule '{"monitor": "val_loss"}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stopping_tasks
from bench_stopping import (
    HERE,
    PEERS,
    REFERENCE_CODE,
    Row,
    cached,
    code_key,
    in_processes,
    live_key,
    pair_arguments,
    peer_key,
    print_table,
    quiet,
    reference_key,
    replay,
    row,
    rule_key,
    summary,
)
from stopping_runs import QUICK_EPOCHS, early_stopping_run, reference_run, rule_run
from stopping_tasks import (
    CNN1d,
    CNN2d,
    Data,
    Task,
    TransformerClassifier,
    _seeded,
    adam_constant,
    digits_images,
    majority_tokens,
    mnist1d_channels,
    noisy_labels,
)


def digits_images_noisy(seed: int) -> Data:
    return noisy_labels(digits_images(seed), 0.4, seed)


def majority_tokens_noisy(seed: int) -> Data:
    return noisy_labels(majority_tokens(seed), 0.3, seed)


def mnist1d_small(seed: int) -> Data:
    """The first 400 of ``mnist1d``'s 4400 training signals; validation and test unchanged."""
    (x, y), val, test = mnist1d_channels(seed)
    return (x[:400], y[:400]), val, test


HELD_OUT: dict[str, Task] = {t.name: t for t in [
    Task("cnn2d_digits_noisy", "2-D CNN, digits 8x8 with 40 % label noise, Adam constant lr", digits_images_noisy,
         _seeded(CNN2d), adam_constant(1e-3), epochs=40, batch_size=32),
    Task("transformer_noisy", "2-layer transformer, majority token, 30 % label noise, Adam constant lr",
         majority_tokens_noisy, _seeded(TransformerClassifier), adam_constant(1e-3), epochs=30, batch_size=64),
    Task("cnn1d_mnist1d_small", "1-D CNN, 400 mnist1d training rows, Adam constant lr", mnist1d_small,
         _seeded(CNN1d), adam_constant(1e-3), epochs=40, batch_size=32),
]}  # fmt: skip
#: The held-out tasks that over-fit (the third plateaus).
HELD_OUT_OVERFITTING = ("cnn2d_digits_noisy", "transformer_noisy")
stopping_tasks.TASKS.update(HELD_OUT)  # the runs look tasks up by name (here and in worker processes)


def _key(base: str) -> str:
    """A cache key of ``base`` (a reference, live or peer key) and this file."""
    return f"{base}h{code_key([HERE / 'stopping_heldout.py', *(HERE / f for f in REFERENCE_CODE)])[:6]}"


def run_pair(name: str, seed: int, rule: dict[str, Any], cache: Path | None, quick: bool) -> dict[str, Any]:
    """The reference, the rule live and the peer live of one held-out task x seed (each cached by code)."""
    quiet()
    torch.set_num_threads(1)
    task = HELD_OUT[name]
    epochs = QUICK_EPOCHS if quick else task.epochs
    base = f"{name}-{seed}-{epochs}"
    return {"reference": cached(cache, f"{base}-reference-{_key(reference_key())}",
                                lambda: reference_run(task, seed, epochs, quick), quick),
            "rule": cached(cache, f"{base}-rule-{rule_key(rule)}-{_key(live_key())}",
                           lambda: rule_run(task, seed, epochs, rule, quick), quick),
            "peers": {name: cached(cache, f"{base}-{slug}-{_key(peer_key())}",
                                   lambda m=monitor: early_stopping_run(task, seed, epochs, quick, *m), quick)
                      for name, (slug, monitor) in PEERS.items()}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    pair_arguments(parser, list(HELD_OUT))
    parser.add_argument("--rule", type=json.loads, default={}, help="HTSRCallback stop arguments as JSON")
    args = parser.parse_args(argv)
    quiet()
    pairs = [(t, s) for t in args.tasks for s in args.seeds]
    results = in_processes(run_pair, [(t, s, args.rule, args.cache, args.quick) for t, s in pairs], args.jobs)
    rows: list[Row] = []
    mismatches = []
    for (name, seed), result in zip(pairs, results):
        reference, live = result["reference"], result["rule"]
        replayed = replay(reference, args.rule)
        epochs = reference["epochs"]
        if (live["epochs_run"] != (replayed["stop_epoch"] + 1 if replayed["stopped"] else epochs)
                or abs(live["test_acc"] - replayed["test_acc"]) > 1e-6):
            mismatches.append((name, seed, live["epochs_run"], replayed["stop_epoch"]))
        rows.append(row(reference, "reference (full budget)", {"epochs_run": epochs, "stopped": False,
                                                                 "test_acc": reference["curve"][-1]["test_acc"]}))
        rows.append(row(reference, "htsr stop rule", live))
        rows.extend(row(reference, name, peer) for name, peer in result["peers"].items())
    methods = ["reference (full budget)", "htsr stop rule", *PEERS]
    print_table(rows, methods)
    groups = {"held-out over-fitting tasks": lambda r: r.task in HELD_OUT_OVERFITTING,
              "held-out plateau task": lambda r: r.task not in HELD_OUT_OVERFITTING}
    out: dict[str, Any] = {"rule": args.rule, "mismatches": mismatches, "summary": {}}
    for group, keep in groups.items():
        for method in methods[1:]:
            chosen = [r for r in rows if r.method == method and keep(r)]
            if chosen:
                s = out["summary"][f"{group} / {method}"] = summary(chosen)
                print(f"{group:<30} {method:<28} {s['runs']:>3} runs, {s['within_1pt']:.0%} within 1pt, "
                      f"{s['epochs_saved']:.0%} saved, {s['never_stopped']:.0%} never stopped, mean loss "
                      f"{s['mean_loss']:.2f}, max {s['max_loss']:.2f}")
    if mismatches:
        print(f"live and replayed stops differ (training not deterministic?): {mismatches}")
    return out


if __name__ == "__main__":
    sys.exit(1 if main()["mismatches"] else 0)
