"""The batch-size experiment of Martin & Mahoney (arXiv 1810.01075) on built-in data.

Martin & Mahoney trained MiniAlexNet on CIFAR-10 with the same schedule at batch sizes 2 ... 1000 and found that
smaller batches give hidden layers with more heavy-tailed spectra: lower power-law alpha, lower spectral entropy,
stable rank and MP soft rank, and phases running from Random-like (large batches) to Heavy-tailed (batch 2).

Here the model is an MLP (64 -> 512 -> 512 -> 10) on scikit-learn's ``load_digits`` (generated locally, no
download), trained with the paper's recipe (THEORY_DOSSIER section 3.3, from the paper's own code):

* SGD, lr 0.01, momentum 0.9, lr multiplied by 0.95 after every epoch, the **same number of epochs** at every batch
  size (so small batches take many more steps: that is the experiment);
* loss: softmax cross-entropy by default. The paper's code used Keras ``loss='mse'`` on the softmax output;
  ``--loss mse`` reproduces that exactly. On this small problem the MSE gradient, damped by the softmax Jacobian,
  leaves the 512 x 512 layer within a few percent of its initialization after 60 epochs at every batch size (it
  stays random-like / bleeding-out and its alpha is noise): see ``docs/batch_size_phases_mse.md`` for that run and
  the investigation. Cross-entropy, the standard classification loss, is the default for that reason;
* Glorot-normal weights, biases 0.1, per-image standardized inputs (``tf.image.per_image_standardization``);
* one fixed stratified train/test split; seeds change the initialization and the batch order.

A diagnostic switch leaves that recipe: ``--epoch-samples N`` makes an "epoch" (of the lr decay and of
``--epochs``) N samples long, e.g. 50000 for the paper's CIFAR-10 epochs.

After training, :func:`lightning_htsr.analyze` gives alpha, entropy, mp_softrank, stable_rank and the phase of each
hidden matrix (``fc1``: 512 x 64, ``fc2``: 512 x 512). Per batch size the metrics are the median over seeds, the
phase is the most frequent label (with its count) and accuracies are mean +- sd. Outputs (``_mse`` added to the
names with ``--loss mse``): ``batch_size_phases.png``
(one panel per metric against log batch size, one line per layer, marker colour = majority phase, plus the phase
fractions and the accuracies) and ``batch_size_phases.md`` (setup, table, runtime). A ``## Discussion`` section
already in that markdown file is kept when the file is rewritten.

Usage::

    python examples/batch_size_phases.py                 # full run, 10 batch sizes x 10 seeds -> docs/
    python examples/batch_size_phases.py --quick         # 5 batch sizes x 3 seeds, < 5 min -> a temp folder
    python examples/batch_size_phases.py --batch-sizes 8 256 --epochs 3 --seeds 1 --out /tmp/x
    python examples/batch_size_phases.py --loss mse                   # the paper's exact recipe -> docs/*_mse.*
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and in spawned workers

import numpy as np
import pandas as pd
import torch
from torch import nn

FULL_BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_BATCH_SIZES = (4, 16, 64, 256, 1024)
HIDDEN_LAYERS = ("fc1", "fc2")
METRICS = ("alpha", "entropy", "mp_softrank", "stable_rank")
LR, MOMENTUM, LR_DECAY = 0.01, 0.9, 0.95
TEST_FRACTION, SPLIT_SEED = 0.25, 0
DISCUSSION_HEADING = "## Discussion"


# --------------------------------------------------------------------------------------------------- data and model
def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``load_digits`` (1797 8x8 images), per-image standardized, one fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    # tf.image.per_image_standardization: (x - mean) / max(std, 1/sqrt(num_pixels)), per image
    x = (x - x.mean(1, keepdims=True)) / np.maximum(x.std(1, keepdims=True), 1.0 / math.sqrt(x.shape[1]))
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)


def make_model(seed: int, width: int = 512) -> nn.Sequential:
    """64 -> 512 -> 512 -> 10 MLP with ReLU, returning logits (the softmax is in :func:`loss_fn`);
    Glorot-normal weights, biases 0.1."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(
        fc1=nn.Linear(64, width), relu1=nn.ReLU(), fc2=nn.Linear(width, width), relu2=nn.ReLU(),
        fc3=nn.Linear(width, 10),
    ))  # fmt: skip
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            nn.init.constant_(module.bias, 0.1)
    return model


