"""When the callback analyzes: a small, pure, checkpointable schedule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AnalysisSchedule"]


@dataclass(frozen=True)
class AnalysisSchedule:
    """Which moments of training trigger an analysis.

    Epochs are Lightning's 0-based ``trainer.current_epoch``; an epoch is analyzed at its end.

    Attributes:
        every_n_epochs: Analyze at the end of every n-th epoch (epochs ``n-1, 2n-1, ...``); 0 or ``None`` disables.
        epochs: Explicit epochs to analyze at the end of; overrides ``every_n_epochs`` when given.
        every_n_steps: Also analyze after every n-th optimizer step (``trainer.global_step % n == 0``); ``None``
            disables.
        on_train_start: Analyze once before the first step (the epoch-0 baseline of a fresh run).

    Example:
        >>> s = AnalysisSchedule(every_n_epochs=2)
        >>> [e for e in range(6) if s.epoch_due(e)]
        [1, 3, 5]
        >>> AnalysisSchedule(epochs=[0, 4]).epoch_due(4), AnalysisSchedule(every_n_steps=100).step_due(300)
        (True, True)
    """

    every_n_epochs: int | None = 1
    epochs: Sequence[int] | None = None
    every_n_steps: int | None = None
    on_train_start: bool = True

    def __post_init__(self) -> None:
        if self.every_n_epochs is not None and self.every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 or None, got {self.every_n_epochs}")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {self.every_n_steps}")
        if self.epochs is not None and any(e < 0 for e in self.epochs):
            raise ValueError(f"epochs must be >= 0, got {list(self.epochs)}")

    def epoch_due(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` (0-based) is an analysis point."""
        if self.epochs is not None:
            return epoch in set(self.epochs)
        return bool(self.every_n_epochs) and (epoch + 1) % self.every_n_epochs == 0  # type: ignore[operator]

    def step_due(self, global_step: int, previous: int | None = None) -> bool:
        """Whether the optimizer steps up to ``global_step`` (after it was taken) crossed an analysis point since
        step ``previous`` (default ``global_step - 1``): a multiple of ``every_n_steps``, also when the step count
        jumps by more than one per batch (manual optimization with several optimizers).

        Example:
            >>> schedule = AnalysisSchedule(every_n_steps=5)
            >>> [schedule.step_due(s) for s in (4, 5, 6)], schedule.step_due(12, previous=8)
            ([False, True, False], True)
        """
        every = self.every_n_steps
        previous = global_step - 1 if previous is None else previous
        return every is not None and every > 0 and global_step > 0 and global_step // every > previous // every
