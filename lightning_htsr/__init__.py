"""lightning-htsr: Heavy-Tailed Self-Regularization diagnostics for live training.

Offline: :func:`analyze` a model, :func:`analyze_state_dict` a state dict or :func:`analyze_checkpoint` checkpoint
files (streamed) (one row per weight matrix: alpha, entropy, phase, ...) and
:func:`summarize` the table; ``base_model=``/``base=`` analyze a fine-tune's deltas ``W - W_base`` and
:func:`distances` compares two models matrix by matrix. Live: add :class:`HTSRCallback` to a Lightning ``Trainer``.
The pure stages are in :mod:`lightning_htsr.functional`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .analysis import AnalysisOptions
from .front_doors import analyze, analyze_state_dict
from .offline import analyze_checkpoint
from .records import summarize
from .spectra.phases import Phase, PhaseConfig, PhaseTracker
from .spectra.powerlaw import PowerLawFit
from .weights.checkpoints import CheckpointError

if TYPE_CHECKING:
    from .training.callback import HTSRCallback
    from .weight_distances import distances

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # HTSRCallback pulls in Lightning (seconds of import time); load it on first use so that offline analysis and
    # the command line start fast.
    if name == "HTSRCallback":
        from .training.callback import HTSRCallback

        return HTSRCallback
    if name == "distances":  # its module is weight_distances: a submodule of the same name would be shadowed
        from .weight_distances import distances

        return distances
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AnalysisOptions",
    "CheckpointError",
    "HTSRCallback",
    "Phase",
    "PhaseConfig",
    "PhaseTracker",
    "PowerLawFit",
    "__version__",
    "analyze",
    "analyze_checkpoint",
    "analyze_state_dict",
    "distances",
    "summarize",
]
