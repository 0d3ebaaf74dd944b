"""lightning-htsr: Heavy-Tailed Self-Regularization diagnostics for live training.

Offline: :func:`analyze` a model or checkpoint (one row per weight matrix: alpha, entropy, phase, ...) and
:func:`summarize` the table. Live: add :class:`HTSRCallback` to a Lightning ``Trainer``.
The pure stages are in :mod:`lightning_htsr.functional`.
"""

from __future__ import annotations

from .analysis import AnalysisOptions, analyze, analyze_state_dict
from .callback import HTSRCallback
from .phases import Phase, PhaseConfig, PhaseTracker
from .powerlaw import PowerLawFit
from .records import summarize

__version__ = "0.1.0"

__all__ = [
    "AnalysisOptions",
    "HTSRCallback",
    "Phase",
    "PhaseConfig",
    "PhaseTracker",
    "PowerLawFit",
    "__version__",
    "analyze",
    "analyze_state_dict",
    "summarize",
]
