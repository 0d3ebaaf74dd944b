"""Shared fixtures: small Lightning models with controllable spectra, and a fresh process-wide state per test."""

from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import RandomDataset
from torch import nn
from torch.utils.data import DataLoader

from lightning_htsr.spectra.synthetic import pareto

# One intra-op thread: the suite is sized for 2 shared CPU cores, where two OpenMP threads contending with any
# other process make LAPACK calls 10-70x slower (LIGHTNING_DOSSIER section 7). Subprocess runs inherit the env var.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*litlogger.*")
warnings.filterwarnings("ignore", message=".*litmodels.*")


class TinyNet(pl.LightningModule):
    """32 -> 256 -> 256 -> 128 -> 2 MLP on random data, 8 batches per epoch.

    Args:
        lr: SGD learning rate (0 freezes the weights, so the spectra never change).
        heavy: Replace the hidden matrices by Pareto(mu=1.2) weights: a heavy-tailed model.
    """

    def __init__(self, lr: float = 0.0, heavy: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.lr = lr
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128),
                                 nn.ReLU(), nn.Linear(128, 2))
        if heavy:
            with torch.no_grad():
                self.net[2].weight.copy_(pareto(256, 256, 1.2, seed=seed + 1))
                self.net[4].weight.copy_(pareto(256, 128, 1.2, seed=seed + 2).T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self(batch).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self(batch).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 64), batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 16), batch_size=8)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def trainer_kwargs(tmp_path, **overrides):
    """Quiet, fast Trainer settings for tests."""
    kwargs = dict(default_root_dir=str(tmp_path), max_epochs=4, accelerator="cpu", devices=1,
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  limit_val_batches=0, log_every_n_steps=1)
    kwargs.update(overrides)
    return kwargs


class ShiftNet(pl.LightningModule):
    """One Linear(128 -> 256) layer regressed onto a low-rank map, then (from epoch ``switch``) onto a full-rank random
    map, with Adam: the spectrum concentrates (entropy falls) while the low-rank map is learned, then spreads again
    (entropy rises) as the layer fits the new, structureless target. A real, moving-weights stand-in for a network
    that learns its signal and then memorizes noise; ``switch=None`` keeps learning the low-rank map.

    Args:
        switch: Epoch from which the target is the full-rank map (``None``: never).
        lr: Adam learning rate.
    """

    def __init__(self, switch: int | None = 5, lr: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.Linear(128, 256, bias=False)
        g = torch.Generator().manual_seed(seed + 1)
        self.register_buffer("low_rank", torch.randn(256, 3, generator=g) @ torch.randn(3, 128, generator=g) * 0.27)
        self.register_buffer("full_rank", torch.randn(256, 128, generator=g) * 0.18)
        self.register_buffer("inputs", torch.randn(512, 128, generator=g))
        self.switch, self.lr = switch, lr

    def target(self) -> torch.Tensor:
        return self.full_rank if self.switch is not None and self.current_epoch >= self.switch else self.low_rank

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return nn.functional.mse_loss(self.layer(x), x @ self.target().T)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.utils.data.TensorDataset(self.inputs), batch_size=64)

    def distance_to(self, target: torch.Tensor) -> float:
        """Relative Frobenius distance of the layer's weight to a map."""
        return float((self.layer.weight.detach() - target).norm() / target.norm())
