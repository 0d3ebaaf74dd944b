"""Over-fitting signals from the training run itself, without validation data: gradient noise, path coherence and
the shape of each epoch's weight update.

Every HT-SR signal measured so far (``bench_stopping.py --study``, ``stopping_weight_study.py``) fails to tell an MLP
memorizing label noise from one still learning slowly. This script measures four families of training-only signals
that theory ties to memorization, on the benchmark's 11 tasks and the 6 held-out tasks:

* **gradient signal-to-noise** (the "evidence-based" criterion of Mahsereci et al. 2017, "Early stopping without a
  validation set", and the GSNR of Liu et al. 2020): over one epoch, the squared norm of the mean mini-batch gradient
  against the mini-batch gradients' variance. While a network learns what generalizes, examples agree and the mean
  gradient dominates; once it memorizes, each example pulls its own way and the noise dominates.
* **gradient agreement**: the same ratio read at nearly the same weights, from consecutive mini-batches: the sum of
  the inner products of each step's gradient with the previous step's, against the sum of their mean squared norms
  (in [-1, 1]; about ``|G|^2 / (|G|^2 + noise)``; the epoch-mean gradient of the first family also averages over
  the weights' drift).
* **path coherence** (weights only): how far the weights moved in an epoch against the length of the path they took
  (sum of the per-step moves). Learning walks somewhere; memorization and a converged plateau wander.
* **the shape of the epoch's update** ``dW = W_end - W_start`` of each weight matrix (weights only): its stable rank
  (``|dW|_F^2 / |dW|_2^2``), the share of its energy inside the top singular subspace of ``W_start`` (the top 5 % of
  the directions on each side: where the heavy tail's spikes live) and its cosine with ``W_start`` (growth of the
  weights already there). Learning should strengthen the few directions that carry the signal; memorizing individual
  examples should spread the update over many directions, out of the spikes.

Each signal fires at the first epoch its value has fallen below ``fraction`` of its running maximum for ``patience``
epochs (or below an absolute limit; the update's stable rank when it has risen above a multiple of its running
minimum, its alignment when above a limit); the rule it implies stops there and keeps that epoch's weights. Scored
like the benchmark: the test accuracy at the stop against the run's best, thresholds chosen on seeds 0-2 of the 11
tasks and reported on seeds 3-4 and on the held-out tasks (the plateau and over-fitting columns are the 11 tasks'
seeds 0-4, tuning seeds included).

    python benchmarks/stopping_gradient_study.py --jobs 2 --cache .stop_cache
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
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
    TUNING_SEEDS,
    WITHIN_POINTS,
    cached,
    code_key,
    in_processes,
    observed_run,
    pair_arguments,
    quiet,
)
from stopping_tasks import OVERFITTING, TASKS

BENCHMARK = [t for t in TASKS if t not in stopping_heldout.HELD_OUT]
OVERFITS = (*OVERFITTING, *stopping_heldout.HELD_OUT_OVERFITTING)


class TrainingSignals(pl.Callback):
    """Per epoch: mean training loss, the gradient's signal-to-noise over the epoch's mini-batches, and the coherence
    of the weights' path (displacement over path length), globally and per weight matrix."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        self.prev = {n: p.detach().clone() for n, p in self.params.items()}
        self.g_sum = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.g_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.path = {n: 0.0 for n in self.params}
        self.path_total = 0.0
        self.steps, self.loss = 0, 0.0
        self.last: dict[str, tuple[torch.Tensor, float]] = {}  # the previous step's gradient and its squared norm
        self.inner = {n: 0.0 for n in self.params}  # sum over consecutive pairs of <g_t, g_t-1>
        self.pair_square = {n: 0.0 for n in self.params}  # ... of (|g_t|^2 + |g_t-1|^2) / 2 (so the ratio is in [-1, 1])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                g = p.grad.detach()
                self.g_sum[n] += g
                self.g_sq[n] += g * g
                square = float(g.pow(2).sum())
                if n in self.last:
                    last, last_square = self.last[n]
                    self.inner[n] += float((g * last).sum())
                    self.pair_square[n] += (square + last_square) / 2
                self.last[n] = (g.clone(), square)
        self.steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss += float(loss)
        total = 0.0
        for n, p in self.params.items():
            d = float((p.detach() - self.prev[n]).pow(2).sum())
            self.path[n] += math.sqrt(d)
            total += d
            self.prev[n].copy_(p.detach())
        self.path_total += math.sqrt(total)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        s = max(self.steps, 1)
        signal = noise = displacement = 0.0
        per_matrix_snr, per_matrix_coherence, per_matrix_agreement, elem = [], [], [], []
        update: dict[str, tuple[float, float, float] | None] = {}
        inner, pair_square = sum(self.inner.values()), sum(self.pair_square.values())
        for n, p in self.params.items():
            mean = self.g_sum[n] / s
            var = (self.g_sq[n] / s - mean * mean).clamp_min(0.0)
            m2, v = float(mean.pow(2).sum()), float(var.sum())
            signal, noise = signal + m2, noise + v
            d = float((p.detach() - self.start[n]).pow(2).sum())
            displacement += d
            if p.ndim >= 2:
                update[n] = update_shape(self.start[n], p.detach())
                per_matrix_snr.append(m2 / v if v > 0 else math.nan)
                per_matrix_coherence.append(math.sqrt(d) / self.path[n] if self.path[n] > 0 else math.nan)
                per_matrix_agreement.append(self.inner[n] / self.pair_square[n] if self.pair_square[n] > 0 else math.nan)
            keep = var > 0
            elem.append(mean[keep].pow(2) / var[keep])
        ratios = torch.cat([e.flatten() for e in elem]) if elem else torch.zeros(0)
        self.epochs.append({
            "epoch": trainer.current_epoch, "steps": self.steps, "train_loss": self.loss / s,
            "gsnr": signal / noise if noise > 0 else math.nan,
            "gsnr_matrices": _median(per_matrix_snr),
            "snr_elements": float(ratios.mean()) if len(ratios) else math.nan,
            "coherence": math.sqrt(displacement) / self.path_total if self.path_total > 0 else math.nan,
            "coherence_matrices": _median(per_matrix_coherence),
            "agreement": inner / pair_square if pair_square > 0 else math.nan,
            "agreement_matrices": _median(per_matrix_agreement),
            **{column: _median([u[i] for u in update.values() if u is not None])
               for i, column in enumerate(UPDATE_COLUMNS)},
        })


