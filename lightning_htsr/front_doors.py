"""The offline front doors for a model in memory: :func:`analyze` (an ``nn.Module``) and :func:`analyze_state_dict`
(named tensors). They resolve the options, list the matrices (:mod:`~lightning_htsr.weights`) and run the engine
(:mod:`~lightning_htsr.analysis`); with a base model they analyze the deltas (:mod:`~lightning_htsr.deltas`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from torch import nn

from .analysis import AnalysisOptions, FitKind, analyze_stream, model_matrices, records_table, resolve_options
from .spectra.eigenvalues import Backend, Precision
from .spectra.phases import PhaseConfig
from .weights.adapters import LoraMode, check_lora_mode, state_dict_lora
from .weights.state_dict import iter_state_dict_matrices
from .weights.ww_select import LayerFilter, select_layers

__all__ = ["analyze", "analyze_state_dict"]


def analyze(
    model: nn.Module,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    layer_types: Sequence[str | type] | None = None,
    layers: LayerFilter | None = None,
    fit: FitKind = "fast",
    min_tail: int | None = None,
    precision: Precision = "auto",
    backend: Backend = "torch",
    min_evals: int | None = None,
    max_evals: int | None = None,
    ww_compat: bool = False,
    phase_config: PhaseConfig | None = None,
    options: AnalysisOptions | None = None,
    fix_fingers: str | None = None,
    randomize: bool = False,
    seed: int | None = None,
    xmax: int | float | None = None,  # noqa: PYI041 - an int and a float mean different things
    max_fingers: int | None = None,
    finger_thresh: float | None = None,
    max_N: int | None = None,
    lora: LoraMode = "merged",
    base_model: Any = None,
) -> pd.DataFrame:
    """Analyze every weight matrix of a model: one row per matrix with alpha, entropy, phase and the rest.

    Weights stay on their device (the eigenvalues are computed there, batched); nothing is modified. Bad weights
    (NaN/Inf, all-zero, rank-1, tiny, fp16/bf16, quantized, meta, sharded) never raise: the row says what happened.
    ``fit``, ``min_tail``, ``precision``, ``backend``, ``min_evals``, ``max_evals``, ``ww_compat``, ``phase_config``
    and ``options`` are the conventions of every front door (:func:`resolve_options` says what each does); under
    ``ww_compat`` the layers are also those weightwatcher 0.7.7 selects (:mod:`~lightning_htsr.weights.ww_select`).

    Args:
        model: Any ``nn.Module`` (a ``LightningModule`` too).
        include: Regex(es) a matrix name must match to be analyzed.
        exclude: Regex(es) of matrix names to leave out.
        layer_types: Restrict to these layer types (:data:`~lightning_htsr.weights.matrix.LAYER_TYPES`), class names or
            classes.
        layers: weightwatcher's ``layers=`` filter (:func:`~lightning_htsr.weights.ww_select.select_layers`): integer
            layer ids (a module's position in ``model.named_modules()``, root 0) to keep, or negative ids to leave
            out; matrix names to keep, or ``"-name"`` to leave out.
        fix_fingers: weightwatcher's ``"clip_xmax"`` or ``"xmin_peak"`` (:mod:`~lightning_htsr.spectra.fingers`).
        randomize: Add weightwatcher's correlation-trap columns (:mod:`~lightning_htsr.spectra.randomize`).
        seed: Seed of the ``randomize`` shuffles.
        xmax: Leave the ``|xmax|`` largest eigenvalues out of the fit (``int``) or cap the tail (``float``); see
            :class:`AnalysisOptions`.
        max_fingers: ``clip_xmax``'s finger limit (:class:`AnalysisOptions`).
        finger_thresh: ``clip_xmax``'s alpha drop (default 1.0).
        max_N: ``ww_compat`` only: skip layers with ``N`` above it (default 50000).
        lora: How a ``peft`` LoRA layer is analyzed: one matrix named by the base model's path (as after
            ``merge_and_unload()``), computed on ``"merged"`` (``W + scaling * B @ A`` of the active adapters,
            default), ``"delta"`` (``scaling * B @ A`` alone, rank ``r``: below ``min_evals`` it is not
            classified; only adapted matrices are listed) or ``"base"`` (the frozen ``W``). The module is not
            modified. See :mod:`~lightning_htsr.weights.adapters`.
        base_model: Analyze ``W - W_base`` instead, the base a module, a state dict or checkpoint path(s)
            (:mod:`~lightning_htsr.deltas`: matched by name and shape; unmatched, unchanged and low-rank deltas
            get a skipped row saying so). Not together with ``layers`` or a ``lora`` other than ``"merged"``
            (``ValueError``).

    Returns:
        A ``pandas.DataFrame`` with the columns of :data:`~lightning_htsr.records.COLUMNS`, one row per matrix
        (skipped ones included, with ``status``, ``skip_reason`` and ``skip_kind``), then any optional columns.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> df = analyze(nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)))
        >>> print(df[["name", "N", "M", "status", "phase"]].to_string(index=False))
        name   N   M  status       phase
           0 512 256 success random_like
           2 512  10 success         NaN
    """
    options = resolve_options(options, ww_compat=ww_compat, fit=fit, min_tail=min_tail, precision=precision,
                               backend=backend, min_evals=min_evals, max_evals=max_evals, phase_config=phase_config,
                               fix_fingers=fix_fingers, randomize=randomize, seed=seed, xmax=xmax,
                               max_fingers=max_fingers, finger_thresh=finger_thresh, max_N=max_N)
    if base_model is not None:
        _deltas_take(layers=layers is None, lora=lora == "merged")
        from .deltas import delta_records

        return records_table(delta_records(model, base_model, options, include=include, exclude=exclude,
                                           layer_types=layer_types, ww_compat=ww_compat))
    matrices = model_matrices(model, options, include=include, exclude=exclude, layer_types=layer_types,
                               ww_compat=ww_compat, lora=lora)
    if layers is not None:
        matrices = select_layers(model, matrices, layers)
    return records_table([r.record for r in analyze_stream(matrices, options)])


def analyze_state_dict(
    state_dict: dict[str, Any],
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    fit: FitKind = "fast",
    min_tail: int | None = None,
    precision: Precision = "auto",
    backend: Backend = "torch",
    min_evals: int | None = None,
    max_evals: int | None = None,
    ww_compat: bool = False,
    phase_config: PhaseConfig | None = None,
    options: AnalysisOptions | None = None,
    fix_fingers: str | None = None,
    randomize: bool = False,
    seed: int | None = None,
    xmax: int | float | None = None,  # noqa: PYI041 - an int and a float mean different things
    max_fingers: int | None = None,
    finger_thresh: float | None = None,
    lora: LoraMode = "merged",
    adapter_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    base: Any = None,
) -> pd.DataFrame:
    """:func:`analyze` for a bare ``state_dict`` (weights by name and shape; no model class needed).

    See :func:`~lightning_htsr.weights.state_dict.state_dict_matrices` for how tensors become matrices; the other
    arguments are :func:`analyze`'s (``ww_compat`` scales every 4-D weight as weightwatcher scales ``Conv2d``;
    ``layers`` and ``max_N`` need the model's modules and are :func:`analyze`'s only). Streams: each
    matrix is upcast only when its batch (:data:`BATCH_BYTES`) is analyzed, so the extra memory is a few matrices,
    not a float32 copy of the model. For checkpoint files, :func:`~lightning_htsr.analyze_checkpoint` also reads
    the tensors one at a time. ``base``: analyze ``W - W_base`` (:func:`analyze`'s ``base_model``; not
    with ``adapter_config`` or a ``lora`` other than ``"merged"``).

    A ``peft`` model's state dict (``<path>.base_layer.weight``, ``<path>.lora_A.<adapter>.weight``, ...) holds the
    factors but not their scaling (``lora_alpha / r``): pass ``adapter_config`` (the adapter's
    ``adapter_config.json``, its directory or its content as a dict) to merge them as :func:`analyze` does
    (``lora=``, names without ``base_model.model.`` and ``.base_layer``). Without it, ``lora="base"`` analyzes the
    frozen weights and the factors are left out; ``"merged"`` and ``"delta"`` raise a ``ValueError``.

    Example:
        >>> import torch
        >>> sd = {"fc.weight": torch.randn(512, 256, generator=torch.Generator().manual_seed(0))}
        >>> analyze_state_dict(sd)[["name", "phase"]].values.tolist()
        [['fc', 'random_like']]
    """
    options = resolve_options(options, ww_compat=ww_compat, fit=fit, min_tail=min_tail, precision=precision,
                               backend=backend, min_evals=min_evals, max_evals=max_evals, phase_config=phase_config,
                               fix_fingers=fix_fingers, randomize=randomize, seed=seed, xmax=xmax,
                               max_fingers=max_fingers, finger_thresh=finger_thresh)
    if base is not None:
        _deltas_take(adapter_config=adapter_config is None, lora=lora == "merged")
        from .deltas import delta_records

        return records_table(delta_records(state_dict, base, options, include=include, exclude=exclude))
    items, shapes, tie = state_dict_lora(state_dict, check_lora_mode(lora), adapter_config)
    matrices = iter_state_dict_matrices(items, shapes=shapes, include=include, exclude=exclude,
                                        min_evals=options.min_evals, max_evals=options.max_evals, tie=tie)
    return records_table([r.record for r in analyze_stream(matrices, options)])


def _deltas_take(**default: bool) -> None:
    """Refuse the options a base-model delta does not apply (``name=False``: the caller set it), rather than
    ignore them."""
    given = [name for name, is_default in default.items() if not is_default]
    if given:
        raise ValueError(f"{' and '.join(given)} cannot be combined with a base model: the deltas are of the matrices "
                         "as analyze lists them by default (merge an adapter first)")
