"""The stop decision: a pure function of one analysis plus a little checkpointable state.

Modelled on Lightning's ``EarlyStopping``: :func:`evaluate_stop` returns ``(should_stop, reason, message)`` and the
caller (the callback) makes the collective decision and sets ``trainer.should_stop``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .metrics import OVER_TRAINED_ALPHA
from .phases import Phase

__all__ = ["StopCriteria", "StopReason", "evaluate_stop", "phase_fraction"]


class StopReason(enum.Enum):
    """Why the callback stopped training (stored in checkpoints as ``.value``)."""

    NOT_STOPPED = 0
    PHASE_FRACTION = 1
    OVER_TRAINED = 2


@dataclass(frozen=True)
class StopCriteria:
    """When to stop.

    Attributes:
        stop_on: Phase that counts as "done" (usually ``"heavy_tailed"``); ``None`` disables the phase criterion.
        stop_fraction: Stop when at least this share of the *classified* matrices is in ``stop_on`` ...
        patience: ... for this many consecutive analyses ...
        min_epochs: ... and not before this epoch (0-based ``current_epoch``).
        stop_on_over_trained: Also stop when a matrix is over-trained: a trusted power-law tail (phase
            ``heavy_tailed``) with ``alpha < 2``, for ``patience`` consecutive analyses.
    """

    stop_on: str | None = None
    stop_fraction: float = 0.8
    patience: int = 1
    min_epochs: int = 0
    stop_on_over_trained: bool = False

    def __post_init__(self) -> None:
        if self.stop_on is not None:
            Phase(self.stop_on)  # raises ValueError for an unknown phase name
        if not 0.0 < self.stop_fraction <= 1.0:
            raise ValueError(f"stop_fraction must be in (0, 1], got {self.stop_fraction}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")

    @property
    def active(self) -> bool:
        """Whether any criterion is enabled."""
        return self.stop_on is not None or self.stop_on_over_trained


def phase_fraction(phases: Mapping[str, str | None], phase: str) -> tuple[float, int]:
    """Share of classified matrices in ``phase`` and the number classified.

    Example:
        >>> phase_fraction({"a": "heavy_tailed", "b": "random_like", "c": None}, "heavy_tailed")
        (0.5, 2)
    """
    labels = [p for p in phases.values() if p]
    if not labels:
        return math.nan, 0
    return sum(p == phase for p in labels) / len(labels), len(labels)


def over_trained(records: Sequence[Mapping[str, Any]], phases: Mapping[str, str | None]) -> list[str]:
    """Names of matrices with a trusted power-law tail (smoothed phase heavy_tailed) and alpha < 2."""
    return [
        r["name"]
        for r in records
        if phases.get(r["name"]) == Phase.HEAVY_TAILED.value
        and isinstance(r.get("alpha"), float)
        and r["alpha"] < OVER_TRAINED_ALPHA
    ]


def evaluate_stop(
    criteria: StopCriteria,
    records: Sequence[Mapping[str, Any]],
    smoothed: Mapping[str, str | None],
    *,
    epoch: int,
    wait_count: int,
) -> tuple[bool, StopReason, str, int]:
    """Decide whether this analysis stops training.

    Args:
        criteria: The thresholds.
        records: This analysis' records (for alpha).
        smoothed: Smoothed phase of every matrix (from :class:`~lightning_htsr.phases.PhaseTracker`).
        epoch: Current 0-based epoch.
        wait_count: Consecutive earlier analyses that met a criterion.

    Returns:
        ``(should_stop, reason, message, new_wait_count)``.

    Example:
        >>> c = StopCriteria(stop_on="heavy_tailed", stop_fraction=0.5, patience=2)
        >>> recs = [{"name": "a", "alpha": 3.0}, {"name": "b", "alpha": 9.0}]
        >>> ph = {"a": "heavy_tailed", "b": "random_like"}
        >>> evaluate_stop(c, recs, ph, epoch=3, wait_count=0)[0], evaluate_stop(c, recs, ph, epoch=3, wait_count=1)[0]
        (False, True)
    """
    reasons: list[tuple[StopReason, str]] = []
    if criteria.stop_on is not None:
        frac, n = phase_fraction(smoothed, criteria.stop_on)
        if n and frac >= criteria.stop_fraction:
            reasons.append((StopReason.PHASE_FRACTION,
                            f"{frac:.0%} of {n} classified weight matrices are {criteria.stop_on} "
                            f"(>= {criteria.stop_fraction:.0%})"))
    if criteria.stop_on_over_trained:
        names = over_trained(records, smoothed)
        if names:
            shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            reasons.append((StopReason.OVER_TRAINED, f"{len(names)} over-trained matrices (alpha < 2): {shown}"))
    if not reasons:
        return False, StopReason.NOT_STOPPED, "", 0
    wait = wait_count + 1
    reason, message = reasons[0]
    if wait < criteria.patience or epoch < criteria.min_epochs:
        return False, StopReason.NOT_STOPPED, "", wait
    return True, reason, f"{message} for {wait} consecutive analyses; signaling Trainer to stop.", wait
