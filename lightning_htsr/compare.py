"""Models side by side without data: ``lightning-htsr compare A B C ...`` and :func:`compare_models`.

Each model is analyzed (:func:`~lightning_htsr.analyze_checkpoint` for paths) and summarized by
:func:`~lightning_htsr.records.summarize` (means over the classified matrices), one row per model:

===================== ====================================================================================
``alpha``             mean power-law exponent
``alpha_weighted``    mean ``alpha * log10 lambda_max`` in the analysis' convention (``W^T W / N`` by default)
``alpha_hat``         mean ``alpha * log10 lambda_max`` of ``W^T W`` (no ``1/N``): Martin & Mahoney's alpha-hat
                      ("weighted alpha"), weightwatcher's ``alpha_weighted``
``log_norm``          mean ``log10 ||W||_F^2`` (analysis convention; ``W^T W`` adds ``log10 N`` per matrix)
``log_spectral_norm`` mean ``log10 lambda_max`` (same convention)
``entropy``           mean spectral entropy
``n_<phase>``         number of classified matrices in each phase
===================== ====================================================================================

What these numbers can and cannot tell is measured in ``benchmarks/README.md`` ("Comparing models without data").
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from .analysis import AnalysisOptions
from .front_doors import analyze, analyze_state_dict
from .offline import analyze_checkpoint
from .records import SUMMARY_METRICS, summarize
from .spectra.phases import Phase

__all__ = ["COMPARE_METRICS", "alpha_hat", "compare_models", "model_summary"]

#: The per-model means of the comparison, in table order.
COMPARE_METRICS: tuple[str, ...] = ("alpha", "alpha_weighted", "alpha_hat", "log_norm", "log_spectral_norm",
                                    "entropy")


def alpha_hat(frame: pd.DataFrame, options: AnalysisOptions) -> pd.Series:
    """Per matrix ``alpha * log10 lambda_max(W^T W)``, whatever the analysis' scale convention.

    Example:
        >>> import pandas as pd
        >>> from lightning_htsr.analysis import AnalysisOptions
        >>> df = pd.DataFrame({"alpha": [2.0], "log_spectral_norm": [-1.0], "N": [100], "alpha_weighted": [-2.0]})
        >>> float(alpha_hat(df, AnalysisOptions()).iloc[0])  # 2 * (-1 + log10 100)
        2.0
    """
    if not options.normalize:
        return pd.to_numeric(frame["alpha_weighted"], errors="coerce")
    alpha = pd.to_numeric(frame["alpha"], errors="coerce")
    log_lam = pd.to_numeric(frame["log_spectral_norm"], errors="coerce")
    return alpha * (log_lam + np.log10(pd.to_numeric(frame["N"], errors="coerce").astype(float)))


def model_summary(frame: pd.DataFrame, options: AnalysisOptions) -> dict[str, Any]:
    """One model's row: counts, the :data:`COMPARE_METRICS` means and the phase counts."""
    table = frame.assign(alpha_hat=alpha_hat(frame, options)) if len(frame) else frame.assign(alpha_hat=[])
    summary = summarize(table, (*SUMMARY_METRICS, "alpha_hat"))
    row: dict[str, Any] = {"matrices": summary["num_layers"], "classified": summary["num_classified"]}
    row.update({m: summary.get(m, math.nan) for m in COMPARE_METRICS})
    classified = summary["num_classified"]
    for phase in Phase:
        share = summary.get(f"frac_{phase.value}", math.nan)
        row[f"n_{phase.value}"] = round(share * classified) if classified else 0
    return row


def _analyze_one(model: Any, options: AnalysisOptions, **kwargs: Any) -> pd.DataFrame:
    if isinstance(model, nn.Module):
        return analyze(model, options=options, include=kwargs.get("include"), exclude=kwargs.get("exclude"))
    if isinstance(model, dict):
        return analyze_state_dict(model, options=options, include=kwargs.get("include"),
                                  exclude=kwargs.get("exclude"))
    return analyze_checkpoint(model, options=options, **kwargs)


def compare_models(models: Sequence[Any], *, labels: Sequence[str] | None = None,
                   options: AnalysisOptions | None = None, **kwargs: Any) -> pd.DataFrame:
    """The model-level summary of each model, one row each.

    Args:
        models: Checkpoint paths (each one checkpoint: a file, a model directory, or a list of files), modules or
            state dicts.
        labels: Row labels (default: the paths, or ``model<i>``).
        options: Conventions (default :class:`~lightning_htsr.analysis.AnalysisOptions`).
        **kwargs: Passed to :func:`~lightning_htsr.analyze_checkpoint` (``include``, ``exclude``, ``threads``,
            ``trust_pickle``, ``device``, ...).

    Returns:
        Columns ``model``, ``matrices``, ``classified``, :data:`COMPARE_METRICS`, ``n_<phase>``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> sds = [{"fc.weight": torch.randn(512, 256, generator=g)} for _ in range(2)]
        >>> compare_models(sds, labels=["a", "b"])[["model", "classified", "n_random_like"]].values.tolist()
        [['a', 1, 1], ['b', 1, 1]]
    """
    options = options or AnalysisOptions()
    rows = []
    for i, model in enumerate(models):
        label = labels[i] if labels is not None else (str(model) if isinstance(model, (str, os.PathLike))
                                                       else f"model{i}")
        rows.append({"model": label, **model_summary(_analyze_one(model, options, **kwargs), options)})
    return pd.DataFrame(rows)
