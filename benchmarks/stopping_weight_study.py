"""The over-fitting signals the reference runs cannot show: correlation traps and the drift from initialization.

``bench_stopping.py --study`` measures candidate signals on the columns the callback records during training. Two
families the issue asked for need more than those columns, so this script trains the runs again and, at every epoch
end, analyzes the model twice with the package's own front door:

* ``analyze(model, randomize=True)``: weightwatcher's correlation-trap columns (``rand_distance``, the Jensen-Shannon
  distance between the ESD and that of the element-shuffled matrix, and ``num_traps``, spikes of the shuffled matrix:
  unusually large single entries, which memorizing individual examples might create);
* ``analyze(model, base_model=<the weights at train start>)``: the ESD of ``W - W0``, what training added. Learning a
  task should add a few directions; memorizing noise many more (``delta_entropy``, ``delta_stable_rank``).

Every signal is read the way ``stopping_signals.py`` reads its own: on the learning matrices of the epoch-end
analyses (phases smoothed as in the callback), the first epoch it fires, against the epoch of the best test
accuracy; its false alarms are the plateau tasks' runs in which it fires at all. The entropy turn the default rule
uses is repeated on the same runs as the yardstick.

    python benchmarks/stopping_weight_study.py --seeds 0 1 2 --jobs 2 --cache .stop_cache
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stopping import (  # noqa: E402
    HERE,
    PACKAGE,
    cached,
    code_key,
    in_processes,
    observed_run,
    pair_arguments,
    quiet,
)
from stopping_runs import HISTORY_COLUMNS, _plain  # noqa: E402
from stopping_signals import Signal, signal_rows, threshold, turning  # noqa: E402
from stopping_tasks import OVERFITTING, TASKS  # noqa: E402

from lightning_htsr import analyze  # noqa: E402

#: Trap columns kept, each also negated (``neg_<column>``: the signals fire on rises and on values below a limit).
TRAP_COLUMNS = ("rand_distance", "num_traps")


class StudyAnalyses(pl.Callback):
    """At train start and every epoch end: the model's records with the trap and delta columns added."""

    def __init__(self) -> None:
        self.analyses: list[dict[str, Any]] = []
        self.initial: torch.nn.Module | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = copy.deepcopy(pl_module).cpu()
        self._analyze(trainer, pl_module, "train_start")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._analyze(trainer, pl_module, "epoch")

    def _analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: str) -> None:
        frame = analyze(pl_module, randomize=True, seed=0)
        delta = None
        if trigger != "train_start":
            with warnings.catch_warnings():  # a classifier head's delta has rank classes - 1: no fit, said each time
                warnings.simplefilter("ignore", UserWarning)
                delta = analyze(pl_module, base_model=self.initial).set_index("name")
        records = []
        for row in frame.to_dict("records"):
            record = {c: _plain(row[c]) for c in HISTORY_COLUMNS + TRAP_COLUMNS if c in row}
            for column in TRAP_COLUMNS:
                if record.get(column) is not None:
                    record[f"neg_{column}"] = -record[column]
            if delta is not None and row["name"] in delta.index:
                d = delta.loc[row["name"]]
                for column in ("entropy", "stable_rank", "alpha", "num_spikes"):
                    record[f"delta_{column}"] = _plain(d[column])
            records.append(record)
        self.analyses.append({"analysis": len(self.analyses), "epoch": trainer.current_epoch,
                              "step": trainer.global_step, "trigger": trigger, "records": records})


def study_run(name: str, seed: int, quick: bool = False) -> dict[str, Any]:
    """One task x seed for its full budget (``quick``: the benchmark's smoke-test budget), with
    :class:`StudyAnalyses`."""
    study = StudyAnalyses()
    return {**observed_run(name, seed, study, quick), "analyses": study.analyses}


def study_key() -> str:
    """The study runs' code: this script, the tasks and runs, and the package."""
    return code_key([HERE / f for f in ("stopping_weight_study.py", "stopping_tasks.py", "stopping_runs.py")]
                    + list(PACKAGE.rglob("*.py")))


def _one(name: str, seed: int, cache: Path | None, quick: bool) -> dict[str, Any]:
    return cached(cache, f"{name}-{seed}-study-{study_key()}", lambda: study_run(name, seed, quick), quick)


#: The candidates: the yardstick (the default rule's entropy turn), then the trap and delta families.
SIGNALS: dict[str, Signal] = {
    "entropy above its minimum by 1 %, half (the default rule's)": turning("entropy", 0.01, 0.5, patience=1),
    "num_traps > 0 on a learning matrix, 2 analyses": threshold("neg_num_traps", 0.0),
    "num_traps above its minimum (+1), half of matrices": turning("num_traps", 0.0, 0.5, absolute=1.0),
    "num_traps above its minimum (+1), any matrix": turning("num_traps", 0.0, 1e-9, absolute=1.0),
    "rand_distance below its maximum by 5 %, half of matrices": turning("neg_rand_distance", 0.05, 0.5),
    "rand_distance below its maximum by 10 %, half of matrices": turning("neg_rand_distance", 0.10, 0.5),
    "delta entropy above its minimum by 1 %, half of matrices": turning("delta_entropy", 0.01, 0.5),
    "delta stable rank above its minimum by 10 %, half of matrices": turning("delta_stable_rank", 0.10, 0.5),
    "delta stable rank above its minimum by 25 %, half of matrices": turning("delta_stable_rank", 0.25, 0.5),
    "delta alpha above its minimum by 10 %, half of matrices": turning("delta_alpha", 0.10, 0.5),
}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    pair_arguments(parser, list(TASKS), seeds=(0, 1, 2))
    args = parser.parse_args(argv)
    quiet()
    pairs = [(t, s) for t in args.tasks for s in args.seeds]
    runs = in_processes(_one, [(t, s, args.cache, args.quick) for t, s in pairs], args.jobs)
    traps = sum((r.get("num_traps") or 0) > 0 for run in runs for a in run["analyses"] for r in a["records"])
    records = sum(len(a["records"]) for run in runs for a in run["analyses"])
    print(f"{len(runs)} runs ({', '.join(args.tasks)}; seeds {' '.join(map(str, args.seeds))}); records with a "
          f"correlation trap: {traps} of {records}")
    signal_rows(runs, OVERFITTING, lambda run: run["analyses"], SIGNALS)
    return runs


if __name__ == "__main__":
    main()
