"""Quickstart: watch an MLP's weight matrices become heavy-tailed while it trains.

Trains a 64 -> 512 -> 512 -> 10 MLP on scikit-learn's handwritten digits (8x8 images, 10 classes; shipped with
scikit-learn, no download) with ``HTSRCallback`` and a ``TensorBoardLogger``, then prints the last analysis: one
row per weight matrix with its power-law exponent ``alpha``, spectral entropy and phase.

    python examples/quickstart.py                 # about 40 s on 2 CPU cores
    python examples/quickstart.py --quick         # a few seconds (smoke test)
    tensorboard --logdir htsr_runs                # the command is printed at the end

Everything the callback logs lands under ``--logdir``: scalars ``htsr/<layer>/alpha`` (``entropy``, ``phase``, ...),
model-level ``htsr/alpha_mean``, eigenvalue histograms, ESD figures, a phase map, and ``htsr_history.csv``; the
final weights are saved as ``model.ckpt`` next to them, for ``lightning-htsr analyze``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

# One BLAS/OpenMP thread: on a small shared CPU, two threads contending for cores make the eigensolver much slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_htsr import HTSRCallback, PhaseConfig, summarize  # noqa: E402
from lightning_htsr.records import flag_unclassified, records_to_frame  # noqa: E402
from lightning_htsr.training.sinks import read_history  # noqa: E402


def load_digits_tensors(seed: int = 0, val_fraction: float = 0.2):
    """The 1797 digits as float tensors in [0, 1], split into train and validation sets (stratification-free)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    return (x[train], y[train]), (x[val], y[val])


class DigitsMLP(pl.LightningModule):
    """A plain MLP classifier trained with SGD + momentum."""

    def __init__(self, hidden: int = 512, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.example_input_array = torch.zeros(1, 64)  # lets the model summary show shapes and FLOPs
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def quiet_lightning() -> None:
    """Keep the console for the results: no Lightning banners, tips or benign warnings."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.callbacks.htsr").setLevel(logging.INFO)  # but say why HT-SR stopped
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*", ".*LeafSpec.*",
                    ".*litlogger.*", ".*litmodels.*"):
        warnings.filterwarnings("ignore", message=pattern)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=20, help="training epochs (one HT-SR analysis after each)")
    p.add_argument("--batch-size", type=int, default=16, help="mini-batch size (small batches: heavier tails)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    p.add_argument("--logdir", default="htsr_runs", help="TensorBoard log directory")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="store_true", help="let HT-SR stop training once the spectra have settled "
                   "(HTSRCallback(stop_on='heavy_tailed'), the rule validated by benchmarks/bench_stopping.py)")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: 2 epochs on a fraction of the data")
    return p.parse_args(argv)


def print_table(records) -> None:
    """The latest analysis, one row per weight matrix (too small to classify: alpha in parentheses)."""
    print(f"{'layer':<8} {'shape':>9} {'alpha':>6} {'entropy':>7}  {'phase':<17} warning")
    for r in records:
        shape = f"{r['N']}x{r['M']}"
        row = flag_unclassified(r, "{:.2f}".format)  # phase "(too small)", alpha "(1.33)": no finding
        alpha = row["alpha"] if isinstance(row["alpha"], str) else f"{r['alpha']:.2f}" if r["alpha"] == r["alpha"] \
            else "-"
        entropy = f"{r['entropy']:.3f}" if r["entropy"] == r["entropy"] else "-"
        print(f"{r['name']:<8} {shape:>9} {alpha:>6} {entropy:>7}  {row['phase']:<17} {r['warning'] or ''}")


def phase_paths(history_path: str) -> dict[str, list[str]]:
    """Per matrix, the smoothed phases it went through (the ``smoothed_phase`` column of the history, as in
    TensorBoard's phase map; repeats dropped), each with the epoch it first appeared at (``start``: the baseline
    analysis before training)."""
    history = read_history(history_path)
    paths: dict[str, list[str]] = {}
    for name, rows in history.groupby("name", sort=False):
        path, last = [], None
        for trigger, epoch, phase in zip(rows["trigger"], rows["epoch"], rows["smoothed_phase"]):
            if isinstance(phase, str) and phase and phase != last:
                when = "start" if trigger == "train_start" else f"epoch {epoch}"
                path.append(f"{phase} ({when})")
                last = phase
        if path:
            paths[name] = path
    return paths


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    pl.seed_everything(args.seed, verbose=False)

    (x_train, y_train), (x_val, y_val) = load_digits_tensors(args.seed)
    epochs, limit = args.epochs, None
    if args.quick:
        epochs, limit = 2, 0.25
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=256)

    model = DigitsMLP(lr=args.lr)
    # analyze every weight matrix before training and after every epoch; with --stop, also stop once they settle
    htsr = HTSRCallback(stop_on="heavy_tailed" if args.stop else None, print_summary=args.stop)
    logger = TensorBoardLogger(args.logdir, name="quickstart")
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[htsr],
        limit_train_batches=limit, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, log_every_n_steps=10,
    )  # fmt: skip

    print(f"Training {type(model).__name__} on sklearn digits ({len(x_train)} train / {len(x_val)} val images), "
          f"{epochs} epochs, batch size {args.batch_size}; HT-SR analysis after every epoch ...")
    start = time.perf_counter()
    trainer.fit(model, train, val)
    seconds = time.perf_counter() - start
    val_acc = float(trainer.callback_metrics["val_acc"])

    print()
    print(pl.utilities.model_summary.ModelSummary(model, max_depth=2))
    print()
    print(f"Finished in {seconds:.1f} s: validation accuracy {val_acc:.1%}, {htsr.analysis_count} HT-SR analyses "
          f"(last at step {trainer.global_step}).")
    print()
    print_table(htsr.latest_records)
    print()
    print("alpha: power-law exponent of the tail of the eigenvalues of W^T W (2-6: well-trained, < 2: very heavy-tailed).")
    small = [f"{r['name']} ({r['num_evals']} eigenvalues)" for r in htsr.latest_records
             if r["status"] == "success" and not r["phase"]]
    if small:
        print(f"Too few eigenvalues for a phase (< {PhaseConfig().min_evals}) or a meaningful alpha, so not in the "
              f"means: {', '.join(small)}.")
    summary = summarize(records_to_frame(htsr.latest_records))
    print(f"Model: alpha_mean {summary['alpha']:.3f}, entropy_mean {summary['entropy']:.3f} over the "
          f"{summary['num_classified']} classified matrices (the htsr/alpha_mean TensorBoard shows).")
    print()
    print("Smoothed phases during training (smoothed_phase, the epoch each was first seen at):")
    for name, path in phase_paths(htsr.history_path).items():
        print(f"  {name:<6} {' -> '.join(path)}")
    print()
    checkpoint = os.path.join(logger.log_dir, "model.ckpt")
    trainer.save_checkpoint(checkpoint)
    print(f"History (one row per matrix per analysis): {htsr.history_path}")
    print(f"See alpha, entropy and phase per layer over training:\n\n    tensorboard --logdir {args.logdir}\n")
    print(f"Analyze the final weights offline (same numbers as above):\n\n    lightning-htsr analyze {checkpoint}\n")
    return {"val_acc": val_acc, "records": htsr.latest_records, "log_dir": logger.log_dir, "seconds": seconds,
            "history_path": htsr.history_path, "analysis_count": htsr.analysis_count, "checkpoint": checkpoint,
            "summary": summary, "stopped_epoch": htsr.stopped_epoch, "epochs_run": trainer.current_epoch}


if __name__ == "__main__":
    main(sys.argv[1:])
