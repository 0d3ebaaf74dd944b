"""The stop decision: pure functions of one analysis plus a little checkpointable state.

Modelled on Lightning's ``EarlyStopping``: :func:`evaluate_stop` returns a :class:`StopDecision` (whether, why, a
message) and the new :class:`StopState`; the caller (the callback) makes the collective decision and sets
``trainer.should_stop``.

Two rules (``StopCriteria.rule``), both reading the weights only (no labels, loss or validation data):

``"settled"`` (the default, chosen on ``benchmarks/bench_stopping.py``)
    Stop once self-regularization has *settled*: every learning weight matrix (classified, and not
    ``random_like``) has kept its power-law exponent ``alpha`` within ``alpha_tolerance`` and its spectral entropy
    within ``entropy_tolerance`` (relative) for ``patience`` epochs, and at least one matrix is in the ``stop_on``
    phase. Each matrix carries an *anchor* (its values and the training progress, in epochs, when it last moved by
    more than the tolerances); it has settled when the anchor is ``patience`` epochs old. Measuring patience in
    epochs of training rather than in analyses makes the rule independent of the analysis schedule. Layers reach
    the heavy-tailed phase in the first epochs while accuracy still climbs; their spectra keep moving until
    learning slows down.
``"phase_fraction"`` (the rule of version 0.1)
    Stop when at least ``stop_fraction`` of the classified matrices are in ``stop_on`` for ``patience``
    consecutive analyses. Measured on the benchmark it stops while accuracy is still climbing, or never (see the
    README, "Does HT-SR early stopping work?"); kept as an explicit option.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .metrics import OVER_TRAINED_ALPHA
from .phases import Phase, PhaseTracker
from .records import finite_number

__all__ = [
    "Anchor",
    "StopCriteria",
    "StopDecision",
    "StopReason",
    "StopState",
    "evaluate_stop",
    "over_trained",
    "phase_fraction",
    "replay_stop",
    "has_settled",
    "settled_for",
    "update_anchors",
]

#: Metrics whose plateau the ``"settled"`` rule watches.
SETTLE_METRICS: tuple[str, ...] = ("alpha", "entropy")


class StopReason(enum.Enum):
    """Why the callback stopped training (stored in checkpoints as ``.value``)."""

    NOT_STOPPED = 0
    PHASE_FRACTION = 1
    OVER_TRAINED = 2
    SETTLED = 3


@dataclass(frozen=True)
class StopCriteria:
    """When to stop.

    Attributes:
        stop_on: Phase that counts as "done" (usually ``"heavy_tailed"``); ``None`` disables both rules.
        rule: ``"settled"`` (plateau of every learning matrix's alpha and entropy, with at least one matrix in
            ``stop_on``) or ``"phase_fraction"`` (share of matrices in ``stop_on``).
        stop_fraction: ``"phase_fraction"`` only: share of the classified matrices that must be in ``stop_on``.
        patience: ``"settled"``: epochs of training (fractional with step-triggered analyses) a matrix must stay
            within the tolerances, default 7; ``"phase_fraction"`` and over-training: consecutive qualifying
            analyses, default 1.
        alpha_tolerance: ``"settled"``: relative change of alpha that still counts as settled.
        entropy_tolerance: ``"settled"``: relative change of the spectral entropy that still counts as settled.
        min_epochs: Never stop before this epoch (0-based ``current_epoch``).
        stop_on_over_trained: Also stop when a matrix is over-trained: a trusted power-law tail (phase
            ``heavy_tailed``) with ``alpha < 2``, for ``patience`` consecutive analyses.
    """

    stop_on: str | None = None
    rule: Literal["settled", "phase_fraction"] = "settled"
    stop_fraction: float = 0.8
    patience: float | None = None
    alpha_tolerance: float = 0.05
    entropy_tolerance: float = 0.01
    min_epochs: int = 0
    stop_on_over_trained: bool = False

    def __post_init__(self) -> None:
        if self.stop_on is not None:
            Phase(self.stop_on)  # raises ValueError for an unknown phase name
        if self.rule not in ("settled", "phase_fraction"):
            raise ValueError(f"rule must be 'settled' or 'phase_fraction', got {self.rule!r}")
        if not 0.0 < self.stop_fraction <= 1.0:
            raise ValueError(f"stop_fraction must be in (0, 1], got {self.stop_fraction}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.alpha_tolerance < 0 or self.entropy_tolerance < 0:
            raise ValueError("alpha_tolerance and entropy_tolerance must be >= 0")

    @property
    def active(self) -> bool:
        """Whether any criterion is enabled."""
        return self.stop_on is not None or self.stop_on_over_trained

    @property
    def settle_patience(self) -> float:
        """Epochs a matrix must stay within the tolerances (``"settled"``): ``patience``, by default 7."""
        return float(self.patience) if self.patience is not None else 7.0

    @property
    def streak_patience(self) -> int:
        """Consecutive qualifying analyses (``"phase_fraction"``, over-training): ``patience``, by default 1."""
        return math.ceil(self.patience) if self.patience is not None else 1


@dataclass(frozen=True)
class Anchor:
    """A matrix's values when it last moved by more than the tolerances, and when (training progress in epochs)."""

    progress: float
    epoch: int
    alpha: float
    entropy: float


