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
**Over-fitting** (``StopCriteria.overfitting``, on by default with ``"settled"``)
    Stop when the spectra turn back toward random: at least ``overfit_fraction`` of the learning matrices have their
    spectral entropy above its lowest value so far by more than ``overfit_tolerance`` (relative), and have stayed
    there for ``overfit_patience`` epochs. A network that memorizes noise after learning the signal spreads its
    weights' spectra again. The rule also names the *best* analysis so far: the latest one at which no learning
    matrix's entropy was above its lowest value by more than the tolerance (the weights just before the spectra
    turned; on a run that never turns, the latest analysis). With ``restore_best_weights`` the callback keeps a copy
    of its weights and, when it stops for over-fitting, hands them back.
``"phase_fraction"`` (the package's first rule)
    Stop when at least ``stop_fraction`` of the classified matrices are in ``stop_on`` for ``patience``
    consecutive analyses. Measured on the benchmark it stops while accuracy is still climbing, or never (see
    ``docs/guide/early-stopping.md``); kept as an explicit option.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..records import finite_number
from ..spectra.metrics import OVER_TRAINED_ALPHA
from ..spectra.phases import Phase, PhaseTracker

__all__ = [
    "Anchor",
    "BestAnalysis",
    "EntropyLow",
    "StopCriteria",
    "StopDecision",
    "StopReason",
    "StopState",
    "evaluate_stop",
    "forget_replaced",
    "has_settled",
    "over_trained",
    "phase_fraction",
    "replaced_matrices",
    "replay_stop",
    "rising_matrices",
    "settled_for",
    "structure_score",
    "turned_matrices",
    "update_anchors",
    "update_lows",
    "update_monitor",
]

#: Metrics whose plateau the ``"settled"`` rule watches.
SETTLE_METRICS: tuple[str, ...] = ("alpha", "entropy")


class StopReason(enum.Enum):
    """Why the callback stopped training (stored in checkpoints as ``.value``)."""

    NOT_STOPPED = 0
    PHASE_FRACTION = 1
    OVER_TRAINED = 2
    SETTLED = 3
    OVERFITTING = 4
    MONITOR = 5


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
        overfitting: ``"settled"`` only: also stop when the learning matrices' spectral entropy turns back up
            (see the module docstring), and judge the best analysis.
        overfit_tolerance: Relative rise of a matrix's spectral entropy above its lowest value that counts as turned.
        overfit_fraction: Share of the learning matrices that must have turned.
        overfit_patience: Epochs (fractional with step-triggered analyses) a matrix must stay turned.
        monitor: Optional logged metric (e.g. ``"val_loss"``) read at the analyses that see a new value of it. With
            it, the best analysis is the one with the best value, and training also stops when the value has not
            improved for ``monitor_patience`` such analyses, once it has improved at all (by ``monitor_min_delta`` of
            its first value): the weights' signals still stop plateaus, the metric catches the over-fitting they
            cannot see.
        monitor_mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
        monitor_patience: Analyses without improvement of the monitored metric before it stops training.
        monitor_min_delta: Relative improvement over the first value the metric must have made before it can stop
            training (a run still at chance is not over-fitting).
    """

    stop_on: str | None = None
    rule: Literal["settled", "phase_fraction"] = "settled"
    stop_fraction: float = 0.8
    patience: float | None = None
    alpha_tolerance: float = 0.05
    entropy_tolerance: float = 0.01
    min_epochs: int = 0
    stop_on_over_trained: bool = False
    overfitting: bool = True
    overfit_tolerance: float = 0.01
    overfit_fraction: float = 0.5
    overfit_patience: float = 1.0
    monitor: str | None = None
    monitor_mode: Literal["min", "max"] = "min"
    monitor_patience: int = 6
    monitor_min_delta: float = 0.01

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
        if self.overfit_tolerance < 0 or self.overfit_patience < 0 or not 0.0 < self.overfit_fraction <= 1.0:
            raise ValueError("overfit_tolerance and overfit_patience must be >= 0, overfit_fraction in (0, 1]")
        if self.monitor_mode not in ("min", "max"):
            raise ValueError(f"monitor_mode must be 'min' or 'max', got {self.monitor_mode!r}")
        if self.monitor_patience < 1 or self.monitor_min_delta < 0:
            raise ValueError("monitor_patience must be >= 1 and monitor_min_delta >= 0")

    @property
    def active(self) -> bool:
        """Whether any criterion is enabled."""
        return self.stop_on is not None or self.stop_on_over_trained or self.monitor is not None

    @property
    def detects_overfitting(self) -> bool:
        """Whether the over-fitting signal is read (``"settled"`` rule with a ``stop_on`` phase and ``overfitting``)."""
        return self.overfitting and self.rule == "settled" and self.stop_on is not None

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
class EntropyLow:
    """A matrix's lowest spectral entropy so far, and since when (progress, epochs) it has stayed above it by more than
    the tolerance (``None`` while it has not)."""

    entropy: float
    above_since: float | None = None


@dataclass(frozen=True)
class BestAnalysis:
    """The analysis judged best so far: the latest at which no learning matrix's spectral entropy had risen above its
    lowest value by more than the tolerance (the weights just before the spectra turned); with
    ``StopCriteria.monitor``, the one with the best value of the monitored metric.

    Attributes:
        analysis: Its index (the history's ``analysis`` column: the callback counts the baseline before training too).
        step: ``trainer.global_step`` at it.
        epoch: 0-based epoch at it.
        score: Its mean spectral entropy of the classified matrices (for the record); with a monitored metric, the
            metric's value there.
    """

    analysis: int
    step: int
    epoch: int
    score: float


@dataclass(frozen=True)
class StopState:
    """Everything the rules remember between analyses (plain values: see :meth:`state_dict`).

    Attributes:
        analyses: Analyses that were evaluated (the pre-training baseline is not).
        progress: Training progress (epochs) at the latest evaluated analysis.
        wait_count: Consecutive analyses that met a criterion (``"phase_fraction"`` and over-training).
        anchors: ``"settled"``: per-matrix :class:`Anchor`; bounded by the number of matrices.
        lows: Over-fitting: per-matrix :class:`EntropyLow`.
        best: The analysis judged best so far (:class:`BestAnalysis`), ``None`` before the first.
        monitor_first: The monitored metric's first value (``None``: none seen yet).
        monitor_wait: Monitored values since its best one.
        shapes: Per-matrix shape (``N``, ``M``, ``rf``) at the latest analysis that had one for it (the baseline
            too): a matrix whose shape changes (a layer replaced mid-training) starts its anchors and entropy low
            again.
    """

    analyses: int = 0
    wait_count: int = 0
    progress: float = 0.0
    anchors: Mapping[str, Anchor] = field(default_factory=dict)
    lows: Mapping[str, EntropyLow] = field(default_factory=dict)
    best: BestAnalysis | None = None
    monitor_first: float | None = None
    monitor_wait: int = 0
    shapes: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (loads with ``torch.load(weights_only=True)``)."""
        return {"analyses": self.analyses, "wait_count": self.wait_count, "progress": self.progress,
                "anchors": {name: vars(a).copy() for name, a in self.anchors.items()},
                "lows": {name: vars(low).copy() for name, low in self.lows.items()},
                "best": vars(self.best).copy() if self.best is not None else None,
                "monitor_first": self.monitor_first, "monitor_wait": self.monitor_wait,
                "shapes": {name: list(shape) for name, shape in self.shapes.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> StopState:
        """Inverse of :meth:`state_dict` (missing keys: a fresh state; older checkpoints have no lows, best nor
        shapes)."""
        anchors = {str(n): Anchor(float(a["progress"]), int(a["epoch"]), float(a["alpha"]), float(a["entropy"]))
                   for n, a in dict(state.get("anchors", {})).items()}
        lows = {str(n): EntropyLow(float(low["entropy"]), None if low["above_since"] is None
                                   else float(low["above_since"])) for n, low in dict(state.get("lows", {})).items()}
        best = state.get("best")
        return cls(int(state.get("analyses", 0)), int(state.get("wait_count", 0)), float(state.get("progress", 0.0)),
                   anchors, lows, BestAnalysis(int(best["analysis"]), int(best["step"]), int(best["epoch"]),
                                               float(best["score"])) if best else None,
                   None if state.get("monitor_first") is None else float(state["monitor_first"]),
                   int(state.get("monitor_wait", 0)),
                   {str(n): (int(shape[0]), int(shape[1]), int(shape[2]))
                    for n, shape in dict(state.get("shapes", {})).items()})


@dataclass(frozen=True)
class StopDecision:
    """The outcome of one analysis: stop or not, why, and a human-readable message.

    ``new_best``: this analysis is now the best one (the callback keeps a copy of its weights); ``restore_best``: the
    stop is for over-fitting (the spectra turned, or the monitored metric stalled) and the best analysis' weights
    should be handed back.
    """

    should_stop: bool
    reason: StopReason = StopReason.NOT_STOPPED
    message: str = ""
    new_best: bool = False
    restore_best: bool = False


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


def _dimension(value: Any) -> int | None:
    """A record's size column as an int (NumPy integers too: records read back from a history), else ``None``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and not isinstance(value, bool) else None


def _shape(record: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """A record's matrix shape ``(N, M, rf)`` (``rf`` 1 when absent), ``None`` when the record has no ``N`` and ``M``.
    Records hold ``N >= M``: a layer replaced by its transpose's shape is not told apart."""
    n, m = _dimension(record.get("N")), _dimension(record.get("M"))
    if n is None or m is None:
        return None
    return n, m, _dimension(record.get("rf")) or 1


def replaced_matrices(state: StopState, records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Matrices whose shape differs from the one an earlier analysis recorded: a layer replaced mid-training (model
    surgery, a grown or pruned layer). Their spectral history belongs to another matrix and must not judge them.

    Example:
        >>> state = StopState(shapes={"fc": (256, 128, 1), "out": (256, 10, 1)})
        >>> replaced_matrices(state, [{"name": "fc", "N": 256, "M": 96, "rf": 1}, {"name": "out", "N": 256, "M": 10}])
        ['fc']
    """
    return [r["name"] for r in records if (shape := _shape(r)) is not None
            and state.shapes.get(r["name"], shape) != shape]


def forget_replaced(state: StopState, records: Sequence[Mapping[str, Any]],
                    tracker: PhaseTracker | None = None) -> tuple[StopState, list[str]]:
    """Forget what the rule remembers of replaced matrices (:func:`replaced_matrices`): their anchors, entropy lows
    and, given the ``tracker``, their smoothed phase (their next label is taken at once, no hysteresis against a
    predecessor's); remember every matrix's current shape. :func:`evaluate_stop` calls it too (a no-op when the
    caller did already).

    Returns:
        The new state and the replaced matrices' names.
    """
    gone = replaced_matrices(state, records)
    if tracker is not None:
        for name in gone:
            for table in (tracker.smoothed, tracker.candidate, tracker.streak):
                table.pop(name, None)
    shapes = {**state.shapes, **{r["name"]: shape for r in records if (shape := _shape(r)) is not None}}
    return replace(state, shapes=shapes, anchors={n: a for n, a in state.anchors.items() if n not in gone},
                   lows={n: low for n, low in state.lows.items() if n not in gone}), gone


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


def structure_score(records: Iterable[Mapping[str, Any]], smoothed: Mapping[str, str | None]) -> float:
    """Mean spectral entropy of the classified matrices (NaN without any): lower means more structured weights.

    Example:
        >>> structure_score([{"name": "a", "entropy": 0.8}, {"name": "b", "entropy": 0.9}, {"name": "c", "entropy": 0.1}],
        ...                 {"a": "heavy_tailed", "b": "random_like", "c": None})
        0.85
    """
    values = [float(r["entropy"]) for r in records if smoothed.get(r["name"]) and finite_number(r.get("entropy"))]
    return round(sum(values) / len(values), 12) if values else math.nan


def update_lows(lows: Mapping[str, EntropyLow], learning: Iterable[Mapping[str, Any]], tolerance: float, *,
                progress: float) -> dict[str, EntropyLow]:
    """Each learning matrix's lowest entropy so far, and since when it has stayed above it by ``tolerance``.

    Example:
        >>> lows = update_lows({}, [{"name": "fc", "entropy": 0.80}], 0.01, progress=1.0)
        >>> lows = update_lows(lows, [{"name": "fc", "entropy": 0.82}], 0.01, progress=2.0)
        >>> lows["fc"]
        EntropyLow(entropy=0.8, above_since=2.0)
        >>> update_lows(lows, [{"name": "fc", "entropy": 0.79}], 0.01, progress=3.0)["fc"]
        EntropyLow(entropy=0.79, above_since=None)
    """
    out = dict(lows)
    for record in learning:
        entropy, low = float(record["entropy"]), out.get(record["name"])
        if low is None or entropy <= low.entropy:
            out[record["name"]] = EntropyLow(entropy)
        elif entropy > low.entropy * (1.0 + tolerance):
            out[record["name"]] = replace(low, above_since=low.above_since if low.above_since is not None else progress)
        else:
            out[record["name"]] = replace(low, above_since=None)
    return out


def rising_matrices(lows: Mapping[str, EntropyLow], learning: Iterable[Mapping[str, Any]]) -> list[str]:
    """Learning matrices whose entropy is now above its lowest value by more than the tolerance (not yet for long)."""
    return [r["name"] for r in learning if (low := lows.get(r["name"])) is not None and low.above_since is not None]


def turned_matrices(lows: Mapping[str, EntropyLow], learning: Iterable[Mapping[str, Any]], patience: float,
                    progress: float) -> list[str]:
    """Learning matrices whose entropy has stayed above its lowest value for ``patience`` epochs."""
    return [r["name"] for r in learning if (low := lows.get(r["name"])) is not None
            and low.above_since is not None and progress - low.above_since >= patience - 1e-9]


def _overfitting(criteria: StopCriteria, state: StopState, records: Sequence[Mapping[str, Any]],
                 smoothed: Mapping[str, str | None], where: tuple[int, int, int],
                 progress: float) -> tuple[StopState, StopDecision | None, bool]:
    """The over-fitting signal and the best analysis: the new state, a stop decision if the signal fired, and
    whether this analysis (``where``: index, step, epoch) is the new best."""
    learning = learning_matrices(records, smoothed)
    lows = update_lows(state.lows, learning, criteria.overfit_tolerance, progress=progress)
    score = structure_score(records, smoothed)
    new_best = criteria.monitor is None and bool(learning) and not rising_matrices(lows, learning)
    best = BestAnalysis(*where, score) if new_best else state.best
    state = replace(state, lows=lows, best=best)
    turned = turned_matrices(lows, learning, criteria.overfit_patience, progress)
    if not learning or len(turned) < criteria.overfit_fraction * len(learning):
        return state, None, new_best
    shown = ", ".join(turned[:4]) + (" ..." if len(turned) > 4 else "")
    message = (f"over-fitting: spectral entropy rising in {len(turned)} of {len(learning)} learning weight matrices "
               f"(above its lowest value by more than {criteria.overfit_tolerance:.1%} for at least "
               f"{criteria.overfit_patience:g} epoch{'s' if criteria.overfit_patience != 1 else ''}: {shown})")
    if best is not None and criteria.monitor is None:
        message += (f"; the best analysis, the last before the spectra turned, is {best.analysis} (epoch {best.epoch}, "
                    f"step {best.step})")
    # with a monitor, only its own stop hands its best back
    restore = not new_best and best is not None and criteria.monitor is None
    return state, StopDecision(True, StopReason.OVERFITTING, message, new_best, restore_best=restore), new_best


def _improved(criteria: StopCriteria, value: float, reference: float) -> bool:
    return value < reference if criteria.monitor_mode == "min" else value > reference


def update_monitor(criteria: StopCriteria, state: StopState, value: float | None,
                   where: tuple[int, int, int]) -> tuple[StopState, StopDecision | None, bool]:
    """The monitored metric: the best analysis by its value, and a stop once it has not improved for
    ``monitor_patience`` values after it improved by ``monitor_min_delta`` at all.

    Args:
        criteria: The rule (``monitor``, ``monitor_mode``, ``monitor_patience``, ``monitor_min_delta``).
        state: What earlier analyses left.
        value: The metric's new value (``None`` or non-finite: nothing changes).
        where: Index, step and epoch of the analysis (or epoch end) the value belongs to.

    Returns:
        The new state, a decision if the metric stops training, and whether this is the new best.

    Example:
        >>> crit = StopCriteria(monitor="val_loss", monitor_patience=2)
        >>> state, stops = StopState(), []
        >>> for i, value in enumerate([1.0, 0.5, 0.6, 0.7]):
        ...     state, decision, _ = update_monitor(crit, state, value, (i, i, i))
        ...     stops.append(decision is not None)
        >>> stops, state.best.epoch
        ([False, False, False, True], 1)
    """
    if value is None or not math.isfinite(value):
        return state, None, False
    first = value if state.monitor_first is None else state.monitor_first
    new_best = state.best is None or _improved(criteria, value, state.best.score)
    if new_best:
        state = replace(state, monitor_first=first, monitor_wait=0, best=BestAnalysis(*where, float(value)))
        return state, None, True
    state = replace(state, monitor_first=first, monitor_wait=state.monitor_wait + 1)
    best = state.best
    learned = abs(best.score - first) >= criteria.monitor_min_delta * abs(first) and _improved(criteria, best.score,
                                                                                                first)
    if state.monitor_wait < criteria.monitor_patience or not learned:
        return state, None, False
    message = (f"{criteria.monitor} has not improved for {state.monitor_wait} analyses (best {best.score:.4g} at "
               f"epoch {best.epoch}, step {best.step}, analysis {best.analysis})")
    return state, StopDecision(True, StopReason.MONITOR, message, False, restore_best=True), False


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
    step: int | None = None,
    analysis: int | None = None,
    monitored: float | None = None,
) -> tuple[StopDecision, StopState]:
    """Decide whether this analysis stops training.

    Args:
        criteria: The rule and its thresholds.
        state: What earlier analyses left (:class:`StopState`).
        records: This analysis' records (alpha, entropy; ``N``, ``M``, ``rf``: a matrix whose shape changed is
            judged afresh, :func:`forget_replaced`).
        smoothed: Smoothed phase of every matrix this analysis classified (``None`` for the others), from
            :class:`~lightning_htsr.spectra.phases.PhaseTracker`.
        epoch: Current 0-based epoch.
        progress: Training progress in epochs (``epoch + 1`` at the end of an epoch, fractional between); the
            ``"settled"`` rule's patience is measured in it. Default ``epoch + 1``.
        step: ``trainer.global_step`` (recorded in :class:`BestAnalysis`); default the evaluated analyses' count.
        analysis: This analysis' index (recorded in :class:`BestAnalysis`); default the evaluated analyses' count.
        monitored: The monitored metric's value at this analysis, when ``criteria.monitor`` is set and a new value
            was logged since the previous analysis (``None`` otherwise: it does not count towards its patience).

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
    new_best = False
    progress = float(epoch + 1) if progress is None else float(progress)
    state = replace(forget_replaced(state, records)[0], analyses=state.analyses + 1, progress=progress)
    where = (state.analyses - 1 if analysis is None else int(analysis),
             state.analyses - 1 if step is None else int(step), epoch)
    if criteria.detects_overfitting:
        state, decision, new_best = _overfitting(criteria, state, records, smoothed, where, progress)
    by_monitor = None
    if criteria.monitor is not None:
        state, by_monitor, new_best = update_monitor(criteria, state, monitored, where)
    if criteria.rule == "settled":  # anchors are kept even when observing only: the summary says what settled when
        state, settled = _settled(criteria, state, records, smoothed, epoch, progress)
        decision = decision or settled
    decision = decision or by_monitor  # the weights' own signals first: a plateau keeps its last weights
    if decision is None:
        decision, state = _waited(criteria, state, records, smoothed)
    decision = replace(decision, new_best=new_best)
    if decision.should_stop and epoch < criteria.min_epochs:
        return StopDecision(False, new_best=new_best), state
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
        The analysis that stops (with ``"message"``, ``"reason"`` and ``"restore_step"``: the step of the analysis
        whose weights the callback hands back, ``None`` when it keeps the last weights), or ``None`` if the rule
        never fires. An analysis' ``"monitored"`` value feeds ``monitor``.
    """
    criteria.setdefault("stop_on", "heavy_tailed")
    crit, state, tracker = StopCriteria(**criteria), StopState(), PhaseTracker(k=phase_hysteresis)
    for analysis in analyses:
        records = analysis["records"]
        state = forget_replaced(state, records, tracker)[0]
        smoothed = tracker.update_records(records)
        if analysis.get("trigger") == "train_start":
            continue
        decision, state = evaluate_stop(crit, state, records, smoothed, epoch=int(analysis["epoch"]),
                                        progress=analysis.get("progress"), step=analysis.get("step"),
                                        analysis=analysis.get("analysis"), monitored=analysis.get("monitored"))
        if decision.should_stop:
            restore = state.best.step if decision.restore_best and state.best is not None else None
            return {**analysis, "message": decision.message, "reason": decision.reason.name, "restore_step": restore}
    return None
