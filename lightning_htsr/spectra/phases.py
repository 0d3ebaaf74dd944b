"""Stage 5 of the pipeline: ESD diagnostics -> one of the "5+1 phases of training" (Martin & Mahoney 2021, sec. 5).

The papers assign phases by eye. This module makes the assignment operational, from quantities random-matrix
theory predicts (see ``THEORY_DOSSIER.md`` sections 2-3 and the calibration in ``tests/test_phases.py``):

1. ``rank_collapse``: at least ``zero_fraction`` of the spectrum sits in a cluster at least ``zero_gap_decades``
   below the rest (any aspect ratio; exact zeros count, they sit at the solver's resolution floor). The test is
   scale-free: a very heavy-tailed matrix spans many decades continuously (even past what float64 resolves) and
   has no such gap, while exact zeros or a low-rank product plus noise do.
2. ``random_like``: no eigenvalue is Tracy-Widom-significant above the Marchenko-Pastur edge (family-wise
   false-spike rate 0.01 %) and the bulk matches MP (KS <= ``max_ks_mp``, or Kolmogorov's critical value
   ``ks_critical / sqrt(n)`` for small spectra). A spectrum with nothing above the edge that is *not* MP-shaped
   (narrower: orthogonal inits, every singular value equal) and has no trusted power law is also ``random_like``:
   rule 6 needs eigenmass above the edge.
3. ``bulk_plus_spikes``: an MP bulk plus a few spikes (<= ``max_spike_fraction`` of the eigenvalues), every one of
   them at least ``spike_separation`` TW widths above the edge: outside the BBP critical window, where a spike's
   distance from the edge grows like ``(theta - theta_c)^2 N^(2/3)`` TW widths.
4. ``bleeding_out``: an MP bulk plus a few spikes, at least one of them inside that window: eigenmass just leaving
   the edge.
5. ``heavy_tailed``: a power law describes the tail: ``alpha < max_alpha`` with KS ``D <= max_powerlaw_D`` over at
   least ``min_tail_fraction`` of the eigenvalues, and the power law is not rejected in favour of an exponential
   (bounded) tail by the likelihood-ratio test of Clauset, Shalizi & Newman (z > ``min_lr_z``). Exponents below 2
   stay ``heavy_tailed``; the separate ``warning`` column says ``"very heavy-tailed"``.
6. ``bulk_decay``: everything else with eigenvalues above the edge: many of them that are neither a few clean spikes nor
   a power-law tail (graded signals straddling the BBP threshold, weak heavy tails with alpha > 6).

The classifier also returns the diagnostics behind the label, so a user can see *why*.
:class:`PhaseTracker` smooths labels across analyses with hysteresis.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .arrays import sorted_float64
from .eigenvalues import default_zero_tol
from .marchenko_pastur import FALSE_SPIKE_RATE, MarchenkoPasturFit, fit_marchenko_pastur
from .powerlaw import PowerLawFit, fit_power_law, likelihood_ratio_exponential

__all__ = [
    "Phase",
    "PhaseConfig",
    "PhaseResult",
    "PhaseTracker",
    "classify_phase",
]


class Phase(str, enum.Enum):
    """The 5+1 phases of training, in order of increasing implicit self-regularization (+ rank collapse)."""

    RANDOM_LIKE = "random_like"
    BLEEDING_OUT = "bleeding_out"
    BULK_PLUS_SPIKES = "bulk_plus_spikes"
    BULK_DECAY = "bulk_decay"
    HEAVY_TAILED = "heavy_tailed"
    RANK_COLLAPSE = "rank_collapse"

    @property
    def code(self) -> int:
        """Integer code for scalar logging: 0 random_like ... 4 heavy_tailed, 5 rank_collapse."""
        return list(Phase).index(self)

    @classmethod
    def from_code(cls, code: int) -> Phase:
        """Inverse of :attr:`code`."""
        return list(Phase)[code]

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PhaseConfig:
    """Thresholds of the phase classifier (all overridable).

    Attributes:
        min_evals: Spectra with fewer non-zero eigenvalues are not classified (phase ``None``); below this the
            MP and power-law tests have no power.
        zero_fraction: ``rank_collapse`` when at least this share of eigenvalues is near zero ...
        zero_gap_decades: ... where near zero means below a jump of at least this many decades between consecutive
            sorted eigenvalues (floored at the resolution floor), with ``>= min_tail_fraction`` of the spectrum
            above the jump or a tighter cluster below it than the jump.
        false_spike_rate: Family-wise chance that a pure-noise matrix shows a spike (sets the TW quantile: 4.36
            widths for one slice at 0.01 %, 5.3 for a 3x3 convolution's 9 pooled slices). Measured at
            initialization (Kaiming, Xavier, default and normal inits, 4800 classified matrices): no false spike;
            at 0.1 % there were 9.
        max_ks_mp: Largest KS distance between the bulk and Marchenko-Pastur for an "MP-like" bulk ...
        ks_critical: ... or, for small spectra, ``ks_critical / sqrt(n)`` if larger: Kolmogorov's 10 % critical
            value for ``n`` eigenvalues (1.22). The KS distance of a pure-noise spectrum has the usual ``1/sqrt(n)``
            spread (measured: below ``1.2 / sqrt(n)`` for n = 50 to 576), so a fixed 0.05 would reject small random
            layers.
        max_spike_fraction: "A few spikes" means at most this share of the eigenvalues (and at least one).
        spike_separation: Spikes of a ``bulk_plus_spikes`` layer are all at least this many TW widths above the
            edge; closer ones make it ``bleeding_out``.
        max_alpha: ``heavy_tailed`` needs ``alpha`` below this (SETOL: alpha > 6 is "weakly heavy-tailed" and
            uninformative).
        max_powerlaw_D: ... a power-law KS distance at most this ...
        min_tail_fraction: ... over a tail holding at least this share of the eigenvalues ...
        min_lr_z: ... and a power-law-vs-exponential likelihood-ratio z above this (-1.645: not rejected at 10 %).
    """

    min_evals: int = 50
    zero_fraction: float = 0.10
    zero_gap_decades: float = 3.0
    false_spike_rate: float = FALSE_SPIKE_RATE
    max_ks_mp: float = 0.05
    ks_critical: float = 1.22
    max_spike_fraction: float = 0.02
    spike_separation: float = 25.0
    max_alpha: float = 6.0
    max_powerlaw_D: float = 0.1
    min_tail_fraction: float = 0.05
    min_lr_z: float = -1.645


@dataclass(frozen=True)
class PhaseResult:
    """A phase label and the diagnostics behind it.

    Attributes:
        phase: The label, or ``None`` when the spectrum is too small or degenerate to classify.
        reason: One sentence on which rule decided (or why there is no label).
        frac_zero: Share of near-zero eigenvalues: those below the highest ``zero_gap_decades`` jump.
        mp: The Marchenko-Pastur fit (``lambda_plus``, TW width, spikes, ``ks_mp``, ``tail_mass``, ...).
        powerlaw: The power-law fit (``alpha``, ``D``, ``xmin``, tail size).
        lr_exponential: Likelihood-ratio z of the power law against an exponential tail (> 0 favours the
            power law).
    """

    phase: Phase | None
    reason: str
    frac_zero: float
    mp: MarchenkoPasturFit
    powerlaw: PowerLawFit
    lr_exponential: float = math.nan

    def diagnostics(self) -> dict[str, float | int | str | None]:
        """Flat ``dict`` of the diagnostics, with the column names ``analyze()`` uses."""
        mp = self.mp.as_dict()
        return {
            "phase": self.phase.value if self.phase is not None else None,
            "phase_reason": self.reason,
            "frac_zero": self.frac_zero,
            "lr_exponential": self.lr_exponential,
            **mp,
        }


def _near_zero_fraction(x: np.ndarray, zero_tol: float, config: PhaseConfig) -> float:
    """Share of the spectrum below the highest qualifying jump of >= ``zero_gap_decades`` in ``log10(lambda)``.

    Eigenvalues under ``zero_tol`` (the solver's resolution floor) are placed *at* the floor: they are unresolved,
    not necessarily zero. A jump qualifies when at least ``min_tail_fraction`` of the spectrum lies above it, or when
    the cluster below it is tighter (in decades) than the jump itself: a cluster of (near-)zeros under the bulk, even
    under a single surviving direction (rank 1). A very heavy tail that runs continuously into the floor, with a few
    huge eigenvalues far above the rest, has neither.
    """
    n_total = x.size
    if n_total < 2 or not x[-1] > 0:
        return 0.0
    floor = max(zero_tol, float(x[-1]) * 1e-300)
    logs = np.log10(np.maximum(x, floor))
    jumps = np.diff(logs)
    above = n_total - 1 - np.arange(jumps.size)  # eigenvalues above each jump
    span_below = logs[:-1] - logs[0]
    big = jumps >= config.zero_gap_decades
    ok = big & ((above >= max(1.0, config.min_tail_fraction * n_total)) | (span_below < jumps))
    if not ok.any():
        return 0.0
    return (int(np.flatnonzero(ok)[-1]) + 1) / n_total


def _powerlaw_is_trusted(pl: PowerLawFit, lr_z: float, n: int, config: PhaseConfig) -> bool:
    return (
        pl.ok
        and pl.alpha < config.max_alpha
        and pl.D <= config.max_powerlaw_D
        and pl.num_pl_spikes >= config.min_tail_fraction * n
        and not lr_z < config.min_lr_z  # NaN (degenerate tail) does not veto
    )


def classify_phase(
    eigenvalues: Tensor | np.ndarray,
    N: int,
    M: int,
    *,
    num_slices: int = 1,
    zero_tol: float | None = None,
    config: PhaseConfig | None = None,
    mp: MarchenkoPasturFit | None = None,
    powerlaw: PowerLawFit | None = None,
) -> PhaseResult:
    """Assign one of the 5+1 phases to an ESD.

    Args:
        eigenvalues: The ESD of one (pooled) matrix, any scale convention.
        N: Larger side of one slice.
        M: Smaller side of one slice.
        num_slices: Number of pooled slices (a ``kh x kw`` convolution has ``kh * kw``).
        zero_tol: Eigenvalues ``<= zero_tol`` are numerical zeros (pass the resolution floor of the eigensolver,
            :attr:`~lightning_htsr.spectra.eigenvalues.Spectrum.floor`). ``None``:
            :func:`~lightning_htsr.spectra.eigenvalues.default_zero_tol` of the input's dtype (float32 eigenvalues keep
            the float32 resolution floor).
        config: Thresholds (default :class:`PhaseConfig`).
        mp: A precomputed :func:`~lightning_htsr.spectra.marchenko_pastur.fit_marchenko_pastur` result (computed if
            ``None``).
        powerlaw: A precomputed :func:`~lightning_htsr.spectra.powerlaw.fit_power_law` result (computed if ``None``).

    Returns:
        A :class:`PhaseResult`.

    Example:
        >>> import torch
        >>> from lightning_htsr.spectra.eigenvalues import eigenvalues
        >>> w = torch.randn(1000, 500, generator=torch.Generator().manual_seed(0))
        >>> classify_phase(eigenvalues(w), 1000, 500).phase
        <Phase.RANDOM_LIKE: 'random_like'>
    """
    config = config or PhaseConfig()
    x = sorted_float64(eigenvalues).cpu().numpy()
    n_total = x.size
    lam_max = float(x[-1]) if n_total else 0.0
    if zero_tol is None:
        zero_tol = default_zero_tol(lam_max, n_total, eigenvalues.dtype)
    nonzero = x[x > zero_tol]
    frac_zero = _near_zero_fraction(x, zero_tol, config) if n_total else math.nan
    if mp is None:
        # The bulk is what lies above a near-zero cluster: median matching inside the cluster would fit noise.
        above = x[int(round(frac_zero * n_total)) :] if n_total else x
        mp = fit_marchenko_pastur(above, N, M, num_slices=num_slices, false_spike_rate=config.false_spike_rate,
                                  zero_tol=zero_tol)
    powerlaw, lr_z = _tail_fits(nonzero, zero_tol, powerlaw)
    if n_total == 0 or lam_max <= 0 or not math.isfinite(lam_max):
        phase, reason = None, "no spectrum (all-zero or empty)"
    elif frac_zero >= config.zero_fraction and n_total >= config.min_evals:
        phase, reason = Phase.RANK_COLLAPSE, f"{frac_zero:.0%} of the eigenvalues are (near) zero"
    elif nonzero.size < config.min_evals:
        phase, reason = None, f"{nonzero.size} non-zero eigenvalues < {config.min_evals} needed to classify"
    else:
        phase, reason = _phase_of_spectrum(nonzero.size, mp, powerlaw, lr_z, config)
    return PhaseResult(phase, reason, frac_zero, mp, powerlaw, lr_z)


def _tail_fits(nonzero: np.ndarray, zero_tol: float, powerlaw: PowerLawFit | None) -> tuple[PowerLawFit, float]:
    """The power-law fit (``powerlaw`` if given) of the non-zero eigenvalues and its likelihood-ratio z against an
    exponential tail."""
    if powerlaw is None:
        powerlaw = fit_power_law(torch.from_numpy(nonzero), zero_tol=zero_tol) if nonzero.size else PowerLawFit.failed(
            "no non-zero eigenvalues"
        )
    return powerlaw, likelihood_ratio_exponential(nonzero, powerlaw) if nonzero.size else math.nan


def _phase_of_spectrum(n: int, mp: MarchenkoPasturFit, powerlaw: PowerLawFit, lr_z: float,
                       config: PhaseConfig) -> tuple[Phase, str]:
    """Rules 2-6 of the module docstring for a spectrum of ``n`` non-zero eigenvalues without rank collapse."""
    mp_like = math.isfinite(mp.ks_mp) and mp.ks_mp <= max(config.max_ks_mp, config.ks_critical / math.sqrt(n))
    if mp.num_spikes == 0 and mp_like:
        return Phase.RANDOM_LIKE, f"no spike above the TW edge; bulk KS to MP {mp.ks_mp:.3f}"
    few = 1 <= mp.num_spikes <= max(1.0, config.max_spike_fraction * n)
    if few and mp_like:
        if mp.spike_gap_tw >= config.spike_separation:
            return Phase.BULK_PLUS_SPIKES, (f"{mp.num_spikes} spike(s), all >= {mp.spike_gap_tw:.0f} TW widths above "
                                            f"an MP bulk (KS {mp.ks_mp:.3f})")
        return Phase.BLEEDING_OUT, (f"{mp.num_spikes} spike(s) above an MP bulk, the weakest only "
                                    f"{mp.spike_gap_tw:.1f} TW widths out")
    if _powerlaw_is_trusted(powerlaw, lr_z, n, config):
        return Phase.HEAVY_TAILED, (f"power-law tail alpha={powerlaw.alpha:.2f}, D={powerlaw.D:.3f} over "
                                    f"{powerlaw.num_pl_spikes} eigenvalues (LR vs exponential z={lr_z:.1f})")
    if mp.num_spikes == 0:
        # Nothing above the TW edge, yet no MP shape: a bulk narrower than MP (orthogonal and semi-orthogonal inits
        # have every singular value equal). Bulk decay needs eigenmass above the edge, so this is random-like.
        return Phase.RANDOM_LIKE, f"no spike above the TW edge; bulk narrower than MP (KS {mp.ks_mp:.3f})"
    return Phase.BULK_DECAY, (f"{mp.num_spikes} eigenvalues above the MP edge (bulk KS {mp.ks_mp:.3f}) without a "
                              f"trusted power law (alpha={powerlaw.alpha:.2f}, D={powerlaw.D:.3f}, LR z={lr_z:.1f})")


@dataclass
class PhaseTracker:
    """Smooth phase labels across analyses with hysteresis.

    A matrix's reported (smoothed) phase changes only after ``k`` consecutive analyses agree on a new label; a
    matrix seen for the first time takes its first label at once. Unclassified analyses (``None``) neither count
    towards nor break a streak. The state is plain Python data (``state_dict``) so it can live in a checkpoint.

    Args:
        k: Consecutive agreeing analyses needed to switch.

    Example:
        >>> t = PhaseTracker(k=2)
        >>> [t.update({"fc": p})["fc"] for p in ["random_like", "heavy_tailed", "random_like", "heavy_tailed",
        ...                                      "heavy_tailed"]]
        ['random_like', 'random_like', 'random_like', 'random_like', 'heavy_tailed']
    """

    k: int = 2
    smoothed: dict[str, str] = field(default_factory=dict)
    candidate: dict[str, str] = field(default_factory=dict)
    streak: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def update(self, raw: dict[str, str | Phase | None]) -> dict[str, str]:
        """Feed one analysis' raw labels ``{matrix name: phase}``; returns the smoothed labels of all matrices."""
        for name, label in raw.items():
            if label is None:
                continue
            label = Phase(label).value
            current = self.smoothed.get(name)
            if current is None:
                self.smoothed[name] = label
                self.candidate.pop(name, None)
                self.streak.pop(name, None)
                continue
            if label == current:
                self.candidate.pop(name, None)
                self.streak.pop(name, None)
                continue
            if self.candidate.get(name) == label:
                self.streak[name] += 1
            else:
                self.candidate[name] = label
                self.streak[name] = 1
            if self.streak[name] >= self.k:
                self.smoothed[name] = label
                self.candidate.pop(name)
                self.streak.pop(name)
        return dict(self.smoothed)

    def update_records(self, records: Iterable[Mapping[str, Any]]) -> dict[str, str | None]:
        """Feed one analysis' records; the smoothed phase of each matrix *this* analysis classified, else ``None``.

        The tracker remembers old labels across unclassified analyses (hysteresis), but a matrix that is now NaN,
        skipped or too small has no phase: it must not count with a stale label.

        Example:
            >>> t = PhaseTracker(k=2)
            >>> t.update_records([{"name": "fc", "phase": "heavy_tailed"}])
            {'fc': 'heavy_tailed'}
            >>> t.update_records([{"name": "fc", "phase": None}])
            {'fc': None}
        """
        records = list(records)
        tracked = self.update({r["name"]: r["phase"] for r in records})
        return {r["name"]: tracked.get(r["name"]) if r["phase"] else None for r in records}

    def state_dict(self) -> dict[str, object]:
        """Plain-Python state (loads with ``torch.load(weights_only=True)``)."""
        return {"k": self.k, "smoothed": dict(self.smoothed), "candidate": dict(self.candidate),
                "streak": dict(self.streak)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` output."""
        self.k = int(state.get("k", self.k))  # type: ignore[arg-type]
        self.smoothed = dict(state.get("smoothed", {}))  # type: ignore[arg-type]
        self.candidate = dict(state.get("candidate", {}))  # type: ignore[arg-type]
        self.streak = {k: int(v) for k, v in dict(state.get("streak", {})).items()}  # type: ignore[arg-type]
