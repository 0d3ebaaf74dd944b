"""The short text the callback prints at the end of ``fit``: where each matrix ended up, and why training stopped
(or did not)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ...spectra.phases import Phase
from ..stopping import StopCriteria, StopState, has_settled, learning_matrices, settled_for

__all__ = ["MOVING_HINT", "fit_summary", "not_stopped_reason", "validation_metrics"]


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) and math.isfinite(value) else "-"


def _settled_column(name: str, learning: set[str], state: StopState, patience: float) -> str:
    anchor = state.anchors.get(name)
    if name not in learning or anchor is None:
        return "-"
    if has_settled(anchor, state.progress, patience):
        return f"since epoch {anchor.epoch}"
    return f"moving (steady for {settled_for(anchor, state.progress):.3g} of {patience:g} epochs)"


def not_stopped_reason(records: Sequence[Mapping[str, Any]], smoothed: Mapping[str, str | None],
                       state: StopState, criteria: StopCriteria) -> str:
    """Why the stop rule has not fired on the latest analysis, in one sentence.

    Example:
        >>> c = StopCriteria(stop_on="heavy_tailed")
        >>> not_stopped_reason([{"name": "fc", "alpha": 9.0, "entropy": 0.99}], {"fc": "random_like"}, StopState(), c)
        'no learning weight matrix is heavy_tailed yet (random-like matrices are ignored)'
    """
    if not criteria.active:
        return "stopping is off (stop_on=None)"
    if criteria.stop_on is None or criteria.rule != "settled":
        return f"the {criteria.rule} criterion was not met"
    learning = learning_matrices(records, smoothed)
    if not any(smoothed.get(r["name"]) == criteria.stop_on for r in learning):
        return f"no learning weight matrix is {criteria.stop_on} yet (random-like matrices are ignored)"
    patience = criteria.settle_patience
    moving = [r["name"] for r in learning if not has_settled(state.anchors.get(r["name"]), state.progress, patience)]
    shown = ", ".join(moving[:5]) + (" ..." if len(moving) > 5 else "")
    return (f"{len(moving)} of {len(learning)} learning weight matrices moved by more than alpha "
            f"{criteria.alpha_tolerance:.0%} / entropy {criteria.entropy_tolerance:.1%} within the last {patience:g} "
            f"epochs: {shown}")


def fit_summary(records: Sequence[Mapping[str, Any]], smoothed: Mapping[str, str | None], state: StopState,
                criteria: StopCriteria, stop_message: str | None, logged_validation: Sequence[str] = ()) -> str:
    """Per matrix the phase reached, alpha, entropy and since when it settled; then whether and why training stopped.

    Args:
        records: The latest analysis' records.
        smoothed: Their smoothed phases (``None``: not classified).
        state: The stop rule's state after that analysis.
        criteria: The stop rule.
        stop_message: Why training stopped, or ``None`` when it ran to its end.
        logged_validation: Logged validation metrics (named in the hint when the weights were still moving).

    Returns:
        A few lines of text.
    """
    learning = {r["name"] for r in learning_matrices(records, smoothed)}
    patience = criteria.settle_patience
    width = max([len(r["name"]) for r in records] + [6])
    header = f"  {'matrix':<{width}}  {'phase':<16} {'alpha':>6} {'entropy':>8}  settled"
    lines = ["HT-SR summary (latest analysis):", header]
    for r in records:
        phase = smoothed.get(r["name"])
        label = Phase(phase).value if phase else ("(too small)" if r.get("status") == "success" else r.get("status"))
        lines.append(f"  {r['name']:<{width}}  {label or '-':<16} {_fmt(r.get('alpha')):>6} "
                     f"{_fmt(r.get('entropy'), 3):>8}  {_settled_column(r['name'], learning, state, patience)}")
    if stop_message:
        lines.append(f"Stopped early: {stop_message}")
    else:
        lines.append(f"Not stopped by HT-SR: {not_stopped_reason(records, smoothed, state, criteria)}.")
        if _still_moving(learning, state, criteria):
            lines.append(MOVING_HINT)
            if logged_validation:
                lines.append(f"Logged validation metrics you could monitor: {', '.join(logged_validation)}.")
    return "\n".join(lines)


#: Printed when the run ended with learning matrices still moving under the weights-only rule (no ``monitor``).
MOVING_HINT = ("Weights still moving at the end: a network still learning and one memorizing noisy labels look the "
               "same to the weights (measured on MLPs, CNNs and transformers); if held-out accuracy peaked earlier, "
               "pass the validation metric you score (e.g. monitor=\"val_acc\", monitor_mode=\"max\") to stop "
               "there and get that epoch's weights back.")


def _still_moving(learning: set[str], state: StopState, criteria: StopCriteria) -> bool:
    """The weights-only settled rule ran and some learning matrix had not settled at the last analysis."""
    if criteria.monitor is not None or criteria.stop_on is None or criteria.rule != "settled" or not learning:
        return False
    return any(not has_settled(state.anchors.get(name), state.progress, criteria.settle_patience) for name in learning)


#: Name starts of the metrics Lightning users log from ``validation_step`` (``val_loss``, ``val/acc``, ``valid_f1``).
VALIDATION_PREFIXES = ("val_", "val/", "val.", "valid_", "valid/", "validation_", "validation/")


def validation_metrics(names: Iterable[str]) -> list[str]:
    """The logged metric names that look like validation metrics (a guess by their start), sorted.

    Example:
        >>> validation_metrics(["train_loss", "val_loss", "htsr/alpha_mean", "val/acc", "validation_f1"])
        ['val/acc', 'val_loss', 'validation_f1']
    """
    return sorted(n for n in names if n.lower().startswith(VALIDATION_PREFIXES))
