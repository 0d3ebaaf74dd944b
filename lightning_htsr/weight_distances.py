"""Per-matrix distances between two models: :func:`distances` and ``lightning-htsr distances A B``.

For each matrix of A (modules, state dicts or checkpoint paths, paired with B's by name and shape in
:mod:`~lightning_htsr.pairs`; A streamed, each B matrix read when its partner comes):

============== =========================================================================================
``frobenius``  ``||W_A - W_B||_F`` over the whole weight (every slice of a convolution)
``relative``   ``frobenius / ||W_B||_F``
``cosine``     ``<W_A, W_B> / (||W_A||_F ||W_B||_F)`` (1 for proportional weights)
``cka``        weightwatcher 0.7.7's uncentered ``cka``: ``||A^T B||_F / sqrt(||A^T A||_F ||B^T B||_F)`` on each
               ``N x M`` slice (``N >= M``), averaged over the slices (the square root of uncentered linear CKA)
============== =========================================================================================

``frobenius`` equals weightwatcher's ``distances(a, b, method="raw")`` ``delta_W`` for every layer. ``cka`` equals
its ``method="cka"`` for convolutions and for ``Linear`` layers with ``out_features >= in_features``; for a wider
``Linear`` weightwatcher contracts the longer side (it keeps the ``out x in`` layout) and the numbers differ.
Matrices that cannot be paired (a name on one side only, different shapes, unreadable weights) get a row whose
``status`` is ``"unmatched"`` or ``"skipped"`` and whose ``reason`` says why.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .analysis import AnalysisOptions
from .pairs import MatrixPair, Source, open_source, pair_matrices

__all__ = ["DISTANCE_COLUMNS", "distances", "matrix_distances"]

#: Columns of the :func:`distances` table.
DISTANCE_COLUMNS: tuple[str, ...] = (
    "name", "layer_type", "N", "M", "num_slices", "status", "reason", "frobenius", "relative", "cosine", "cka",
    "norm_a", "norm_b",
)  # fmt: skip

#: Every matrix counts: no size limit (a single-column slice still has no ``N x M`` shape to speak of).
_OPTIONS = AnalysisOptions(min_evals=0)


def matrix_distances(a: Tensor, b: Tensor) -> dict[str, float]:
    """The distances of two equally shaped stacks ``(num_slices, N, M)`` (or matrices), in float64.

    Example:
        >>> import torch
        >>> w = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
        >>> d = matrix_distances(w, 2 * w)
        >>> round(d["relative"], 12), round(d["cosine"], 12), round(d["cka"], 12)
        (0.5, 1.0, 1.0)
    """
    x, y = a.detach().to(torch.float64), b.detach().to(device=a.device, dtype=torch.float64)
    if x.dim() == 2:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    norm_a, norm_b = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y))
    frobenius = float(torch.linalg.vector_norm(x - y))
    both = norm_a * norm_b
    cross = torch.linalg.matrix_norm(x.transpose(1, 2) @ y)
    scale = torch.sqrt(torch.linalg.matrix_norm(x.transpose(1, 2) @ x) * torch.linalg.matrix_norm(
        y.transpose(1, 2) @ y))
    cka = cross / scale
    return {
        "frobenius": frobenius,
        "relative": frobenius / norm_b if norm_b > 0 else math.nan,
        "cosine": max(-1.0, min(1.0, float((x * y).sum()) / both)) if both > 0 else math.nan,
        "cka": float(cka.mean()) if bool((scale > 0).all()) else math.nan,
        "norm_a": norm_a,
        "norm_b": norm_b,
    }


def _row(pair: MatrixPair, device: torch.device | str | None) -> dict[str, Any]:
    shape = pair.a if pair.a is not None else pair.b
    assert shape is not None
    row: dict[str, Any] = {"name": pair.name, "layer_type": shape.layer_type, "N": shape.N, "M": shape.M,
                           "num_slices": shape.num_slices, "status": "success", "reason": ""}
    row.update(dict.fromkeys(DISTANCE_COLUMNS[7:], math.nan))
    if not pair.matched:
        row.update(status="unmatched", reason=str(pair.reason))
    elif pair.a is None or pair.a.slices is None or pair.b is None or pair.b.slices is None:
        row.update(status="skipped", reason=(pair.a.skip_reason if pair.a is not None else None) or "not readable")
    else:
        x = pair.a.slices if device is None else pair.a.slices.to(device)
        row.update(matrix_distances(x, pair.b.slices))
    return row


def distance_rows(a: Source, b: Source, *, include: Sequence[str] | str | None = None,
                  exclude: Sequence[str] | str | None = None, trust_pickle: bool = False,
                  device: torch.device | str | None = None) -> Iterator[dict[str, Any]]:
    """:func:`distances`' rows one at a time (A's matrices in order, then B's that A lacks)."""
    side = open_source(a, _OPTIONS, trust_pickle=trust_pickle, include=include, exclude=exclude)
    other = open_source(b, _OPTIONS, trust_pickle=trust_pickle, include=include, exclude=exclude)
    with torch.no_grad():
        for pair in pair_matrices(side, other, only_b=True):
            yield _row(pair, device)
            if pair.a is not None:
                pair.a.slices = None  # let the tensor go before the next is read


def distances(a: Source, b: Source, *, include: Sequence[str] | str | None = None,
              exclude: Sequence[str] | str | None = None, trust_pickle: bool = False,
              device: torch.device | str | None = None) -> pd.DataFrame:
    """Per-matrix distances between two models: one row per matrix (see the module docstring for the columns).

    Both sides are modules, state dicts or checkpoint paths (a file, several files, a Hugging Face model directory
    or an ``*.index.json``, read one tensor at a time); matrices are named and split as by
    :func:`~lightning_htsr.analyze`. A's matrices come first, in order, then B's matrices that A lacks.

    Args:
        a: Side A.
        b: Side B (``relative`` divides by its norm: pass the base or reference model here).
        include: Regex(es) a matrix name must match.
        exclude: Regex(es) of names to drop.
        trust_pickle: Allow ``torch.save`` files that pickle arbitrary Python objects.
        device: Compute there (``"cuda"``), one matrix at a time.

    Returns:
        A ``pandas.DataFrame`` with :data:`DISTANCE_COLUMNS`.

    Raises:
        CheckpointError: When a checkpoint cannot be read.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> sd = {k: 2 * v for k, v in m.state_dict().items()}
        >>> distances(sd, m)[["name", "relative", "cosine"]].round(6).values.tolist()
        [['0', 1.0, 1.0], ['2', 1.0, 1.0]]
    """
    rows = list(distance_rows(a, b, include=include, exclude=exclude, trust_pickle=trust_pickle, device=device))
    return pd.DataFrame(rows, columns=list(DISTANCE_COLUMNS))