#: The update-shape columns :func:`update_shape` returns, in its order (medians over the weight matrices).
UPDATE_COLUMNS = ("update_stable_rank", "update_spike_share", "update_alignment")


def update_shape(start: torch.Tensor, end: torch.Tensor, share: float = 0.05) -> tuple[float, float, float] | None:
    """The shape of one matrix's update ``dW = end - start`` (each viewed as ``rows x rest``): its stable rank, the
    share of ``|dW|^2`` in ``U_k^T dW V_k`` (the top ``k = share * min(rows, rest)`` singular directions of ``start``
    on both sides; at least 1) and the cosine of ``dW`` with ``start``. ``None`` for matrices with a side under 8 or
    no update."""
    w0 = start.reshape(start.shape[0], -1).double()
    d = end.reshape(end.shape[0], -1).double() - w0
    energy = float(d.pow(2).sum())
    if min(w0.shape) < 8 or energy == 0.0:
        return None
    u, _, vh = torch.linalg.svd(w0, full_matrices=False)
    k = max(1, int(share * min(w0.shape)))
    inside = float((u[:, :k].T @ d @ vh[:k].T).pow(2).sum())
    top = float(torch.linalg.matrix_norm(d, 2)) ** 2
    return energy / top, inside / energy, float((d * w0).sum()) / math.sqrt(energy * float(w0.pow(2).sum()))


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def study_run(name: str, seed: int, quick: bool = False) -> dict[str, Any]:
    """One task x seed for its full budget with :class:`TrainingSignals` (and the test-accuracy curve)."""
    signals = TrainingSignals()
    return {**observed_run(name, seed, signals, quick), "signals": signals.epochs}


