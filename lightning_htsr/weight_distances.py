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

__all__ = ["CHUNK_ELEMENTS", "DISTANCE_COLUMNS", "distance_rows", "distances", "matrix_distances"]

#: Columns of the :func:`distances` table.
DISTANCE_COLUMNS: tuple[str, ...] = (
    "name", "layer_type", "N", "M", "num_slices", "status", "reason", "frobenius", "relative", "cosine", "cka",
    "norm_a", "norm_b",
)  # fmt: skip

#: Every matrix counts: no size limit (a single-column slice still has no ``N x M`` shape to speak of).
_OPTIONS = AnalysisOptions(min_evals=0)


#: Elements of each side converted to float64 at a time (8 MiB): the extra memory of one matrix's distances.
CHUNK_ELEMENTS = 2**20


def _sums(x: Tensor, y: Tensor, rows: int, cka: bool) -> tuple[Tensor, Tensor | None]:
    """``[||x||^2, ||y||^2, ||x - y||^2, <x, y>]`` in float64, and the Gram products ``[x^T y, x^T x, y^T y]`` per
    slice (``None`` without ``cka``), accumulated over chunks of ``rows`` rows."""
    sums = torch.zeros(4, dtype=torch.float64, device=x.device)
    grams = None
    gram_dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    for start in range(0, x.shape[1], rows):
        xs, ys = x[:, start:start + rows].to(torch.float64), y[:, start:start + rows].to(torch.float64)
        sums += torch.stack([xs.square().sum(), ys.square().sum(), (xs - ys).square().sum(), (xs * ys).sum()])
        if cka:
            xg, yg = xs.to(gram_dtype), ys.to(gram_dtype)
            part = torch.stack([xg.mT @ yg, xg.mT @ xg, yg.mT @ yg]).to(torch.float64)
            grams = part if grams is None else grams + part
    return sums, grams


def matrix_distances(a: Tensor, b: Tensor, *, cka: bool = True) -> dict[str, float]:
    """The distances of two equally shaped stacks ``(num_slices, N, M)`` (or matrices).

    Norms and inner products are accumulated in float64 over chunks of :data:`CHUNK_ELEMENTS`, so the extra memory
    is bounded whatever the matrix; ``cka``'s ``M x M`` Gram products (``3 N M^2`` flops per slice, the cost of the
    whole call for large matrices) are computed in float32 (float64 weights: float64).

    Args:
        a: Side A.
        b: Side B (``relative`` divides by its norm).
        cka: Compute ``cka`` (NaN otherwise).

    Example:
        >>> import torch
        >>> w = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
        >>> d = matrix_distances(w, 2 * w)
        >>> round(d["relative"], 12), round(d["cosine"], 12), round(d["cka"], 6)
        (0.5, 1.0, 1.0)
    """
    x, y = a.detach(), b.detach().to(a.device)
    if x.dim() == 2:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    rows = max(1, CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[2]))
    sums, grams = _sums(x, y, rows, cka)
    sq_a, sq_b, sq_d, dot = sums.tolist()
    norm_a, norm_b, frobenius = math.sqrt(sq_a), math.sqrt(sq_b), math.sqrt(sq_d)
    both = norm_a * norm_b
    similarity = math.nan
    if grams is not None:
        cross, own_a, own_b = torch.linalg.matrix_norm(grams)  # each (num_slices,)
        scale = torch.sqrt(own_a * own_b)
        similarity = float((cross / scale).mean()) if bool((scale > 0).all()) else math.nan
    return {
        "frobenius": frobenius,
        "relative": frobenius / norm_b if norm_b > 0 else math.nan,
        "cosine": max(-1.0, min(1.0, dot / both)) if both > 0 else math.nan,
        "cka": similarity,
        "norm_a": norm_a,
        "norm_b": norm_b,
    }


def _row(pair: MatrixPair, device: torch.device | str | None, cka: bool) -> dict[str, Any]:
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
        row.update(matrix_distances(x, pair.b.slices, cka=cka))
    return row


def distance_rows(a: Source, b: Source, *, include: Sequence[str] | str | None = None,
                  exclude: Sequence[str] | str | None = None, trust_pickle: bool = False,
                  device: torch.device | str | None = None, cka: bool = True) -> Iterator[dict[str, Any]]:
    """:func:`distances`' rows one at a time (A's matrices in order, then B's that A lacks)."""
    side = open_source(a, _OPTIONS, trust_pickle=trust_pickle, include=include, exclude=exclude)
    other = open_source(b, _OPTIONS, trust_pickle=trust_pickle, include=include, exclude=exclude)
    with torch.no_grad():
        for pair in pair_matrices(side, other, only_b=True):
            yield _row(pair, device, cka)
            if pair.a is not None:
                pair.a.slices = None  # let the tensor go before the next is read


def distances(a: Source, b: Source, *, include: Sequence[str] | str | None = None,
              exclude: Sequence[str] | str | None = None, trust_pickle: bool = False,
              device: torch.device | str | None = None, cka: bool = True) -> pd.DataFrame:
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
        cka: Compute ``cka`` (its Gram products cost ``3 N M^2`` flops per matrix slice: most of the time on large
            models; ``False`` leaves it NaN).

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
    rows = list(distance_rows(a, b, include=include, exclude=exclude, trust_pickle=trust_pickle, device=device,
                              cka=cka))
    return pd.DataFrame(rows, columns=list(DISTANCE_COLUMNS))
