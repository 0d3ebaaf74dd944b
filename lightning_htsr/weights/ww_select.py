"""Which layers weightwatcher 0.7.7 analyzes, for ``analyze(model, ww_compat=True)``.

weightwatcher decides per ``nn.Module`` (``WWLayerIterator.layer_supported`` with its defaults ``pool=True``,
``min_evals=8``, ``max_evals=15000``, ``max_N=50000``) from its own ``N``, ``M`` and receptive field ``rf``:

* the type comes from the class (``PyTorchLayer.layer_type``): ``Linear`` or ``'linear'`` in the lower-cased type
  string is dense, then ``Conv1d``/``'conv1d'``, ``Conv2d``/``'conv2d'``, ``Embedding``/``'embedding'``; anything
  else (attention ``in_proj``, RNNs, ``Conv3d``, transposed convolutions) is not analyzed;
* dense, conv1d and embedding weights: ``N = max(shape)``, ``M = min(shape)``, ``rf = 1``;
* ``Conv2d`` weights ``(out, in, kh, kw)`` (``WWLayer.conv2D_Wmats``): ``rf = kh * kw``; if ``out + in >= kh + kw``
  the slices are ``W[:, :, i, j]`` and ``N, M`` start as ``out, in`` and are *swapped once per slice* whose rows are
  fewer than its columns (so with ``out < in`` they end as ``in, out`` only when ``rf`` is odd); otherwise
  (``out + in < kh + kw``, "channels first" detected) the slices are still ``W[:, :, i, j]`` but ``N, M = out, in``;
* a layer is skipped when ``M * rf < min_evals``, ``M * rf > max_evals`` or ``N > max_N``.

So ``M * rf`` is not always the number of eigenvalues: ``Conv2d(1, 128, (512, 1))`` has 512 single-column slices
(512 eigenvalues, ``M * rf = 512``: analyzed), ``Conv2d(256, 512, (64, 1))`` has ``M * rf = 256 * 64 = 16384 >
15000`` (skipped). Here the spectrum of a selected layer is computed as usual (pooled ``out x in`` slices, which is
what weightwatcher does for dense and ``Conv2d`` layers); single-column ``Conv2d`` slices, which this package skips
by default, are analyzed when weightwatcher analyzes them.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import replace

from torch import Tensor, nn

from .matrix import SkipKind, WeightMatrix, conv_slices, tall
from .modules import clean_name

__all__ = ["LayerFilter", "select_layers", "ww_layer_ids", "ww_layer_shape", "ww_select", "ww_skip_reason"]

#: weightwatcher's ``layers=`` filter: integer layer ids and/or matrix names (one, or a list).
LayerFilter = int | str | Sequence[int | str]

#: weightwatcher 0.7.7's ``DEFAULT_MAX_EVALS``.
WW_MAX_EVALS = 15000
#: weightwatcher 0.7.7's ``DEFAULT_MAX_N``.
WW_MAX_N = 50000


def ww_type(module: nn.Module) -> str | None:
    """weightwatcher's layer type of a module (``"dense"``, ``"conv1d"``, ``"conv2d"``, ``"embedding"``) or ``None``."""
    typestr = str(type(module)).lower()
    if isinstance(module, nn.Linear) or "linear" in typestr:
        return "dense"
    if isinstance(module, nn.Conv1d) or "conv1d" in typestr:
        return "conv1d"
    if isinstance(module, nn.Conv2d) or "conv2d" in typestr:
        return "conv2d"
    if isinstance(module, nn.Embedding) or "embedding" in typestr:
        return "embedding"
    return None


def ww_layer_shape(kind: str, shape: Sequence[int]) -> tuple[int, int, int]:
    """weightwatcher's ``(N, M, rf)`` for a weight of this shape and type.

    Example:
        >>> ww_layer_shape("conv2d", (128, 1, 512, 1)), ww_layer_shape("conv2d", (128, 256, 2, 2))
        ((128, 1, 512), (128, 256, 4))
    """
    if kind != "conv2d" or len(shape) != 4:
        return max(shape), min(shape), 1
    out, inp, kh, kw = shape
    rf = kh * kw
    if out + inp < kh + kw:
        return out, inp, rf
    n, m = out, inp
    if out < inp and rf % 2 == 1:  # one swap per slice
        n, m = m, n
    return n, m, rf


def ww_skip_reason(n: int, m: int, rf: int, *, min_evals: int = 8, max_evals: int = WW_MAX_EVALS,
                   max_n: int = WW_MAX_N) -> str | None:
    """Why weightwatcher (``pool=True``) skips a supported layer with this ``(N, M, rf)``, or ``None``.

    Example:
        >>> ww_skip_reason(512, 256, 64)
        'weightwatcher: M * rf = 16384 > max_evals=15000'
    """
    if min_evals and m * rf < min_evals:
        return f"weightwatcher: M * rf = {m * rf} < min_evals={min_evals}"
    if max_evals and m * rf > max_evals:
        return f"weightwatcher: M * rf = {m * rf} > max_evals={max_evals}"
    if n > max_n:
        return f"weightwatcher: N = {n} > max_N={max_n}"
    return None


