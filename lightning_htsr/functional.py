"""The pure building blocks, usable on tensors without Lightning (like ``torchmetrics.functional``).

Each stage of the pipeline in one import::

    from lightning_htsr import functional as F

    mats = F.weight_matrices(model)                      # module -> matrices
    ev = F.eigenvalues(layer.weight)                     # matrix -> ESD (on the weight's device)
    pl = F.fit_power_law(ev)                             # ESD -> power-law fit (alpha, D, xmin, ...)
    mp = F.fit_marchenko_pastur(ev, N, M)                # ESD -> MP bulk, TW edge, spikes
    F.norm_metrics(ev, pl.alpha); F.matrix_entropy(ev, rank)
    F.classify_phase(ev, N, M)                           # ESD -> one of the 5+1 phases + diagnostics
"""

from __future__ import annotations

from .spectra.eigenvalues import compute_spectra, default_zero_tol, eigenvalues, resolution_floor
from .spectra.marchenko_pastur import (
    fit_marchenko_pastur,
    mp_cdf,
    mp_median,
    mp_pdf,
    mp_support,
    tracy_widom_quantile,
    tracy_widom_scale,
    tracy_widom_tail,
)
from .spectra.metrics import alpha_warning, matrix_entropy, norm_metrics, rank_metrics
from .spectra.phases import classify_phase
from .spectra.powerlaw import fit_power_law, ks_distances
from .weights.matrix import layer_type_of
from .weights.modules import weight_matrices
from .weights.state_dict import state_dict_matrices

__all__ = [
    "alpha_warning",
    "classify_phase",
    "compute_spectra",
    "default_zero_tol",
    "eigenvalues",
    "fit_marchenko_pastur",
    "fit_power_law",
    "ks_distances",
    "layer_type_of",
    "matrix_entropy",
    "mp_cdf",
    "mp_median",
    "mp_pdf",
    "mp_support",
    "norm_metrics",
    "rank_metrics",
    "resolution_floor",
    "state_dict_matrices",
    "tracy_widom_quantile",
    "tracy_widom_scale",
    "tracy_widom_tail",
    "weight_matrices",
]
