"""weightwatcher 0.7.7's ``fix_fingers`` options, as they behave with its default power-law package.

``analyze(fix_fingers=...)`` (weightwatcher's ``pl_package='ww'`` default, checked by running 0.7.7):

* ``"clip_xmax"`` (``RMT_Util.fit_clipped_powerlaw``) computes: after the first fit (``raw_alpha``) it refits with
  the ``idx = 2, ..., 9`` largest eigenvalues removed and stops at the first ``idx`` whose alpha is more than
  ``finger_thresh = 1`` below the first fit's (that fit is kept, ``num_fingers = idx - 1``: one less than the number
  removed, as weightwatcher counts), or when alpha drops to 2 or below (first fit kept, ``num_fingers = 0``).
  ``xmax`` is the largest eigenvalue the kept fit saw; ``num_pl_spikes`` counts every eigenvalue ``>= xmin``,
  the removed fingers included.
* ``"xmin_peak"`` does not: weightwatcher logs ``"Only powerlaw supports fix_fingers, pl_package mis-specified,
  ww"`` and its fit then fails for every layer (``alpha = D = xmin = -1``). Here the fit fails with that reason
  (``alpha`` NaN, ``status="degenerate"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from .powerlaw import PowerLawFit

__all__ = ["fit_fix_fingers", "removed_by_clip"]

#: Accepted ``fix_fingers`` values.
FIX_FINGERS = ("clip_xmax", "xmin_peak")
#: The failure weightwatcher 0.7.7 reports for ``fix_fingers="xmin_peak"`` with its default ``pl_package``.
XMIN_PEAK_REASON = "weightwatcher 0.7.7: only powerlaw supports fix_fingers (xmin_peak), pl_package is 'ww'"

#: weightwatcher's ``DEFAULT_MAX_FINGERS``, ``DEFAULT_FINGER_THRESH`` and ``fit_clipped_powerlaw``'s ``min_alpha``.
MAX_FINGERS, FINGER_THRESH, MIN_ALPHA = 10, 1.0, 2.0


def fit_fix_fingers(eigenvalues: Tensor, fit: Callable[[Tensor], PowerLawFit], fix_fingers: str, *,
                    max_fingers: int | None = MAX_FINGERS,
                    finger_thresh: float = FINGER_THRESH) -> tuple[PowerLawFit, dict[str, float | int]]:
    """A power-law fit with weightwatcher's ``fix_fingers`` treatment.

    Args:
        eigenvalues: The ESD, sorted ascending.
        fit: The power-law fit to use (the analysis's :func:`~lightning_htsr.spectra.powerlaw.fit_power_law` settings).
        fix_fingers: ``"clip_xmax"`` or ``"xmin_peak"``.
        max_fingers: ``clip_xmax`` tries removing ``2 .. max_fingers - 1`` eigenvalues. As in weightwatcher 0.7.7
            (``fit_powerlaw``), a value below half the number of eigenvalues (or ``None``, or negative) is replaced
            by its default 10: only a large ``max_fingers`` changes anything.
        finger_thresh: How far below the first fit's alpha a clipped fit must drop to be kept.

    Returns:
        The kept fit and the extra columns (``{"num_fingers", "raw_alpha"}`` for ``"clip_xmax"``, none for
        ``"xmin_peak"``, which weightwatcher does not add either).

    Example:
        >>> import torch
        >>> from lightning_htsr.spectra.powerlaw import fit_power_law
        >>> ev = torch.linspace(0.1, 1.0, 200, dtype=torch.float64)
        >>> fit_fix_fingers(ev, fit_power_law, "xmin_peak")[0].status
        'failed'
    """
    if fix_fingers not in FIX_FINGERS:
        raise ValueError(f"fix_fingers must be one of {FIX_FINGERS} or None, got {fix_fingers!r}")
    if fix_fingers == "xmin_peak":
        return PowerLawFit.failed(XMIN_PEAK_REASON, int(eigenvalues.numel())), {}
    first = fit(eigenvalues)
    if not first.ok:
        return first, {"num_fingers": 0, "raw_alpha": first.alpha}
    if max_fingers is None or max_fingers < 0.5 * eigenvalues.numel():  # weightwatcher's reset, negatives included
        max_fingers = MAX_FINGERS
    best, num_fingers = first, 0
    for idx in range(2, max_fingers):
        if idx >= eigenvalues.numel():
            break
        clipped = fit(eigenvalues[:-idx])
        if not clipped.ok:
            break
        if clipped.alpha + finger_thresh < first.alpha:
            best, num_fingers = clipped, idx - 1
            break
        if clipped.alpha <= MIN_ALPHA:
            break
    if best is not first:
        tail = int(torch.count_nonzero(eigenvalues >= best.xmin))
        best = replace(best, num_pl_spikes=tail, num_evals=first.num_evals)
    return best, {"num_fingers": num_fingers, "raw_alpha": float(np.float64(first.alpha))}


def removed_by_clip(num_fingers: int) -> int:
    """How many of the largest eigenvalues the kept ``clip_xmax`` fit left out: ``num_fingers + 1`` (weightwatcher
    counts one less than it removes), 0 when the first fit was kept.

    Example:
        >>> removed_by_clip(0), removed_by_clip(3)
        (0, 4)
    """
    return num_fingers + 1 if num_fingers > 0 else 0