def loss_fn(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``"mse"``: the paper's Keras ``loss='mse'`` on the softmax output vs. the one-hot label (mean over batch and
    classes); ``"cross_entropy"``: the usual softmax cross-entropy (a diagnostic variant, not the paper's)."""
    if name == "mse":
        return nn.functional.mse_loss(logits.softmax(1), nn.functional.one_hot(labels, logits.shape[1]).float())
    if name == "cross_entropy":
        return nn.functional.cross_entropy(logits, labels)
    raise ValueError(f"unknown loss {name!r}: use 'mse' or 'cross_entropy'")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def epoch_batches(n: int, epoch_samples: int, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Index batches of one epoch of ``epoch_samples`` samples: back-to-back shuffled passes over the ``n`` training
    samples, cut to length (one plain shuffled pass when ``epoch_samples == n``); the last, smaller batch is kept,
    as in Keras."""
    passes = -(-epoch_samples // n)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)])[:epoch_samples]
    return order.split(batch_size)


def train_one(batch_size: int, seed: int, epochs: int, epoch_samples: int | None = None,
              loss: str = "mse") -> tuple[nn.Module, dict[str, float]]:
    """Train one model with a plain loop; an "epoch" (of the lr decay and the epoch count) is ``epoch_samples``
    samples, by default one pass over the training set."""
    x_tr, y_tr, x_te, y_te = load_data()
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=LR_DECAY)
    gen = torch.Generator().manual_seed(10_000 + seed)
    n, steps, start = len(x_tr), 0, time.perf_counter()
    for _ in range(epochs):
        for idx in epoch_batches(n, epoch_samples or n, batch_size, gen):
            value = loss_fn(loss, model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            steps += 1
        sched.step()
    info = dict(steps=steps, train_seconds=time.perf_counter() - start,
                train_acc=accuracy(model, x_tr, y_tr), test_acc=accuracy(model, x_te, y_te))
    return model, info


def run_one(task: tuple[int, int, int, int | None, str]) -> list[dict]:
    """Train at (batch size, seed, epochs, epoch samples, loss) and analyze the trained model: one row per matrix."""
    batch_size, seed, epochs, epoch_samples, loss = task
    torch.set_num_threads(1)
    import lightning_htsr as htsr

    model, info = train_one(batch_size, seed, epochs, epoch_samples, loss)
    frame = htsr.analyze(model)
    frame = frame.assign(batch_size=batch_size, seed=seed, **info)
    return frame[["batch_size", "seed", "name", "N", "M", *METRICS, "phase", "D", "num_spikes", "status",
                  *info]].to_dict("records")


def run_all(batch_sizes: list[int], seeds: int, epochs: int, jobs: int,
            epoch_samples: int | None = None, loss: str = "mse") -> pd.DataFrame:
    """All (batch size, seed) runs, the slow small batches first, in ``jobs`` spawned processes (``jobs > 1`` needs
    this file run as a script or imported under its module name, so that the workers can import ``run_one``)."""
    tasks = [(bs, seed, epochs, epoch_samples, loss) for bs in sorted(batch_sizes) for seed in range(seeds)]
    if jobs <= 1:
        results = [run_one(t) for t in tasks]
    else:
        with mp.get_context("spawn").Pool(jobs) as pool:
            results = pool.map(run_one, tasks, chunksize=1)
    return pd.DataFrame([row for rows in results for row in rows])


# --------------------------------------------------------------------------------------------------- aggregation
def phase_counts(phases: pd.Series) -> Counter:
    """How often each phase label occurs (missing labels count as ``unclassified``)."""
    from lightning_htsr.plotting import phase_label

    return Counter(phase_label(p) for p in phases)


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (hidden layer, batch size): median metrics over seeds, majority phase, phase counts, mean accuracies."""
    rows = []
    hidden = runs[runs["name"].isin(HIDDEN_LAYERS)]
    for (layer, bs), group in hidden.groupby(["name", "batch_size"]):
        counts = phase_counts(group["phase"])
        label, count = counts.most_common(1)[0]
        row = dict(layer=layer, shape=f"{group['N'].iloc[0]}x{group['M'].iloc[0]}", batch_size=bs, seeds=len(group))
        for metric in METRICS:
            row[metric] = float(group[metric].median())
            row[f"{metric}_q25"] = float(group[metric].quantile(0.25))
            row[f"{metric}_q75"] = float(group[metric].quantile(0.75))
        row.update(phase=label, phase_count=count,
                   phase_counts=dict(counts),
                   train_acc=float(group["train_acc"].mean()), train_acc_sd=float(group["train_acc"].std(ddof=0)),
                   test_acc=float(group["test_acc"].mean()), test_acc_sd=float(group["test_acc"].std(ddof=0)),
                   steps=int(group["steps"].iloc[0]))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["layer", "batch_size"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------------- outputs
def table_markdown(summary: pd.DataFrame) -> str:
    seeds = int(summary["seeds"].max())
    head = ("| layer | batch size | steps | alpha | entropy | mp_softrank | stable_rank | phase (count / seeds) "
            "| train acc | test acc |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in summary.itertuples():
        lines.append(f"| {r.layer} ({r.shape}) | {r.batch_size} | {r.steps} | {r.alpha:.2f} | {r.entropy:.3f} "
                     f"| {r.mp_softrank:.3f} | {r.stable_rank:.1f} | {r.phase} ({r.phase_count}/{seeds}) "
                     f"| {r.train_acc:.3f} ± {r.train_acc_sd:.3f} | {r.test_acc:.3f} ± {r.test_acc_sd:.3f} |")
    return "\n".join(lines)


def trend_lines(summary: pd.DataFrame) -> list[str]:
    """Spearman correlation of each median metric with batch size, and which phases appear (any seed)."""
    out = []
    for layer, group in summary.groupby("layer"):
        rhos = ", ".join(f"{m} {group['batch_size'].corr(group[m], method='spearman'):+.2f}"
                         for m in (*METRICS, "test_acc"))
        seen = Counter()
        for counts in group["phase_counts"]:
            seen.update(counts)
        phases = ", ".join(f"{p} ({n})" for p, n in seen.most_common())
        out.append(f"- `{layer}`: Spearman rho with batch size: {rhos}. Phases over all runs: {phases}.")
    return out


def plot(summary: pd.DataFrame, path: Path, title: str) -> None:
    """Six panels against log batch size: alpha, entropy, MP soft rank, stable rank (median over seeds with the
    inter-quartile band, marker colour = majority phase), phase fractions over seeds, train/test accuracy."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter

    from lightning_htsr.plotting import PHASE_COLORS, phase_color

    fig = Figure(figsize=(13, 8), dpi=90)
    axes = fig.subplots(2, 3).ravel()
    styles = {"fc1": dict(marker="o", color="#666666", ls="--"), "fc2": dict(marker="s", color="black", ls="-")}
    titles = {"alpha": "power-law alpha", "entropy": "spectral entropy", "mp_softrank": "MP soft rank",
              "stable_rank": "stable rank (log scale)"}
    layers = sorted(summary["layer"].unique())
    for ax, metric in zip(axes, METRICS):
        for layer, group in summary.groupby("layer"):
            st = styles.get(layer, dict(marker="^", color="grey", ls=":"))
            bs = group["batch_size"].to_numpy()
            ax.fill_between(bs, group[f"{metric}_q25"], group[f"{metric}_q75"], color=st["color"], alpha=0.12, lw=0)
            ax.plot(bs, group[metric], color=st["color"], ls=st["ls"], lw=1.2, zorder=2)
            ax.scatter(bs, group[metric], marker=st["marker"], s=55, zorder=3, edgecolors="black", linewidths=0.6,
                       c=[phase_color(p) for p in group["phase"]])
        ax.set_title(titles[metric] + ": median, IQR band", fontsize=10)
    axes[0].axhline(6, color="#d62728", lw=0.8, ls=":")
    axes[0].set_title("power-law alpha: median, IQR band\n"
                      "(red dotted: 6; above it the tail is no meaningful power law)", fontsize=9)
    axes[3].set_yscale("log")
    axes[3].yaxis.set_major_formatter(ScalarFormatter())
    axes[3].yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 3, 5)))
    axes[3].yaxis.set_minor_formatter(NullFormatter())

    # phase fractions over seeds: one strip per layer, one stacked cell per batch size
    ax = axes[4]
    order = [p for p in PHASE_COLORS if p]
    for row, layer in enumerate(layers):
        for r in summary[summary["layer"] == layer].itertuples():
            bottom = row - 0.4
            for phase in order:
                frac = r.phase_counts.get(phase, 0) / r.seeds
                if frac:
                    ax.bar(r.batch_size, 0.8 * frac, bottom=bottom, width=r.batch_size * 0.5,
                           color=PHASE_COLORS[phase], edgecolor="white", linewidth=0.3)
                    bottom += 0.8 * frac
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylim(-0.6, len(layers) - 0.4)
    ax.set_title("phase: fraction of seeds", fontsize=10)

    ax = axes[5]
    acc = summary.drop_duplicates("batch_size").sort_values("batch_size")
    for col, st in (("train_acc", dict(color="#1f77b4", marker="o")), ("test_acc", dict(color="#d62728", marker="s"))):
        ax.errorbar(acc["batch_size"], acc[col], yerr=acc[f"{col}_sd"], capsize=2, label=col.replace("_", " "), **st)
    ax.set_title("accuracy: mean ± sd over seeds", fontsize=10)
    ax.legend(fontsize=8)

    batch_sizes = sorted(summary["batch_size"].unique())
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("batch size", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    present = [p for p in order if any(p in c for c in summary["phase_counts"])]
    handles = [Line2D([], [], label=layer, markerfacecolor="white", **styles[layer]) for layer in layers
               if layer in styles] + [Patch(color=PHASE_COLORS[p], label=p) for p in present]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               title="layer (line, marker) and phase (marker colour, bars)", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=90)


def kept_discussion(path: Path) -> str:
    """The hand-written ``## Discussion`` section of an existing report (to the end of the file), or ''."""
    if not path.exists():
        return ""
    text = path.read_text()
    match = re.search(rf"^{re.escape(DISCUSSION_HEADING)}\b.*", text, flags=re.S | re.M)
    return match.group(0).rstrip() + "\n" if match else ""


def write_report(summary: pd.DataFrame, args: argparse.Namespace, argv: list[str], seconds: float,
                 path: Path) -> None:
    discussion = kept_discussion(path)
    cmd = " ".join(["python examples/batch_size_phases.py", *argv])
    loss_text = ("MSE loss on the softmax output vs. one-hot labels (the paper's)" if args.loss == "mse"
                 else "**softmax cross-entropy loss** (the paper's code used MSE on the softmax, which barely "
                      "trains the 512 x 512 layer here: see batch_size_phases_mse.md)")
    epoch = (f"epochs of {args.epoch_samples} samples (back-to-back shuffled passes)" if args.epoch_samples
             else "epochs (one pass over the training set each)")
    text = f"""# Batch size and the 5+1 phases (Martin & Mahoney 2018, arXiv 1810.01075) on `load_digits`

![alpha, entropy, MP soft rank, stable rank, phase and accuracy against batch size]({path.stem}.png)

Generated by `{cmd}` in **{seconds / 60:.1f} min** wall time ({args.jobs} worker process(es), one torch thread
each, on a shared 2-core CPU).

## Setup

- Data: scikit-learn `load_digits` (1797 8x8 images, 10 classes), per-image standardized
  (`tf.image.per_image_standardization`, as in the paper's code); one fixed stratified split, 1347 train / 450 test.
- Model: MLP 64 -> 512 (`fc1`) -> 512 (`fc2`) -> 10 (`fc3`), ReLU, softmax output; Glorot-normal weights,
  biases 0.1. The hidden matrices analyzed are `fc1` (512 x 64, 64 eigenvalues) and `fc2` (512 x 512);
  `fc3` (10 eigenvalues) is too small for a spectrum.
- Training, the paper's recipe (MiniAlexNet code, THEORY_DOSSIER section 3.3): SGD lr {LR}, momentum {MOMENTUM},
  lr x {LR_DECAY} after each epoch, {loss_text}, **{args.epochs} {epoch} at
  every batch size** (so the number of steps falls with the batch size; column `steps`), the last partial batch
  kept. No weight decay, no augmentation, no early stopping.
- Batch sizes: {", ".join(map(str, sorted(args.batch_sizes)))}; seeds 0..{args.seeds - 1} per batch size (a seed sets
  the initialization and the batch order; the paper pooled 10 runs per batch size).
- Analysis: `lightning_htsr.analyze(model)` with the package defaults, per trained model. Per batch size the table
  gives the **median over seeds** of alpha, entropy, mp_softrank and stable_rank (the figure also shows the
  inter-quartile band), the **most frequent phase** from the package's automatic classifier with its count, and
  train/test accuracy as mean ± sd over seeds.

## Results

{table_markdown(summary)}

Trend summary (computed from the table):

{chr(10).join(trend_lines(summary))}

"""
    path.write_text(text + (discussion or f"{DISCUSSION_HEADING}\n\n(to be written after looking at the results)\n"))


# --------------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"batch sizes {' '.join(map(str, QUICK_BATCH_SIZES))} x 3 seeds (a few minutes); "
                             "writes to a temp folder unless --out is given")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/)")
    parser.add_argument("--epochs", type=int, default=60, help="epochs at every batch size (default 60)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help=f"default {' '.join(map(str, FULL_BATCH_SIZES))}")
    parser.add_argument("--seeds", type=int, default=None, help="runs per batch size (default 10, 3 with --quick)")
    parser.add_argument("--epoch-samples", type=int, default=None,
                        help="samples per epoch of the lr schedule (default: one pass over the 1347 training "
                             "samples; 50000 = one CIFAR-10 epoch of the paper)")
    parser.add_argument("--loss", choices=("mse", "cross_entropy"), default="cross_entropy",
                        help="cross_entropy (default) or mse on the softmax output (the paper's exact recipe, "
                             "which barely trains the 512 x 512 layer here; outputs get an _mse suffix)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    args = parser.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = list(QUICK_BATCH_SIZES if args.quick else FULL_BATCH_SIZES)
    if args.seeds is None:
        args.seeds = 3 if args.quick else 10
    if args.out is None:
        # a quick run must not overwrite the committed full-run figure and report
        args.out = Path(tempfile.gettempdir()) / "batch_size_phases_quick" if args.quick else Path("docs")
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Run the experiment; returns the per-(layer, batch size) summary table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = run_all(args.batch_sizes, args.seeds, args.epochs, args.jobs, args.epoch_samples, args.loss)
    summary = aggregate(runs)
    seconds = time.perf_counter() - start
    epoch = f" of {args.epoch_samples} samples" if args.epoch_samples else ""
    title = (f"MLP 64-512-512-10 on load_digits, {args.loss} loss: {args.epochs} epochs{epoch} at every batch "
             f"size, {args.seeds} seed(s) per batch size")
    stem = "batch_size_phases" + ("_mse" if args.loss == "mse" else "")
    plot(summary, args.out / f"{stem}.png", title)
    write_report(summary, args, argv, seconds, args.out / f"{stem}.md")
    print(table_markdown(summary))
    print("\n".join(trend_lines(summary)))
    num_runs = len(runs.drop_duplicates(["batch_size", "seed"]))
    print(f"\n{num_runs} runs in {seconds:.0f} s; wrote {args.out / (stem + '.png')} and "
          f"{args.out / (stem + '.md')}")
    return summary


if __name__ == "__main__":
    main()
