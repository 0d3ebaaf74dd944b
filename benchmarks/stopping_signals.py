"""Candidate weights-only signals of over-fitting, measured on the stopping benchmark's reference runs.

Each signal reads the epoch-end analyses of one reference run (records and smoothed phases, as the callback sees
them) and returns the first epoch at which it fires, or ``None``. ``signal_table`` prints, per signal: on the tasks
that over-fit, in how many runs it fires and how many epochs after the accuracy peak (negative: before it); on the
tasks that plateau, in how many runs it fires at all (a false alarm: nothing to catch there).

    python benchmarks/bench_stopping.py --live none --study --cache .stop_cache   # prints this table too
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning_htsr.spectra.phases import PhaseTracker
from lightning_htsr.training.stopping import learning_matrices

#: One epoch-end analysis as a signal sees it: epoch and {matrix name: record} of the learning matrices.
Step = tuple[int, dict[str, Mapping[str, Any]]]
Signal = Callable[[Sequence[Step]], int | None]


def learning_steps(analyses: Sequence[Mapping[str, Any]]) -> list[Step]:
    """The learning matrices (the settled rule's: classified, not random-like, finite alpha and entropy) of every
    evaluated epoch-end analysis, phases smoothed as in the callback."""
    tracker, out = PhaseTracker(k=2), []
    for a in analyses:
        smoothed = tracker.update_records(a["records"])
        if a["trigger"] == "train_start":
            continue
        out.append((int(a["epoch"]), {r["name"]: r for r in learning_matrices(a["records"], smoothed)}))
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def turning(metric: str, tolerance: float, fraction: float, patience: int = 2, absolute: float = 0.0) -> Signal:
    """Fires when at least ``fraction`` of the learning matrices have ``metric`` above their running minimum by more
    than ``tolerance`` (relative) and at least ``absolute`` for ``patience`` consecutive analyses: the spectrum
    drifting back toward random."""

    def signal(steps: Sequence[Step]) -> int | None:
        low: dict[str, float] = {}
        above: dict[str, int] = {}
        for epoch, mats in steps:
            turned = 0
            for name, r in mats.items():
                v = r.get(metric)
                if not _finite(v):
                    continue
                low[name] = min(low.get(name, v), v)
                rose = v > low[name] + tolerance * abs(low[name]) and v >= low[name] + absolute
                above[name] = above.get(name, 0) + 1 if rose else 0
                turned += above[name] >= patience
            if mats and turned >= fraction * len(mats):
                return epoch
        return None

    return signal


def threshold(metric: str, below: float, patience: int = 2) -> Signal:
    """Fires when any learning matrix has ``metric < below`` for ``patience`` consecutive analyses."""

    def signal(steps: Sequence[Step]) -> int | None:
        run: dict[str, int] = {}
        for epoch, mats in steps:
            for name, r in mats.items():
                v = r.get(metric)
                run[name] = run.get(name, 0) + 1 if _finite(v) and v < below else 0
                if run[name] >= patience:
                    return epoch
        return None

    return signal


def norm_after_alpha(alpha_tolerance: float = 0.05, growth: float = 0.05, patience: int = 3) -> Signal:
    """Fires when a majority of learning matrices kept alpha within ``alpha_tolerance`` of its value ``patience``
    analyses ago while their ``log_norm`` grew by more than ``growth`` (the norm growing after alpha settled)."""

    def signal(steps: Sequence[Step]) -> int | None:
        for i in range(patience, len(steps)):
            epoch, now = steps[i]
            _, then = steps[i - patience]
            hits = [n for n, r in now.items() if n in then and all(_finite(x.get(k)) for x in (r, then[n])
                                                                  for k in ("alpha", "log_norm"))
                    and abs(r["alpha"] - then[n]["alpha"]) <= alpha_tolerance * abs(then[n]["alpha"])
                    and r["log_norm"] - then[n]["log_norm"] > growth]
            if now and len(hits) > len(now) / 2:
                return epoch
        return None

    return signal


SIGNALS: dict[str, Signal] = {
    "entropy above its minimum by 0.5 %, half of matrices, 2 analyses": turning("entropy", 0.005, 0.5),
    "entropy above its minimum by 1 %, half of matrices, 2 analyses": turning("entropy", 0.01, 0.5),
    "entropy above its minimum by 0.2 %, half of matrices, 2 analyses": turning("entropy", 0.002, 0.5),
    "entropy above its minimum by 0.5 %, any matrix, 2 analyses": turning("entropy", 0.005, 1e-9),
    "stable rank above its minimum by 5 %, half of matrices": turning("stable_rank", 0.05, 0.5),
    "stable rank above its minimum by 10 %, half of matrices": turning("stable_rank", 0.10, 0.5),
    "alpha above its minimum by 10 %, half of matrices": turning("alpha", 0.10, 0.5),
    "alpha above its minimum by 20 %, half of matrices": turning("alpha", 0.20, 0.5),
    "alpha < 2 on a learning matrix, 2 analyses": threshold("alpha", 2.0),
    "ERG_gap < 0 on a learning matrix, 2 analyses": threshold("ERG_gap", 0.0),
    "log_norm +0.05 in 3 analyses while alpha within 5 %": norm_after_alpha(),
}


def signal_table(references: Sequence[Mapping[str, Any]], overfitting: Sequence[str],
                 epoch_end: Callable[[Mapping[str, Any]], list]) -> None:
    """Print, per candidate signal (:data:`SIGNALS`), when it fires relative to the accuracy peak and its false
    alarms."""
    signal_rows(references, overfitting, epoch_end, SIGNALS)


def signal_rows(runs: Sequence[Mapping[str, Any]], overfitting: Sequence[str],
                epoch_end: Callable[[Mapping[str, Any]], list], signals: Mapping[str, Signal]) -> None:
    """The table of :func:`signal_table` for any runs (``task``, ``seed``, ``curve``, analyses) and signals."""
    over = [r for r in runs if r["task"] in overfitting]
    plateau = [r for r in runs if r["task"] not in overfitting]
    steps = {(r["task"], r["seed"]): learning_steps(epoch_end(r)) for r in runs}
    peak = {(r["task"], r["seed"]): max(r["curve"], key=lambda c: c["test_acc"])["epoch"] for r in runs}
    print(f"\n{'candidate signal (epoch-end analyses)':<66} {'fires (over-fitting)':>21} {'epochs after peak':>24} "
          f"{'false alarms (plateau)':>23}")
    for name, signal in signals.items():
        lags = []
        for r in over:
            fired = signal(steps[(r["task"], r["seed"])])
            if fired is not None:
                lags.append(fired - peak[(r["task"], r["seed"])])
        alarms = sum(signal(steps[(r["task"], r["seed"])]) is not None for r in plateau)
        spread = (f"median {statistics.median(lags):+.0f} [{min(lags):+d}, {max(lags):+d}]" if lags else "-")
        print(f"{name:<66} {len(lags):>10} of {len(over):<8} {spread:>24} {alarms:>11} of {len(plateau):<9}")