@dataclass(frozen=True)
class StopState:
    """Everything the rules remember between analyses (plain values: see :meth:`state_dict`).

    Attributes:
        analyses: Analyses that were evaluated (the pre-training baseline is not).
        progress: Training progress (epochs) at the latest evaluated analysis.
        wait_count: Consecutive analyses that met a criterion (``"phase_fraction"`` and over-training).
        anchors: ``"settled"``: per-matrix :class:`Anchor`; bounded by the number of matrices.
    """

    analyses: int = 0
    wait_count: int = 0
    progress: float = 0.0
    anchors: Mapping[str, Anchor] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (loads with ``torch.load(weights_only=True)``)."""
        return {"analyses": self.analyses, "wait_count": self.wait_count, "progress": self.progress,
                "anchors": {name: vars(a).copy() for name, a in self.anchors.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> StopState:
        """Inverse of :meth:`state_dict` (missing keys: a fresh state)."""
        anchors = {str(n): Anchor(float(a["progress"]), int(a["epoch"]), float(a["alpha"]), float(a["entropy"]))
                   for n, a in dict(state.get("anchors", {})).items()}
        return cls(int(state.get("analyses", 0)), int(state.get("wait_count", 0)), float(state.get("progress", 0.0)),
                   anchors)


@dataclass(frozen=True)
class StopDecision:
    """The outcome of one analysis: stop or not, why, and a human-readable message."""

    should_stop: bool
    reason: StopReason = StopReason.NOT_STOPPED
    message: str = ""


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


def learning_matrices(records: Iterable[Mapping[str, Any]], phases: Mapping[str, str | None]) -> list[Mapping]:
    """Records the ``"settled"`` rule watches: classified now, not ``random_like``, finite alpha and entropy.

    A matrix that stays random-like (an untrained or barely trained layer) has nothing to settle; a matrix too small
    to classify has no meaningful alpha.
    """
    return [r for r in records
            if phases.get(r["name"]) and phases[r["name"]] != Phase.RANDOM_LIKE.value
            and all(finite_number(r.get(m)) for m in SETTLE_METRICS)]


def _moved(anchor: Anchor, record: Mapping[str, Any], criteria: StopCriteria) -> bool:
    return (abs(record["alpha"] - anchor.alpha) > criteria.alpha_tolerance * abs(anchor.alpha)
            or abs(record["entropy"] - anchor.entropy) > criteria.entropy_tolerance * abs(anchor.entropy))


def update_anchors(anchors: Mapping[str, Anchor], learning: Iterable[Mapping[str, Any]], criteria: StopCriteria,
                   *, progress: float, epoch: int) -> dict[str, Anchor]:
    """Re-anchor every learning matrix that moved beyond the tolerances (or has no anchor yet).

    Example:
        >>> c = StopCriteria(stop_on="heavy_tailed", alpha_tolerance=0.05, entropy_tolerance=0.01)
        >>> a = update_anchors({}, [{"name": "fc", "alpha": 3.0, "entropy": 0.9}], c, progress=1.0, epoch=0)
        >>> update_anchors(a, [{"name": "fc", "alpha": 3.1, "entropy": 0.9}], c, progress=2.0, epoch=1)["fc"].epoch
        0
        >>> update_anchors(a, [{"name": "fc", "alpha": 2.5, "entropy": 0.9}], c, progress=2.0, epoch=1)["fc"].epoch
        1
    """
    out = dict(anchors)
    for record in learning:
        anchor = out.get(record["name"])
        if anchor is None or _moved(anchor, record, criteria):
            out[record["name"]] = Anchor(progress, epoch, float(record["alpha"]), float(record["entropy"]))
    return out


def settled_for(anchor: Anchor | None, progress: float) -> float:
    """Epochs since the matrix last moved beyond the tolerances (0 without an anchor)."""
    return progress - anchor.progress if anchor is not None else 0.0


def has_settled(anchor: Anchor | None, progress: float, patience: float) -> bool:
    """Whether the matrix has stayed within the tolerances for ``patience`` epochs (up to rounding of progress)."""
    return settled_for(anchor, progress) >= patience - 1e-9


def _settled(criteria: StopCriteria, state: StopState, records: Sequence[Mapping[str, Any]],
             smoothed: Mapping[str, str | None], epoch: int, progress: float) -> tuple[StopState, StopDecision | None]:
    learning = learning_matrices(records, smoothed)
    anchors = update_anchors(state.anchors, learning, criteria, progress=progress, epoch=epoch)
    state = replace(state, anchors=anchors)
    patience = criteria.settle_patience
    if criteria.stop_on is None or not any(smoothed.get(r["name"]) == criteria.stop_on for r in learning):
        return state, None
    if not all(has_settled(anchors[r["name"]], progress, patience) for r in learning):
        return state, None
    reached = sum(smoothed.get(r["name"]) == criteria.stop_on for r in learning)
    message = (f"HT-SR settled: all {len(learning)} learning weight matrices ({reached} {criteria.stop_on}) kept "
               f"alpha within {criteria.alpha_tolerance:.0%} and entropy within {criteria.entropy_tolerance:.1%} for "
               f"{patience:g} epochs")
    return state, StopDecision(True, StopReason.SETTLED, message)


def _phase_fraction_reason(criteria: StopCriteria, smoothed: Mapping[str, str | None]) -> str | None:
    frac, n = phase_fraction(smoothed, criteria.stop_on or "")
    if n and frac >= criteria.stop_fraction:
        return (f"{frac:.0%} of {n} classified weight matrices are {criteria.stop_on} "
                f"(>= {criteria.stop_fraction:.0%})")
    return None


def _over_trained_reason(records: Sequence[Mapping[str, Any]], smoothed: Mapping[str, str | None]) -> str | None:
    names = over_trained(records, smoothed)
    if not names:
        return None
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return f"{len(names)} over-trained matrices (alpha < 2): {shown}"


def evaluate_stop(
    criteria: StopCriteria,
    state: StopState,
    records: Sequence[Mapping[str, Any]],
    smoothed: Mapping[str, str | None],
    *,
    epoch: int,
    progress: float | None = None,
) -> tuple[StopDecision, StopState]:
    """Decide whether this analysis stops training.

    Args:
        criteria: The rule and its thresholds.
        state: What earlier analyses left (:class:`StopState`).
        records: This analysis' records (alpha, entropy).
        smoothed: Smoothed phase of every matrix this analysis classified (``None`` for the others), from
            :class:`~lightning_htsr.phases.PhaseTracker`.
        epoch: Current 0-based epoch.
        progress: Training progress in epochs (``epoch + 1`` at the end of an epoch, fractional between); the
            ``"settled"`` rule's patience is measured in it. Default ``epoch + 1``.

    Returns:
        The decision and the new state.

    Example:
        >>> c = StopCriteria(stop_on="heavy_tailed", patience=2)
        >>> recs, ph = [{"name": "fc", "alpha": 3.0, "entropy": 0.9}], {"fc": "heavy_tailed"}
        >>> state, stops = StopState(), []
        >>> for epoch in range(4):
        ...     decision, state = evaluate_stop(c, state, recs, ph, epoch=epoch)
        ...     stops.append(decision.should_stop)
        >>> stops  # anchored at the end of epoch 0, unchanged for 2 more epochs: stops at the end of epoch 2
        [False, False, True, True]
    """
    decision: StopDecision | None = None
    progress = float(epoch + 1) if progress is None else float(progress)
    state = replace(state, analyses=state.analyses + 1, progress=progress)
    if criteria.rule == "settled":  # anchors are kept even when observing only: the summary says what settled when
        state, decision = _settled(criteria, state, records, smoothed, epoch, progress)
    if decision is None:
        decision, state = _waited(criteria, state, records, smoothed)
    if decision.should_stop and epoch < criteria.min_epochs:
        return StopDecision(False), state
    return decision, state


def _waited(criteria: StopCriteria, state: StopState, records: Sequence[Mapping[str, Any]],
            smoothed: Mapping[str, str | None]) -> tuple[StopDecision, StopState]:
    """The criteria that need ``patience`` consecutive qualifying analyses: phase fraction and over-training."""
    found: list[tuple[StopReason, str]] = []
    if criteria.stop_on is not None and criteria.rule == "phase_fraction":
        message = _phase_fraction_reason(criteria, smoothed)
        if message:
            found.append((StopReason.PHASE_FRACTION, message))
    if criteria.stop_on_over_trained:
        message = _over_trained_reason(records, smoothed)
        if message:
            found.append((StopReason.OVER_TRAINED, message))
    if not found:
        return StopDecision(False), replace(state, wait_count=0)
    wait = state.wait_count + 1
    state = replace(state, wait_count=wait)
    if wait < criteria.streak_patience:
        return StopDecision(False), state
    reason, message = found[0]
    return StopDecision(True, reason, f"{message} for {wait} consecutive analyses"), state


def replay_stop(analyses: Iterable[Mapping[str, Any]], phase_hysteresis: int = 2, **criteria: Any) -> dict | None:
    """Where the callback's stop rule fires on a recorded run (the same functions as the callback).

    Args:
        analyses: In order, each ``{"epoch", "trigger", "records"}`` and optionally ``"progress"`` (epochs, default
            ``epoch + 1``); ``trigger == "train_start"`` is the baseline (it feeds the phase tracker but is never
            evaluated, as in the callback).
        phase_hysteresis: The callback's ``phase_hysteresis``.
        **criteria: :class:`StopCriteria` fields (``stop_on`` defaults to ``"heavy_tailed"``).

    Returns:
        The analysis that stops (with ``"message"``), or ``None`` if the rule never fires.
    """
    criteria.setdefault("stop_on", "heavy_tailed")
    crit, state, tracker = StopCriteria(**criteria), StopState(), PhaseTracker(k=phase_hysteresis)
    for analysis in analyses:
        records = analysis["records"]
        smoothed = tracker.update_records(records)
        if analysis.get("trigger") == "train_start":
            continue
        decision, state = evaluate_stop(crit, state, records, smoothed, epoch=int(analysis["epoch"]),
                                        progress=analysis.get("progress"))
        if decision.should_stop:
            return {**analysis, "message": decision.message, "reason": decision.reason.name}
    return None
