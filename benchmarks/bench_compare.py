"""What ``lightning-htsr compare`` can and cannot tell: model-level HT-SR metrics against test accuracy on a family
of small MLPs trained on ``sklearn.datasets.load_digits`` (no download).

Run from the repository root (about 3-5 minutes on one core)::

    OMP_NUM_THREADS=1 python benchmarks/bench_compare.py              # the family, its table and Spearman rho
    OMP_NUM_THREADS=1 python benchmarks/bench_compare.py --seeds 0 1  # one family per seed, rho per seed
    OMP_NUM_THREADS=1 python benchmarks/bench_compare.py --json out.json

The family (one model per row, ``torch.manual_seed(seed)``): ``Linear(64, 512) ReLU Linear(512, 512) ReLU
Linear(512, 512) ReLU Linear(512, 10)`` (3 matrices with >= 50 eigenvalues, so 3 classified ones; the 10 x 512
head is too small to classify), trained with SGD (lr 0.02, momentum 0.9, no weight decay) for a fixed
:data:`EPOCHS` epochs on 1200 digits (inputs scaled to [0, 1]), tested on the other 597 (clean labels):

* clean sub-family: batch size 4, 8, 16, 32, 64, 128, 256, 512, 1024 with clean labels (small batches take more
  and noisier steps: the batch-size knob of Martin & Mahoney);
* label noise: a share of the training labels replaced by a uniformly random *other* class: 10 %, 20 %, 30 %,
  40 % at batch size 16, and 20 %, 40 % at batch size 128.

Each model's weights are saved as a safetensors file and read back by ``compare_models`` (what ``lightning-htsr
compare`` runs, default options), so the numbers are the command's. Spearman's rho of every metric against test
accuracy is reported over the whole family, the clean sub-family, its models with batch size <= 256 (leaving out
the two under-trained ones) and the batch-size-16 models (clean and with label noise); the training accuracy on
the models' own labels (which needs the data) is the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_htsr.compare import COMPARE_METRICS, compare_models

#: Training epochs of every model (fixed: small batches take more steps in the same number of epochs).
EPOCHS = 40
#: (batch size, label-noise share) of the family.
CLEAN = [(b, 0.0) for b in (4, 8, 16, 32, 64, 128, 256, 512, 1024)]
NOISY = [(16, 0.1), (16, 0.2), (16, 0.3), (16, 0.4), (128, 0.2), (128, 0.4)]


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1200 training and 597 test digits (features in [0, 1]), split by ``seed``."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    return x[:1200], y[:1200], x[1200:], y[1200:]


def noisy(labels: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """``labels`` with ``share`` of them replaced by a random other class."""
    g = torch.Generator().manual_seed(seed + 1000)
    out = labels.clone()
    flip = torch.randperm(len(labels), generator=g)[: round(share * len(labels))]
    out[flip] = (labels[flip] + torch.randint(1, 10, (len(flip),), generator=g)) % 10
    return out


def mlp() -> nn.Module:
    """The family's architecture."""
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512),
                         nn.ReLU(), nn.Linear(512, 10))


def train(batch: int, noise: float, seed: int, data: tuple[torch.Tensor, ...]) -> tuple[nn.Module, float, float]:
    """One model: (model, train accuracy on its own labels, test accuracy)."""
    x_train, y_train, x_test, y_test = data
    labels = noisy(y_train, noise, seed) if noise else y_train
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(labels), generator=g).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), labels[idx]).backward()
            opt.step()
    with torch.no_grad():
        train_acc = float((model(x_train).argmax(1) == labels).float().mean())
        test_acc = float((model(x_test).argmax(1) == y_test).float().mean())
    return model, train_acc, test_acc


def family(seed: int, out_dir: Path) -> list[dict]:
    """Train the family, save each model, compare them; one row per model."""
    data = digits(seed)
    rows, paths = [], []
    for batch, noise in CLEAN + NOISY:
        start = time.perf_counter()
        model, train_acc, test_acc = train(batch, noise, seed, data)
        path = out_dir / f"seed{seed}_b{batch}_n{round(noise * 100)}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        paths.append(str(path))
        rows.append({"seed": seed, "batch": batch, "noise": noise, "train_acc": train_acc, "test_acc": test_acc,
                     "train_s": time.perf_counter() - start})
        print(f"  seed {seed} batch {batch:4d} noise {noise:.0%}: test {test_acc:.3f} train {train_acc:.3f} "
              f"({rows[-1]['train_s']:.0f} s)", file=sys.stderr, flush=True)
    table = compare_models(paths)
    for row, (_, summary) in zip(rows, table.iterrows()):
        row.update({m: float(summary[m]) for m in COMPARE_METRICS})
        row.update({c: int(summary[c]) for c in table.columns if c.startswith("n_")})
    return rows


def spearman(rows: list[dict], metric: str) -> float:
    """Spearman's rho of ``metric`` with test accuracy over ``rows``."""
    rho = spearmanr([r[metric] for r in rows], [r["test_acc"] for r in rows]).statistic
    return float(rho)


def subsets(rows: list[dict]) -> dict[str, list[dict]]:
    """The groups the correlations are reported over."""
    return {
        "whole family": rows,
        "clean sub-family": [r for r in rows if r["noise"] == 0],
        "clean, batch <= 256": [r for r in rows if r["noise"] == 0 and r["batch"] <= 256],
        "batch 16, noise 0-40 %": [r for r in rows if r["batch"] == 16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--json", help="write every row and correlation as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows = family(seed, Path(tmp))
            parts = subsets(rows)
            rho = {m: {label: spearman(part, m) for label, part in parts.items()} for m in (*COMPARE_METRICS,
                                                                                           "train_acc")}
            results[seed] = {"rows": rows, "spearman": rho}
            print(f"\nseed {seed}: {len(rows)} models, {EPOCHS} epochs\n")
            print("| batch | label noise | test acc | train acc | " + " | ".join(COMPARE_METRICS) + " | phases |")
            print("|" + "---|" * (5 + len(COMPARE_METRICS)))
            for r in rows:
                phases = ", ".join(f"{k[2:]} {v}" for k, v in r.items() if k.startswith("n_") and v)
                print(f"| {r['batch']} | {r['noise']:.0%} | {r['test_acc']:.3f} | {r['train_acc']:.3f} | "
                      + " | ".join(f"{r[m]:.3f}" for m in COMPARE_METRICS) + f" | {phases} |")
            print("\n| Spearman rho with test accuracy | " + " | ".join(COMPARE_METRICS) + " | train acc (needs data) |")
            print("|" + "---|" * (2 + len(COMPARE_METRICS)))
            for label, part in parts.items():
                print(f"| {label} ({len(part)}) | " + " | ".join(f"{rho[m][label]:+.2f}" for m in COMPARE_METRICS)
                      + f" | {rho['train_acc'][label]:+.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
