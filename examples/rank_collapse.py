"""Rank collapse: very strong weight decay on one hidden layer, and how ``lightning_htsr.analyze`` labels it.

Trains the same 64 -> 256 -> 256 -> 10 MLP on scikit-learn's digits twice with AdamW (lr 3e-3, 20 epochs):

* **normal**: AdamW's usual decoupled weight decay, 0.01, on every weight matrix;
* **decayed**: the same, except the middle layer ``net.2`` gets weight decay 10 (a per-parameter group). AdamW
  multiplies the weights by ``1 - lr * weight_decay`` = 0.97 at every step, on purpose far beyond any sensible
  setting.

Then ``lightning_htsr.analyze`` runs on both models. In both runs about a quarter of ``net.2``'s hidden units
never fire on any training input (dead ReLUs). A unit that never fires gets no gradient, so only weight decay acts
on its row of weights: at 0.01 the row keeps its random initial values and stays part of the bulk, at 10 it shrinks
to exactly zero. Those zero rows become a cluster of zero eigenvalues of ``W^T W``, many decades below the rest of
the spectrum: the classifier's ``rank_collapse`` rule (>= 10 % of the eigenvalues in a cluster >= 3 decades below
the rest, ``PhaseConfig.zero_fraction`` / ``zero_gap_decades``). The other layers, and every layer of the normal
run, are not collapsed.

    python examples/rank_collapse.py            # about 10 s on 2 CPU cores
    python examples/rank_collapse.py --quick    # under 10 s (weight decay 30, 10 epochs)

What does not count as rank collapse: decay that shrinks directions gradually instead of zeroing whole rows. SGD
with strong L2 also pushes many directions 10 decades or more below the top, but the spectrum then runs continuously
down to the float64 resolution floor without a gap, and the classifier calls the layer heavy-tailed (alpha < 2,
warning ``very heavy-tailed``). Try
``--optimizer sgd --decay 0.1 --epochs 40`` (SGD, lr 0.05, momentum 0.9, L2 added to the gradient) to see it:
``matrix_rank`` is far below full, yet ``frac_zero`` is 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_htsr as htsr  # noqa: E402
from lightning_htsr.functional import eigenvalues, resolution_floor  # noqa: E402

DECAYED = "net.2"  # the layer that gets the strong weight decay

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the examples share the quickstart's data loader
from quickstart import load_digits_tensors  # noqa: E402


class MLP(pl.LightningModule):
    """64 -> hidden -> hidden -> 10 with ReLU; ``decay`` on ``net.2.weight``, ``base_decay`` on the other weights.

    Biases are never decayed (as usual).
    """

    def __init__(self, hidden: int = 256, lr: float = 3e-3, decay: float = 0.01, base_decay: float = 0.01,
                 optimizer: str = "adamw") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        hp = self.hparams
        decayed = [p for n, p in self.named_parameters() if n == f"{DECAYED}.weight"]
        others = [p for n, p in self.named_parameters() if n.endswith("weight") and n != f"{DECAYED}.weight"]
        biases = [p for n, p in self.named_parameters() if n.endswith("bias")]
        groups = [{"params": decayed, "weight_decay": hp.decay}, {"params": others, "weight_decay": hp.base_decay},
                  {"params": biases, "weight_decay": 0.0}]
        if hp.optimizer == "sgd":  # L2 added to the gradient (coupled), with momentum
            return torch.optim.SGD(groups, lr=hp.lr, momentum=0.9)
        return torch.optim.AdamW(groups, lr=hp.lr)  # decoupled: w <- w * (1 - lr * weight_decay) each step


def train(decay: float, args: argparse.Namespace, data) -> tuple[MLP, float]:
    (x_train, y_train), (x_val, y_val) = data
    pl.seed_everything(args.seed, verbose=False)
    model = MLP(lr=args.lr, decay=decay, base_decay=args.base_decay, optimizer=args.optimizer)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=32, shuffle=True)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, loader)
    with torch.no_grad():
        acc = float((model(x_val).argmax(-1) == y_val).float().mean())
    return model, acc


def dead_units(model: MLP, x: torch.Tensor) -> int:
    """Units of ``net.2`` that never fire (pre-activation <= 0) on any of the inputs ``x``."""
    with torch.no_grad():
        pre = model.net[2](model.net[1](model.net[0](x)))
    return int((pre <= 0).all(dim=0).sum())


def gap_summary(weight: torch.Tensor) -> str:
    """Where the spectrum of ``W^T W / N`` sits, in decades below lambda_max, and its largest gap.

    Computed in float64; eigenvalues below the float64 resolution floor are shown at the floor (as the phase
    classifier treats them)."""
    ev = eigenvalues(weight, precision="float64").numpy()
    lam_max = float(ev[-1])
    floor = resolution_floor(lam_max, ev.size, torch.float64, "gram")
    logs = [math.log10(max(v, floor) / lam_max) for v in ev]
    jumps = [b - a for a, b in zip(logs, logs[1:])]
    at = max(range(len(jumps)), key=jumps.__getitem__)
    below = at + 1
    return (f"{below} of {ev.size} eigenvalues at <= 10^{logs[at]:.1f} lambda_max (floor: "
            f"10^{math.log10(floor / lam_max):.1f}), then a gap of {jumps[at]:.1f} decades; the other "
            f"{ev.size - below} span 10^{logs[below]:.1f} .. 1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Rank collapse from strong weight decay on one layer.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--decay", type=float, default=10.0, help=f"weight decay of {DECAYED} in the decayed run")
    p.add_argument("--base-decay", type=float, default=0.01, help="weight decay of the other weights (both runs)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--lr", type=float, default=None, help="default: 3e-3 (adamw), 0.05 (sgd)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="decay 30 for 10 epochs (a few seconds)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.decay, args.epochs = 30.0, 10
    if args.lr is None:
        args.lr = 0.05 if args.optimizer == "sgd" else 3e-3
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|litlogger|litmodels).*")
    data = load_digits_tensors(args.seed)
    x_train = data[0][0]
    print(f"MLP 64-256-256-10 on sklearn digits, {args.optimizer} lr {args.lr}, {args.epochs} epochs, batch 32; "
          f"weight decay {args.base_decay} on every weight matrix")
    runs = {"normal": args.base_decay, "decayed": args.decay}
    out: dict = {}
    for run, decay in runs.items():
        model, acc = train(decay, args, data)
        frame = htsr.analyze(model)
        out[run] = {"frame": frame, "val_acc": acc, "dead_units": dead_units(model, x_train),
                    "gap": gap_summary(model.net[2].weight)}
        print()
        print(f"== {run} run: weight decay {decay:g} on {DECAYED} -- validation accuracy {acc:.1%}")
        print(f"{'layer':<6} {'shape':>8} {'phase':<17} {'frac_zero':>9} {'matrix_rank':>11} {'alpha':>6}  warning")
        for r in frame.itertuples():
            phase = r.phase if isinstance(r.phase, str) and r.phase else "(too small)"
            alpha = f"{r.alpha:.2f}" if r.alpha == r.alpha else "-"
            print(f"{r.name:<6} {f'{r.N}x{r.M}':>8} {phase:<17} {r.frac_zero:>9.2f} {f'{r.matrix_rank}/{r.M}':>11} "
                  f"{alpha:>6}  {r.warning or ''}")
        print(f"{DECAYED} spectrum: {out[run]['gap']}")
        print(f"{DECAYED} units that never fire on the training set: {out[run]['dead_units']} of "
              f"{model.net[2].out_features}")
        print(f"{DECAYED} phase reason: {frame.set_index('name').loc[DECAYED, 'phase_reason']}")

    decayed = out["decayed"]["frame"].set_index("name")
    normal = out["normal"]["frame"].set_index("name")
    others = [n for n in decayed.index if n != DECAYED]
    ok = (decayed.loc[DECAYED, "phase"] == "rank_collapse"
          and all(decayed.loc[n, "phase"] != "rank_collapse" for n in others)
          and not (normal["phase"] == "rank_collapse").any())
    print()
    if ok:
        print(f"=> {DECAYED} is rank_collapse only under strong weight decay (frac_zero "
              f"{decayed.loc[DECAYED, 'frac_zero']:.2f} >= {htsr.PhaseConfig().zero_fraction}); no other layer is.")
    else:
        print(f"=> no clean rank collapse with these settings: {DECAYED} is {decayed.loc[DECAYED, 'phase']} "
              f"(frac_zero {decayed.loc[DECAYED, 'frac_zero']:.2f}).")
    out["rank_collapse_only_in_decayed_layer"] = ok
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
