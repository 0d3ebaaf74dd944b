"""Reading the monitored metric (``HTSRCallback(monitor=...)``): once per validation, at the weights it validated.

Lightning runs validation inside the training epoch, before ``on_train_epoch_end``. :class:`MonitorReader` reads the
metric right after validation (``on_validation_end``) and keeps it, checkpointed, until the epoch end counts it: a
run resumed from a checkpoint saved at validation end counts the same value the uninterrupted run counts. At the
epoch end it reads the metric again (an epoch-level *training* metric exists only then) and falls back to the value
read after validation. Between validations (``check_val_every_n_epoch > 1``) there is no new value; before the first
validation it reads the metric as logged in training, without warning while a validation is still to come.

Every rank judges rank zero's value (broadcast), so all ranks keep the same best analysis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn
except ImportError:  # pragma: no cover - only the standalone pytorch_lightning package is installed
    from pytorch_lightning.utilities.rank_zero import rank_zero_warn  # type: ignore[no-redef]

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["MonitorReader"]


class MonitorReader:
    """One run's reading of the monitored metric ``name`` (``None``: no metric monitored, every read is ``None``),
    the callback's ``criteria.monitor``, fixed for the callback's life like the rest of its criteria.

    Attributes:
        validated: A validation of this fit (not the sanity check, not a ``validate()`` before it) has run.
        pending: ... and one has run since the metric was last counted.
        fresh: The metric as read right after that validation (``None``: not logged).
    """

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.validated = self.pending = False
        self.fresh: float | None = None
        self._warned = False

    def start_fit(self) -> None:
        """A new fit begins: validations before it (``validate()``) are not its own."""
        self.validated = self.pending = False

    def after_validation(self, trainer: Trainer) -> None:
        """A validation of this fit ended: read the metric now and keep it until the epoch end counts it."""
        if self.name is None:
            return
        self.validated = self.pending = True
        self.fresh = self.read(trainer, warn=False)

    def at_epoch_end(self, trainer: Trainer) -> float | None:
        """The value to count at this epoch end: read after the latest validation, once (``None`` if counted
        already), or, while no validation has run, as logged in training. An accuracy that repeats exactly on a
        plateau is a new value: it counts towards the patience."""
        if self.name is None:
            return None
        if self.pending:  # read again now (an epoch-level training metric exists only now), else as validated
            value = self.read(trainer, warn=False)
            value = self.fresh if value is None else value
            self.pending, self.fresh = False, None
            if value is None:
                self.warn_missing(trainer)
            return value
        if self.validated:
            return None
        return self.read(trainer, warn=not _validation_ahead(trainer))

    def read(self, trainer: Trainer, warn: bool) -> float | None:
        """The metric as logged now, rank zero's value on every rank; a missing one warns (once) if ``warn``."""
        if self.name is None:
            return None
        value = trainer.callback_metrics.get(self.name)
        value = float(value) if value is not None else None
        value = trainer.strategy.broadcast(value, src=0)  # every rank judges the same best analysis
        if value is None and warn:
            self.warn_missing(trainer)
        return value

    def warn_missing(self, trainer: Trainer) -> None:
        if not self._warned:
            rank_zero_warn(f"HTSRCallback: monitor={self.name!r} is not among the logged metrics "
                           f"({', '.join(sorted(trainer.callback_metrics)) or 'none yet'}); until it is, only the "
                           "weights' signals can stop training")
            self._warned = True

    def state_dict(self) -> dict[str, Any]:
        """The checkpointed part (plain values; the callback's checkpoint keys)."""
        return {"validated": self.validated, "pending": self.pending, "fresh_monitor": self.fresh}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.validated = bool(state.get("validated", False))
        self.pending = bool(state.get("pending", False))
        fresh = state.get("fresh_monitor")
        self.fresh = float(fresh) if fresh is not None else None


def _validation_ahead(trainer: Trainer) -> bool:
    """Whether this fit runs validation (a validation loop with batches): until the first one, a validated metric is
    not missing yet."""
    return bool(getattr(trainer, "enable_validation", False))
