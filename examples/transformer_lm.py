"""A small causal transformer language model with ``HTSRCallback``: which matrices get analyzed, and their phases.

The tokens come from code, not a download: a random second-order Markov chain over a small vocabulary (each pair of
previous tokens makes a few next tokens likely), so the model has something to learn (it has to attend to the
token two positions back) and its loss has a known floor (the chain's conditional entropy).

The model is ``nn.TransformerEncoder`` (pre-norm, causal mask) between a token embedding and a linear head. The
callback analyzes every ``nn.MultiheadAttention`` as three matrices, ``<layer>.self_attn.in_proj.q``, ``.k`` and
``.v`` (split from the fused ``in_proj_weight``), plus ``out_proj``, the feed-forward ``linear1``/``linear2``, the
embedding and the head.

    python examples/transformer_lm.py                                  # 1 process, about a minute on 2 cores
    python examples/transformer_lm.py --devices 2 --strategy ddp       # 2 CPU processes (gloo); each rank
                                                                       # analyzes half of the matrices
    python examples/transformer_lm.py --quick                          # a few seconds (smoke test)

Lightning's ``ddp`` launcher re-executes this script once per extra process, so everything that runs lives under
``if __name__ == "__main__":``; the model and data are importable (``build_model``, ``make_dataloaders``; the
overhead benchmark ``benchmarks/bench_callback_overhead.py`` reuses them).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one BLAS thread per process: 2 ddp ranks on 2 cores

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

__all__ = ["MarkovChain", "TinyTransformerLM", "build_model", "make_dataloaders", "quiet_lightning"]


# ------------------------------------------------------------------------------------------------ the data


class MarkovChain:
    """A random second-order Markov chain: ``P(x_t | x_{t-2}, x_{t-1})`` is a sparse Dirichlet draw per context.

    Args:
        vocab_size: Number of tokens.
        concentration: Dirichlet concentration; small values put the mass on a few next tokens (low entropy).
        seed: Seed of the transition table (the same seed gives the same language on every rank).
    """

    def __init__(self, vocab_size: int = 32, concentration: float = 0.1, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        g = torch.Generator().manual_seed(seed)
        alpha = torch.full((vocab_size * vocab_size, vocab_size), concentration, dtype=torch.float64)
        gamma = torch._standard_gamma(alpha, generator=g)  # Dirichlet = normalized Gammas
        self.table = (gamma / gamma.sum(-1, keepdim=True)).float()  # row (a * V + b): P(next | a, b)

    def sample(self, num_sequences: int, length: int, seed: int) -> torch.Tensor:
        """``(num_sequences, length)`` int64 tokens; the first two of each sequence are uniform."""
        g = torch.Generator().manual_seed(seed)
        out = torch.empty(num_sequences, length, dtype=torch.long)
        out[:, :2] = torch.randint(self.vocab_size, (num_sequences, 2), generator=g)
        for t in range(2, length):
            probs = self.table[out[:, t - 2] * self.vocab_size + out[:, t - 1]]
            out[:, t] = torch.multinomial(probs, 1, generator=g).squeeze(1)
        return out

    def bigram_loss(self, sequences: torch.Tensor) -> float:
        """The loss of the best model that sees only the previous token (empirical, on ``sequences``): what a model
        that ignores everything but the last token can reach."""
        v = self.vocab_size
        counts = torch.zeros(v, v, dtype=torch.float64)
        counts.index_put_((sequences[:, 1:-1].reshape(-1), sequences[:, 2:].reshape(-1)),
                          torch.ones(sequences[:, 2:].numel(), dtype=torch.float64), accumulate=True)
        p = counts / counts.sum(1, keepdim=True).clamp_min(1)
        h = -(p * p.clamp_min(1e-300).log()).sum(1)
        cond = float((h * counts.sum(1)).sum() / counts.sum())
        return (cond * (sequences.shape[1] - 2) + math.log(v)) / (sequences.shape[1] - 1)

    def loss_floor(self, sequences: torch.Tensor) -> float:
        """The best achievable mean next-token loss (nats) on ``sequences`` (model input = all but the last token):
        the conditional entropy of each target given its context, ``log V`` for the second token (its context is
        one uniform token)."""
        rows = self.table[sequences[:, :-2] * self.vocab_size + sequences[:, 1:-1]]
        entropies = -(rows * rows.clamp_min(1e-30).log()).sum(-1)  # targets 2 .. L
        total = entropies.sum(-1) + math.log(self.vocab_size)  # + target 1
        return float((total / (sequences.shape[1] - 1)).mean())


def make_dataloaders(
    vocab_size: int = 32,
    seq_len: int = 64,
    num_train: int = 2048,
    num_val: int = 256,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader, MarkovChain]:
    """Train and validation loaders of ``(input, target)`` pairs (target = input shifted by one), and the chain.

    Deterministic: every call with the same arguments (on any rank) builds the same tokens.
    """
    chain = MarkovChain(vocab_size, seed=seed)
    train = chain.sample(num_train, seq_len + 1, seed=seed + 1)
    val = chain.sample(num_val, seq_len + 1, seed=seed + 2)
    train_dl = DataLoader(TensorDataset(train[:, :-1], train[:, 1:]), batch_size=batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(seed))
    val_dl = DataLoader(TensorDataset(val[:, :-1], val[:, 1:]), batch_size=batch_size)
    return train_dl, val_dl, chain


# ----------------------------------------------------------------------------------------------- the model


class TinyTransformerLM(pl.LightningModule):
    """Token embedding + learned positions -> causal ``nn.TransformerEncoder`` (pre-norm) -> linear head.

    Args:
        vocab_size: Number of tokens.
        d_model: Width; each attention ``in_proj`` splits into three ``d_model x d_model`` matrices.
        nhead: Attention heads.
        num_layers: Encoder layers.
        dim_feedforward: Hidden width of the feed-forward blocks (``linear1``: ``dim_feedforward x d_model``).
        max_len: Longest sequence.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, vocab_size: int = 32, d_model: int = 128, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 512, max_len: int = 256, lr: float = 3e-3, weight_decay: float = 0.01,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.zeros(max_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq_len = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(seq_len, device=tokens.device)
        h = self.embed(tokens) + self.pos[:seq_len]
        h = self.encoder(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def build_model(vocab_size: int = 32, d_model: int = 128, nhead: int = 4, num_layers: int = 2,
                dim_feedforward: int = 512, seed: int = 0, **kwargs) -> TinyTransformerLM:
    """The seeded model (same seed: same initial weights)."""
    torch.manual_seed(seed)
    return TinyTransformerLM(vocab_size, d_model, nhead, num_layers, dim_feedforward, **kwargs)


def quiet_lightning() -> None:
    """No Lightning banners, tips or benign warnings on the console."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*smaller than the logging interval.*", ".*LeafSpec.*",
                    ".*litlogger.*", ".*litmodels.*", ".*is_causal.*", ".*enable_nested_tensor.*"):
        warnings.filterwarnings("ignore", message=pattern)


# ------------------------------------------------------------------------------------------------- the run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Small causal transformer LM on a synthetic Markov chain, with "
                                "HTSRCallback.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--devices", type=int, default=1, help="CPU processes")
    p.add_argument("--strategy", default="auto", help="e.g. ddp (with --devices 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-train", type=int, default=2048, help="training sequences")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--logdir", default="htsr_runs", help="TensorBoard log directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run for tests")
    return p.parse_args(argv)


def print_report(records, seconds: float, val_loss: float, floor: float, bigram: float, vocab_size: int,
                 world_size: int, log_dir: str) -> None:
    print(f"Trained in {seconds:.1f} s on {world_size} process(es): validation loss {val_loss:.3f} nats/token "
          f"(uniform guess {math.log(vocab_size):.3f}, best previous-token-only model {bigram:.3f}, best possible "
          f"{floor:.3f}).")
    print()
    print(f"Analyzed {sum(r['status'] == 'success' for r in records)} of {len(records)} weight matrices "
          f"(rank = the process that computed it):")
    print(f"{'matrix':<38} {'type':<18} {'shape':>8} {'alpha':>6}  {'phase':<17} rank")
    for r in records:
        alpha = f"{r['alpha']:.2f}" if r["alpha"] == r["alpha"] else "-"
        phase = r["phase"] or ("(too small)" if r["status"] == "success" else r["status"])
        print(f"{r['name']:<38} {r['layer_type']:<18} {str(r['N']) + 'x' + str(r['M']):>8} {alpha:>6}  "
              f"{phase:<17} {r.get('rank', 0)}")
    print()
    print(f"tensorboard --logdir {log_dir}")


def main(argv=None) -> dict | None:
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_htsr import HTSRCallback

    args = parse_args(argv)
    torch.set_num_threads(1)
    quiet_lightning()
    num_train, epochs = args.num_train, args.epochs
    d_model, layers, seq_len = args.d_model, args.layers, args.seq_len
    if args.quick:
        num_train, epochs, d_model, layers, seq_len = 128, 2, 64, 1, 32
    train_dl, val_dl, chain = make_dataloaders(seq_len=seq_len, num_train=num_train, batch_size=args.batch_size,
                                               seed=args.seed)
    model = build_model(d_model=d_model, nhead=4, num_layers=layers, dim_feedforward=4 * d_model, seed=args.seed,
                        max_len=seq_len)
    callback = HTSRCallback()
    logger = TensorBoardLogger(args.logdir, name="transformer_lm")
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=args.devices, strategy=args.strategy,
                         logger=logger, callbacks=[callback], enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, log_every_n_steps=10)
    start = time.perf_counter()
    trainer.fit(model, train_dl, val_dl)
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return None
    val_loss = float(trainer.callback_metrics["val_loss"])
    x, y = val_dl.dataset.tensors
    sequences = torch.cat([x, y[:, -1:]], dim=1)
    floor, bigram = chain.loss_floor(sequences), chain.bigram_loss(sequences)
    print_report(callback.latest_records, seconds, val_loss, floor, bigram, chain.vocab_size, trainer.world_size,
                 args.logdir)
    return {"records": callback.latest_records, "val_loss": val_loss, "loss_floor": floor,
            "world_size": trainer.world_size, "log_dir": logger.log_dir, "history_path": callback.history_path}


if __name__ == "__main__":
    main()