def ww_select(model: nn.Module, matrices: Sequence[WeightMatrix], *, min_evals: int = 8,
              max_evals: int | None = None, max_n: int | None = None) -> list[WeightMatrix]:
    """weightwatcher's layer selection applied to already extracted matrices.

    Matrices weightwatcher skips get a ``skip_reason`` (and no slices); single-column ``Conv2d`` matrices it
    analyzes get their slices back.

    Args:
        model: The module the matrices were extracted from (with ``min_evals=0`` and no ``max_evals``).
        matrices: Output of :func:`~lightning_htsr.weights.modules.weight_matrices`.
        min_evals: weightwatcher's ``min_evals``.
        max_evals: weightwatcher's ``max_evals`` (``None``: its default 15000).
        max_n: weightwatcher's ``max_N`` (``None``: its default 50000).

    Returns:
        The matrices, in order, with weightwatcher's decisions.
    """
    modules = {clean_name(name): module for name, module in model.named_modules()}
    modules.setdefault("weight", model)  # a bare layer's matrix is named after its parameter
    out = []
    for matrix in matrices:
        module = modules.get(matrix.source)
        weight = getattr(module, "weight", None) if module is not None else None
        kind = ww_type(module) if module is not None else None
        if matrix.skip_reason is not None and matrix.skip_kind is not SkipKind.SINGLE_COLUMN:
            out.append(matrix)  # bad weights stay as they are
            continue
        if kind is None or not isinstance(weight, Tensor) or matrix.name != matrix.source:
            what = f"{matrix.module_type} weights" + ("" if matrix.name == matrix.source else f" ({matrix.source})")
            out.append(replace(matrix, slices=None, skip_reason=f"weightwatcher 0.7.7 does not analyze {what}",
                               skip_kind=SkipKind.NOT_SELECTED))
            continue
        reason = ww_skip_reason(*ww_layer_shape(kind, tuple(weight.shape)), min_evals=min_evals,
                                max_evals=max_evals or WW_MAX_EVALS, max_n=max_n or WW_MAX_N)
        if reason is not None:
            out.append(replace(matrix, slices=None, skip_reason=reason, skip_kind=SkipKind.NOT_SELECTED))
        elif matrix.skip_reason is not None and kind == "conv2d" and weight.dim() == 4:
            stack = tall(conv_slices(weight.detach(), 1))
            out.append(replace(matrix, slices=stack, N=stack.shape[1], M=stack.shape[2],
                               num_slices=stack.shape[0], skip_reason=None, skip_kind=None))
        else:
            out.append(matrix)
    return out


def ww_layer_ids(model: nn.Module) -> dict[str, int]:
    """weightwatcher's ``layer_id`` of every module: its position in ``model.named_modules()``, the root 0
    (``PyTorchLayer.get_layer_iterator`` with ``start_id=0``), keyed by the module name matrices carry as
    ``source`` (the root under ``"weight"``, as a bare layer's matrix is named).

    Example:
        >>> ids = ww_layer_ids(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2))))
        >>> ids["0"], ids["2"], ids["2.0"]
        (1, 3, 4)
    """
    ids = {clean_name(name): i for i, (name, _) in enumerate(model.named_modules())}
    ids.setdefault("weight", 0)
    return ids


def _split_filter(layers: LayerFilter) -> tuple[list[int], list[str]]:
    items = [layers] if isinstance(layers, (int, str)) else list(layers)
    ids = [int(x) for x in items if isinstance(x, numbers.Integral) and not isinstance(x, bool)]
    names = [x for x in items if isinstance(x, str)]
    other = [x for x in items if x not in ids and x not in names]
    if other:
        raise TypeError(f"layers= takes integer layer ids and names, got {other!r}")
    if names and any(n.startswith("-") for n in names) and not all(n.startswith("-") for n in names):
        raise ValueError("layers=: names either all keep or all leave out ('-name'), as in weightwatcher")
    return ids, names


def select_layers(model: nn.Module, matrices: Sequence[WeightMatrix], layers: LayerFilter) -> list[WeightMatrix]:
    """The matrices weightwatcher's ``layers=`` filter keeps, in order (the others are left out, as
    ``include``/``exclude`` leave them out).

    As ``WWLayerIterator.apply_filters``: with only non-negative ids, the modules with those ids
    (:func:`ww_layer_ids`) are kept; with any negative id, the modules whose id is ``-id`` are left out. Names are
    matrix names (this package's, e.g. ``"features.0"``): kept, or left out when written ``"-name"``. Ids and
    names together: a matrix must pass both.

    Args:
        model: The module the matrices come from.
        matrices: Its matrices.
        layers: One id or name, or a list of them.

    Returns:
        The kept matrices.

    Example:
        >>> from lightning_htsr.weights.modules import weight_matrices
        >>> m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> [x.name for x in select_layers(m, weight_matrices(m, min_evals=0), [-1])]
        ['2']
    """
    ids, names = _split_filter(layers)
    layer_id = ww_layer_ids(model)

    def keep(matrix: WeightMatrix) -> bool:
        if ids:
            i = layer_id.get(matrix.source)
            if min(ids) >= 0 and i not in ids:
                return False
            if min(ids) < 0 and i is not None and -i in ids:
                return False
        if names:
            if names[0].startswith("-"):
                return f"-{matrix.name}" not in names
            return matrix.name in names
        return True

    return [m for m in matrices if keep(m)]
