"""Held-out tasks for the stop rule: tasks added after its thresholds were frozen, never used to choose anything.

``bench_stopping.py``'s 11 tasks chose the rule (on seeds 0-2). These six check it on kinds it has not seen, each
trained like the benchmark's (a full-budget reference run, the rule live, Lightning's ``EarlyStopping`` live):

| task | data | model | kind |
|---|---|---|---|
| ``cnn2d_digits_noisy`` | digits 8x8, 40 % of the training and validation labels random | the benchmark's 2-D CNN, Adam | over-fits: a convolutional network memorizing label noise |
| ``transformer_noisy`` | majority token, 30 % label noise | the benchmark's 2-layer transformer, Adam | over-fits: attention memorizing label noise |
| ``cnn1d_mnist1d_small`` | 400 ``mnist1d`` training rows | the benchmark's 1-D CNN, Adam | small data that plateaus |
| ``mlp_teacher_sampled`` | 1000 Gaussian inputs, each label *sampled* from a random teacher's softmax (test: the teacher's most likely class) | MLP 24-1024-1024-10, Adam | over-fits: a wide MLP fitting aleatoric noise, no flipped labels |
| ``cnn1d_mnist1d_pairflip`` | ``mnist1d``, 35 % of the training and validation labels moved to the next class (``y -> y + 1``) | the benchmark's 1-D CNN, Adam | over-fits: class-dependent (structured) label noise |
| ``lstm_lm`` | next token of a random order-1 Markov text (24 tokens), 200 training windows | embedding + LSTM LM, Adam | over-fits: another recurrent cell and text source memorized |

The last three were added in a later stop, after the rule and the monitor's settings were frozen, as over-fitting of
other kinds than the benchmark's (which are uniform label flips, a small table and a GRU language model).

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

import numpy as np
import torch
from torch import nn

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
    _split,
    adam_constant,
    digits_images,
    majority_tokens,
    mlp,
    mnist1d,
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


def teacher_sampled(seed: int, n: int = 3000, dim: int = 24, classes: int = 10) -> Data:
    """Gaussian inputs and a random two-layer tanh teacher; a training or validation label is *sampled* from the
    teacher's softmax (no label is flipped, yet many disagree with the most likely class), a test label is the
    teacher's most likely class (what the best classifier predicts). 1000 training, 800 validation, 1200 test rows."""
    g = torch.Generator().manual_seed(80_000 + seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 64, generator=g) / dim**0.5
    w2 = torch.randn(64, classes, generator=g) * 3 / 64**0.5
    logits = torch.tanh(x @ w1) @ w2
    sampled = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(-1)
    train, val, (xs, _) = _split(x, sampled, 800, 1200, seed)
    _, _, (_, likeliest) = _split(x, logits.argmax(-1), 800, 1200, seed)
    return train, val, (xs, likeliest)


def mnist1d_pairflip(seed: int, fraction: float = 0.35) -> Data:
    """``mnist1d`` signals (one channel) with ``fraction`` of the training and validation labels moved to the next
    class, ``y -> (y + 1) mod 10`` (class-dependent noise: a consistent wrong pattern to learn); test labels clean."""
    (x, y), val, (xs, ys) = mnist1d(seed)
    g = torch.Generator().manual_seed(70_000 + seed)
    noisy = []
    for xx, yy in ((x, y), val):
        flip = torch.rand(len(yy), generator=g) < fraction
        noisy.append((xx.unsqueeze(1), torch.where(flip, (yy + 1) % 10, yy)))
    return noisy[0], noisy[1], (xs.unsqueeze(1), ys)


def markov_text_order1(seed: int, vocab: int = 24, window: int = 32, n_train: int = 200, n_val: int = 150,
                       n_test: int = 400) -> Data:
    """Next-token prediction on a random order-1 Markov chain's text (Dirichlet(0.2) rows), cut into windows as in
    :func:`stopping_tasks.markov_text` (a different source: order 1, more tokens, longer windows)."""
    rng = np.random.default_rng(90_000 + seed)
    cdf = rng.dirichlet(np.full(vocab, 0.2), size=vocab).cumsum(-1)

    def text(n_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = n_windows * (window + 1)
        tokens = np.empty(length + 1, dtype=np.int64)
        tokens[0] = rng.integers(0, vocab)
        for i, u in enumerate(rng.random(length)):
            tokens[i + 1] = min(int(np.searchsorted(cdf[tokens[i]], u)), vocab - 1)
        w = torch.from_numpy(tokens[1:].reshape(n_windows, window + 1))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    return text(n_train), text(n_val), text(n_test)


class LSTMLanguageModel(nn.Module):
    """Next-token logits at every position, shaped ``(batch, vocab, length)``."""

    def __init__(self, vocab: int = 24, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.lstm = nn.LSTM(64, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(x))[0]).transpose(1, 2)


HELD_OUT: dict[str, Task] = {t.name: t for t in [
    Task("cnn2d_digits_noisy", "2-D CNN, digits 8x8 with 40 % label noise, Adam constant lr", digits_images_noisy,
         _seeded(CNN2d), adam_constant(1e-3), epochs=40, batch_size=32),
    Task("transformer_noisy", "2-layer transformer, majority token, 30 % label noise, Adam constant lr",
         majority_tokens_noisy, _seeded(TransformerClassifier), adam_constant(1e-3), epochs=30, batch_size=64),
    Task("cnn1d_mnist1d_small", "1-D CNN, 400 mnist1d training rows, Adam constant lr", mnist1d_small,
         _seeded(CNN1d), adam_constant(1e-3), epochs=40, batch_size=32),
    Task("mlp_teacher_sampled", "MLP 24-1024-1024-10, 1000 rows with labels sampled from a teacher, Adam",
         teacher_sampled, _seeded(lambda: mlp([24, 1024, 1024, 10])), adam_constant(2e-4), epochs=40),
    Task("cnn1d_mnist1d_pairflip", "1-D CNN, mnist1d with 35 % of labels moved to the next class, Adam",
         mnist1d_pairflip, _seeded(CNN1d), adam_constant(1e-3), epochs=40),
    Task("lstm_lm", "LSTM language model, order-1 Markov text, 200 windows, Adam constant lr", markov_text_order1,
         _seeded(LSTMLanguageModel), adam_constant(1e-3), epochs=40, batch_size=16),
]}  # fmt: skip
#: The held-out tasks that over-fit (``cnn1d_mnist1d_small`` plateaus).
HELD_OUT_OVERFITTING = ("cnn2d_digits_noisy", "transformer_noisy", "mlp_teacher_sampled", "cnn1d_mnist1d_pairflip",
                        "lstm_lm")
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