def study_key() -> str:
    return code_key([HERE / f for f in ("stopping_gradient_study.py", "stopping_tasks.py", "stopping_runs.py",
                                        "stopping_heldout.py")])


def _one(name: str, seed: int, cache: Path | None, quick: bool) -> dict[str, Any]:
    return cached(cache, f"{name}-{seed}-gradients-{study_key()}", lambda: study_run(name, seed, quick), quick)


# ------------------------------------------------------------------------------------------------ rules

Rule = Callable[[Sequence[dict[str, float]]], int | None]


def falls(column: str, fraction: float, patience: int = 1, warmup: int = 1) -> Rule:
    """Fires at the first epoch (after ``warmup`` epochs) where ``column`` has been below ``fraction`` of its running
    maximum for ``patience`` consecutive epochs."""
    return _streak(column, lambda v, high: v < fraction * high, patience, warmup, running=max)


def rises(column: str, factor: float, patience: int = 1, warmup: int = 1) -> Rule:
    """Fires at the first epoch (after ``warmup``) where a positive ``column`` has been above ``factor`` times its
    running minimum for ``patience`` consecutive epochs."""
    return _streak(column, lambda v, low: v > factor * low, patience, warmup, running=min)


def below(column: str, limit: float, patience: int = 1, warmup: int = 1) -> Rule:
    """Fires at the first epoch (after ``warmup``) where ``column < limit`` for ``patience`` consecutive epochs."""
    return _streak(column, lambda v, _: v < limit, patience, warmup)


def above(column: str, limit: float, patience: int = 1, warmup: int = 1) -> Rule:
    """Fires at the first epoch (after ``warmup``) where ``column > limit`` for ``patience`` consecutive epochs."""
    return _streak(column, lambda v, _: v > limit, patience, warmup)


def _streak(column: str, condition: Callable[[float, float], bool], patience: int, warmup: int,
            running: Callable[[float, float], float] | None = None) -> Rule:
    """The rule every family shares: fires at the first epoch (after ``warmup``) where ``condition(value, extreme)``
    has held for ``patience`` consecutive epochs, ``extreme`` being the ``running`` max or min of the readings so far
    (this one included; the value itself without ``running``). A NaN is no reading: it resets the streak."""

    def rule(series: Sequence[dict[str, float]]) -> int | None:
        extreme, run = math.nan, 0
        for i, e in enumerate(series):
            v = e[column]
            if not math.isfinite(v):
                run = 0
                continue
            extreme = v if running is None or math.isnan(extreme) else running(extreme, v)
            run = run + 1 if condition(v, extreme) else 0
            if i >= warmup and run >= patience:
                return int(e["epoch"])
        return None

    return rule


#: The recorded series, each a family of rules.
COLUMNS = ("gsnr", "gsnr_matrices", "snr_elements", "agreement", "agreement_matrices", "coherence",
           "coherence_matrices", *UPDATE_COLUMNS)
RULES: dict[str, Rule] = {}
for _column in (*COLUMNS[:7], "update_spike_share"):
    for _fraction in (0.5, 0.3, 0.2, 0.1, 0.05):
        for _patience in (1, 2):
            RULES[f"{_column} < {_fraction:g} x its max, {_patience} ep"] = falls(_column, _fraction, _patience)
for _limit in (1.0, 0.5, 0.2, 0.1, 0.05):
    RULES[f"gsnr < {_limit:g}, 2 ep"] = below("gsnr", _limit, 2)
    RULES[f"snr_elements < {_limit:g}, 2 ep"] = below("snr_elements", _limit, 2)
