"""The training tasks of ``bench_stopping.py``: data that ships in a package or is generated, models of every kind.

Each :class:`Task` builds seeded train / validation / test tensors and a fresh model with its optimizer and
learning-rate schedule. The test split is only ever used to *report* accuracy; the HT-SR stop rule reads the weights
only, and Lightning's ``EarlyStopping`` (the peer) reads the validation loss.

| task | data | model | optimizer, learning rate |
|---|---|---|---|
| ``mlp_digits`` | scikit-learn digits (8x8) | MLP 64-512-512-10 | SGD + momentum, constant, batch 16 (the quickstart) |
| ``mlp_teacher`` | teacher-student, Gaussian inputs | MLP 16-256-256-10 | SGD + momentum, exponential decay |
| ``mlp_mnist1d`` | ``mnist1d.make_dataset`` | MLP 40-512-256-10 | Adam, step decay |
| ``cnn1d_mnist1d`` | ``mnist1d.make_dataset`` | 1-D CNN (3 conv, 2 fc) | Adam, constant |
| ``cnn2d_digits`` | scikit-learn digits as 1x8x8 images | 2-D CNN (2 conv, 2 fc) | SGD + momentum, cosine decay |
| ``transformer_seq`` | synthetic token sequences (majority token) | 2-layer transformer | AdamW, warmup + cosine |
| ``gru_seq`` | synthetic token sequences ((first + last) mod 10) | embedding + GRU + MLP head | Adam, constant |

Tasks that **over-fit** (held-out accuracy peaks, then falls by several points within the budget): the case early
stopping exists for.

| task | data | model | optimizer, learning rate |
|---|---|---|---|
| ``mlp_digits_noisy`` | digits, 40 % of the training and validation labels replaced at random | MLP 64-512-512-10 | Adam, constant |
| ``gru_noisy`` | (first + last) mod 10, 30 % label noise | embedding + GRU + MLP head | Adam, constant |
| ``mlp_tabular_small`` | ``make_classification`` (10 classes, 20 % of labels flipped), 300 training rows | MLP 40-512-512-10 | Adam, constant |
| ``gru_lm`` | next token of a random order-2 Markov text, 200 training windows | embedding + GRU LM | Adam, constant |

The test split always has clean labels; the validation split is drawn like the training split (noisy where the
training labels are), as a user's would be.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

Split = tuple[torch.Tensor, torch.Tensor]
Data = tuple[Split, Split, Split]  # train, validation, test


@dataclass(frozen=True)
class Task:
    """One benchmark task.

    Attributes:
        name: Short identifier.
        description: One line for the tables.
        data: ``seed -> (train, val, test)``, each ``(x, y)``.
        model: ``seed -> nn.Module`` (seeded init).
        optimizer: ``(params, epochs) -> (optimizer, scheduler or None)``; schedulers step once per epoch.
        epochs: Full budget (accuracy plateaus well before it).
        batch_size: Training batch size.
    """

    name: str
    description: str
    data: Callable[[int], Data]
    model: Callable[[int], nn.Module]
    optimizer: Callable[[object, int], tuple[torch.optim.Optimizer, object]]
    epochs: int
    batch_size: int = 64


def _split(x: torch.Tensor, y: torch.Tensor, n_val: int, n_test: int, seed: int) -> Data:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, test, train = perm[:n_val], perm[n_val:n_val + n_test], perm[n_val + n_test:]
    return (x[train], y[train]), (x[val], y[val]), (x[test], y[test])


# ---------------------------------------------------------------------------------------------------- data


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def digits_flat(seed: int) -> Data:
    """1797 digits: 300 validation, 497 test, 1000 train."""
    x, y = _digits()
    return _split(x, y, 300, 497, seed)


def digits_images(seed: int) -> Data:
    (xt, yt), (xv, yv), (xs, ys) = digits_flat(seed)
    return (xt.view(-1, 1, 8, 8), yt), (xv.view(-1, 1, 8, 8), yv), (xs.view(-1, 1, 8, 8), ys)


@lru_cache(maxsize=8)
def mnist1d(seed: int) -> Data:
    """``mnist1d`` (the package's generator, seeded): 8000 signals of length 40 -> 4400 train, 1200 val, 2400 test."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = 8000, seed
    d = make_dataset(args)
    x = torch.cat([torch.tensor(d["x"]), torch.tensor(d["x_test"])]).float()
    y = torch.cat([torch.tensor(d["y"]), torch.tensor(d["y_test"])]).long()
    return _split(x, y, 1200, 2400, seed)


def mnist1d_channels(seed: int) -> Data:
    return tuple((x.unsqueeze(1), y) for x, y in mnist1d(seed))  # type: ignore[return-value]


def teacher_student(seed: int, n: int = 16000, dim: int = 16, classes: int = 10) -> Data:
    """Gaussian inputs labelled by a random two-layer tanh teacher (argmax of its 10 outputs)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 32, generator=g) / math.sqrt(dim)
    w2 = torch.randn(32, classes, generator=g) / math.sqrt(32)
    y = (torch.tanh(x @ w1) @ w2).argmax(-1)
    return _split(x, y, 2000, 3000, seed)


def majority_tokens(seed: int, n: int = 5000, length: int = 16, vocab: int = 16) -> Data:
    """Uniform token sequences; the label is the most frequent of tokens 0-9 (ties: the smallest)."""
    g = torch.Generator().manual_seed(20_000 + seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    counts = torch.stack([(x == t).sum(-1) for t in range(10)], -1).float()
    y = (counts - torch.arange(10) * 1e-3).argmax(-1)
    return _split(x, y, 1000, 2000, seed)


def first_plus_last(seed: int, n: int = 8000, length: int = 12, vocab: int = 10) -> Data:
    """Uniform token sequences; the label is (first token + last token) mod 10 (the first must be remembered)."""
    g = torch.Generator().manual_seed(30_000 + seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    y = (x[:, 0] + x[:, -1]) % 10
    return _split(x, y, 1000, 2000, seed)


def noisy_labels(data: Data, fraction: float, seed: int, classes: int = 10) -> Data:
    """Replace ``fraction`` of the training and validation labels by uniformly random classes (test stays clean)."""
    g = torch.Generator().manual_seed(40_000 + seed)
    out = []
    for x, y in data[:2]:
        flip = torch.rand(len(y), generator=g) < fraction
        out.append((x, torch.where(flip, torch.randint(0, classes, y.shape, generator=g), y)))
    return out[0], out[1], data[2]


def digits_noisy(seed: int) -> Data:
    return noisy_labels(digits_flat(seed), 0.4, seed)


def first_plus_last_noisy(seed: int) -> Data:
    """The 5000 training sequences of :func:`first_plus_last`, 30 % of their labels random."""
    (xt, yt), val, test = first_plus_last(seed)
    return noisy_labels(((xt, yt), val, test), 0.3, seed)


def tabular_small(seed: int) -> Data:
    """scikit-learn's ``make_classification``: 40 features (10 informative), 10 classes, 20 % of the labels flipped
    (in every split: the test accuracy's ceiling is about 80 %); 300 training, 600 validation, 2000 test rows."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=2900, n_features=40, n_informative=10, n_redundant=10, n_classes=10,
                               n_clusters_per_class=1, class_sep=1.5, flip_y=0.2, random_state=50_000 + seed)
    x = (x - x.mean(0)) / x.std(0)
    return _split(torch.tensor(x, dtype=torch.float32), torch.tensor(y), 600, 2000, seed)


def markov_text(seed: int, vocab: int = 16, window: int = 24, n_train: int = 200, n_val: int = 200,
                n_test: int = 600) -> Data:
    """Next-token prediction on text from a random order-2 Markov chain (Dirichlet(0.3) rows: partly predictable).

    Windows of ``window + 1`` tokens cut from three independent stretches of text; ``x`` is a window's first
    ``window`` tokens, ``y`` the next token at every position. A small training corpus (200 windows, 4800 tokens) that
    a GRU can memorize.
    """
    import numpy as np

    rng = np.random.default_rng(60_000 + seed)
    cdf = rng.dirichlet(np.full(vocab, 0.3), size=(vocab, vocab)).cumsum(-1)

    def text(n_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = n_windows * (window + 1)
        tokens = np.empty(length + 2, dtype=np.int64)
        tokens[:2] = rng.integers(0, vocab, 2)
        for i, u in enumerate(rng.random(length)):
            tokens[i + 2] = min(int(np.searchsorted(cdf[tokens[i], tokens[i + 1]], u)), vocab - 1)
        w = torch.from_numpy(tokens[2:].reshape(n_windows, window + 1))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    return text(n_train), text(n_val), text(n_test)


# -------------------------------------------------------------------------------------------------- models


def mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CNN1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
            nn.Conv1d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 10, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class CNN2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class TransformerClassifier(nn.Module):
    def __init__(self, vocab: int = 16, length: int = 16, d_model: int = 96, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(length, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, 4, 192, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos).mean(1))


class GRUClassifier(nn.Module):
    def __init__(self, vocab: int = 10, hidden: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.gru = nn.GRU(32, hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(hidden, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embed(x))[0][:, -1])


class GRULanguageModel(nn.Module):
    """Next-token logits at every position, shaped ``(batch, vocab, length)`` (what ``cross_entropy`` takes)."""

    def __init__(self, vocab: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.gru = nn.GRU(64, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embed(x))[0]).transpose(1, 2)


def _seeded(build: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build()

    return model


# ---------------------------------------------------------------------------------------------- optimizers


def sgd_constant(lr: float) -> Callable:
    return lambda params, epochs: (torch.optim.SGD(params, lr=lr, momentum=0.9), None)


def sgd_exponential(lr: float, gamma: float) -> Callable:
    def make(params, epochs):
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma)

    return make


def sgd_cosine(lr: float) -> Callable:
    def make(params, epochs):
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)

    return make


def adam_constant(lr: float) -> Callable:
    return lambda params, epochs: (torch.optim.Adam(params, lr=lr), None)


def adam_step(lr: float, step: int, gamma: float = 0.3) -> Callable:
    def make(params, epochs):
        opt = torch.optim.Adam(params, lr=lr)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step, gamma)

    return make


def adamw_warmup_cosine(lr: float, warmup: int = 3) -> Callable:
    def make(params, epochs):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

        def factor(epoch: int) -> float:  # linear warmup, then cosine to 0 at the end of the budget
            if epoch < warmup:
                return (epoch + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    return make


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("mlp_digits", "MLP 64-512-512-10, digits, SGD constant lr, batch 16 (the quickstart)", digits_flat,
         _seeded(lambda: mlp([64, 512, 512, 10])), sgd_constant(0.05), epochs=30, batch_size=16),
    Task("mlp_teacher", "MLP 16-256-256-10, teacher-student, SGD exponential decay", teacher_student,
         _seeded(lambda: mlp([16, 256, 256, 10])), sgd_exponential(0.02, 0.93), epochs=50, batch_size=128),
    Task("mlp_mnist1d", "MLP 40-512-256-10, mnist1d, Adam step decay", mnist1d,
         _seeded(lambda: mlp([40, 512, 256, 10])), adam_step(1e-3, 15), epochs=45),
    Task("cnn1d_mnist1d", "1-D CNN, mnist1d, Adam constant lr", mnist1d_channels,
         _seeded(CNN1d), adam_constant(1e-3), epochs=40, batch_size=128),
    Task("cnn2d_digits", "2-D CNN, digits 8x8, SGD cosine decay", digits_images,
         _seeded(CNN2d), sgd_cosine(0.05), epochs=40),
    Task("transformer_seq", "2-layer transformer, majority token, AdamW warmup+cosine", majority_tokens,
         _seeded(TransformerClassifier), adamw_warmup_cosine(1e-3), epochs=30, batch_size=128),
    Task("gru_seq", "GRU, (first + last) mod 10, Adam constant lr", first_plus_last,
         _seeded(GRUClassifier), adam_constant(2e-3), epochs=40, batch_size=128),
    # over-fitting tasks
    Task("mlp_digits_noisy", "MLP 64-512-512-10, digits with 40 % label noise, Adam constant lr", digits_noisy,
         _seeded(lambda: mlp([64, 512, 512, 10])), adam_constant(1e-3), epochs=40, batch_size=32),
    Task("gru_noisy", "GRU, (first + last) mod 10, 30 % label noise, Adam", first_plus_last_noisy,
         _seeded(GRUClassifier), adam_constant(2e-3), epochs=40, batch_size=64),
    Task("mlp_tabular_small", "MLP 40-512-512-10, make_classification, 300 rows, 20 % flipped, Adam", tabular_small,
         _seeded(lambda: mlp([40, 512, 512, 10])), adam_constant(3e-4), epochs=40, batch_size=32),
    Task("gru_lm", "GRU language model, order-2 Markov text, 200 windows, Adam constant lr", markov_text,
         _seeded(GRULanguageModel), adam_constant(3e-3), epochs=40, batch_size=16),
]}  # fmt: skip

#: The tasks whose held-out accuracy peaks and then falls within the budget (the rest plateau: round 2's seven).
OVERFITTING: tuple[str, ...] = ("mlp_digits_noisy", "gru_noisy", "mlp_tabular_small", "gru_lm")