for _limit in (0.2, 0.1, 0.05, 0.02, 0.01):
    RULES[f"agreement < {_limit:g}, 2 ep"] = below("agreement", _limit, 2)
for _patience in (1, 2):  # memorizing spreads the update (its stable rank rises) and grows the weights there
    for _factor in (1.25, 1.5, 2.0):
        RULES[f"update_stable_rank > {_factor:g} x its min, {_patience} ep"] = rises("update_stable_rank", _factor,
                                                                                    _patience)
    for _limit in (0.3, 0.4, 0.5):
        RULES[f"update_alignment > {_limit:g}, {_patience} ep"] = above("update_alignment", _limit, _patience)


def score(run: dict[str, Any], rule: Rule) -> tuple[float, float, bool]:
    """(loss in points, fraction of epochs saved, stopped) of the model left where ``rule`` stops."""
    accs = [c["test_acc"] for c in run["curve"]]
    fired = rule(run["signals"])
    if fired is None:
        return max(accs) - accs[-1], 0.0, False
    return max(accs) - accs[fired], 1.0 - (fired + 1) / run["epochs"], True


GROUPS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "tuning seeds 0-2": lambda r: r["task"] in BENCHMARK and r["seed"] in TUNING_SEEDS,
    "held-out seeds 3-4": lambda r: r["task"] in BENCHMARK and r["seed"] not in TUNING_SEEDS,
    "plateau (bench)": lambda r: r["task"] in BENCHMARK and r["task"] not in OVERFITS,
    "over-fitting (bench)": lambda r: r["task"] in BENCHMARK and r["task"] in OVERFITS,
    "held-out tasks": lambda r: r["task"] in stopping_heldout.HELD_OUT,
}


def rates(scored: Sequence[tuple[float, float, bool]]) -> tuple[float, float, float]:
    """(within 1 point, epochs saved, never stopped), as fractions, of runs scored ``(loss, saved, stopped)`` (what
    :func:`score` returns)."""
    n = max(len(scored), 1)
    return (sum(s[0] <= WITHIN_POINTS + 1e-9 for s in scored) / n, sum(s[1] for s in scored) / n,
            sum(not s[2] for s in scored) / n)


def print_rules(runs: Sequence[dict[str, Any]], rules: dict[str, Rule]) -> None:
    """Every rule on every group, then each family's rule chosen on the tuning seeds (most runs within 1 point, then
    most epochs saved) with its figures on every group (held out: seeds 3-4 and the held-out tasks)."""
    groups = {g: [r for r in runs if keep(r)] for g, keep in GROUPS.items()}
    header = f"{'rule (within 1 pt / epochs saved / never stopped)':<50}" + "".join(
        f"{g + f' ({len(rs)})':>26}" for g, rs in groups.items())
    table = {name: [rates([score(r, rule) for r in rs]) for rs in groups.values()] for name, rule in rules.items()}

    def line(name: str) -> str:
        return f"{name:<50}" + "".join(f"{f'{a:4.0%} / {b:4.0%} / {c:4.0%}':>26}" for a, b, c in table[name])

    print("\n" + header)
    for name in rules:
        print(line(name))
    print("\neach family's rule chosen on the tuning seeds 0-2\n" + header)
    for column in COLUMNS:
        family = [n for n in rules if n.startswith(f"{column} ")]
        if family:
            print(line(max(family, key=lambda n: table[n][0][:2])))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    pair_arguments(parser, list(TASKS))
    args = parser.parse_args(argv)
    quiet()
    pairs = [(t, s) for t in args.tasks for s in args.seeds]
    runs = in_processes(_one, [(t, s, args.cache, args.quick) for t, s in pairs], args.jobs)
    print_rules(runs, RULES)
    return runs


if __name__ == "__main__":
    main()
