"""The pipeline's engine: weight matrices -> eigenvalues -> fits -> metrics -> phase -> one record per matrix.

module --(layers)--> weight matrices --(eigenvalues)--> ESDs --(powerlaw, marchenko_pastur, metrics)--> numbers
--(phases)--> phase --(records)--> one row per matrix.

:func:`analyze_matrices` is the part shared with :class:`~lightning_htsr.HTSRCallback`: it takes already extracted
matrices (the callback extracts its rank's share, gathering sharded weights first) and returns
:class:`MatrixAnalysis` objects carrying the record *and* the eigenvalues and fits, for the sinks that plot them.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .records import empty_record, records_to_frame
from .spectra.eigenvalues import Backend, Precision, Route, Spectrum, check_choice, compute_spectra
from .spectra.marchenko_pastur import MarchenkoPasturFit
from .spectra.metrics import (
    WW_ENTROPY_EPSILON,
    WW_WEAK_RANK_TOL,
    alpha_warning,
    detx_metrics,
    esd_metrics,
    matrix_entropy,
    norm_metrics,
    rank_metrics,
)
from .spectra.phases import PhaseConfig, PhaseResult, classify_phase
from .spectra.powerlaw import FitScan, KSConvention, PowerLawFit, fit_scan
from .spectra.randomize import random_columns
from .spectra.tail_fit import check_fit_options, fit_tail
from .spectra.tpl import TPL_FITS
from .weights.adapters import LoraMode
from .weights.matrix import LOW_PRECISION, SkipKind, WeightMatrix
from .weights.modules import weight_matrices
from .weights.ww_select import ww_select

__all__ = [
    "BATCH_BYTES",
    "AnalysisOptions",
    "FitKind",
    "MatrixAnalysis",
    "analyze_matrices",
    "analyze_stream",
    "bad_input_rows",
    "is_routine_skip",
    "resolve_options",
    "warn_bad_input",
]

#: Bytes of (float32) weights per batched eigenvalue call when streaming: small matrices are batched, large ones
#: go one at a time, and each batch is dropped once analyzed.
BATCH_BYTES = 64 * 2**20

#: weightwatcher's near-zero filter before the power-law fit (``constants.EVALS_THRESH``, CPU value).
WW_EVALS_THRESH = 1e-5

#: The ``fit=`` choices: the power-law search (``"fast"``, ``"exact"``) or weightwatcher's truncated power laws
#: (``"TPL"``, ``"E_TPL"``; :mod:`~lightning_htsr.spectra.tpl`, needs the ``powerlaw`` package).
FitKind = Literal["fast", "exact", "TPL", "E_TPL"]


@dataclass(frozen=True)
class AnalysisOptions:
    """How matrices are turned into numbers. Defaults are this package's conventions; see
    :meth:`weightwatcher` for weightwatcher 0.7.7's.

    Attributes:
        normalize: Eigenvalues of ``X = W^T W / N`` (True, the random-matrix convention) or of ``W^T W``.
        ww_conv_scaling: Multiply convolution weights by ``sqrt(1/2)`` (eigenvalues by 1/2) as weightwatcher's
            pooled ``conv2d_norm`` does.
        fit: Power-law search, ``"fast"`` or ``"exact"``; or weightwatcher's truncated power law ``"TPL"`` /
            ``"E_TPL"`` (:mod:`~lightning_htsr.spectra.tpl`; adds the ``Lambda`` column).
        min_tail: Smallest tail the power-law fit may choose.
        ks: KS convention of the fit, ``"two_sided"`` or ``"lower"``.
        fit_zero_tol: Absolute threshold below which eigenvalues are dropped before the fit; ``None`` uses each
            spectrum's numerical-zero tolerance.
        precision: ``"auto"``, ``"float32"`` or ``"float64"``.
        route: ``"auto"``, ``"gram"`` or ``"svd"``.
        backend: ``"torch"`` or ``"cupy"``.
        rank_eps: Epsilon of NumPy's rank tolerance (``None``: the weights' own).
        entropy_epsilon: Added to each ``p_i`` in the entropy (0 here; weightwatcher adds 1e-10 on CPU).
        weak_rank_tol: Eigenvalues below it count in ``weak_rank_loss`` (``None``: the spectrum's numerical-zero
            tolerance, as ``rank_loss``; weightwatcher: the absolute 1e-6).
        min_evals: The power-law fit's floor: matrices with fewer pooled eigenvalues are skipped (no spectrum). The
            minimum spectrum size that counts (classified, in the means) is ``phase_config.min_evals``;
            :func:`resolve_options` (``analyze(min_evals=...)``) sets both consistently.
        max_evals: Matrices with more pooled eigenvalues are skipped (``None``: no limit).
        phase_config: Thresholds of the phase classifier.
        warn_unclassified: weightwatcher's warnings: its labels (``"over-trained"`` for alpha < 2) and also for
            matrices with too few eigenvalues to classify (weightwatcher does; a 10-eigenvalue classifier head's alpha
            is not meaningful, so by default its ``warning`` stays empty).
        fix_fingers: weightwatcher's ``"clip_xmax"`` or ``"xmin_peak"`` as 0.7.7 behaves
            (:mod:`~lightning_htsr.spectra.fingers`; ``"clip_xmax"`` adds ``num_fingers`` and ``raw_alpha``), or
            ``None``.
        randomize: Add the correlation-trap columns of the element-shuffled matrix
            (:mod:`~lightning_htsr.spectra.randomize`).
        seed: Seed of the shuffles (``None``: fresh entropy).
        xmax: weightwatcher's ``xmax``: an ``int`` ``k`` leaves the ``|k|`` largest eigenvalues out of the fit
            (``-1`` as ``1``; more than half the eigenvalues: the fit fails, as in weightwatcher); a ``float``
            caps the tail (eigenvalues above it are left out). ``None``: the whole spectrum. Cannot be combined with
            ``fix_fingers`` as an ``int`` (weightwatcher refuses that too).
        max_fingers: ``fix_fingers="clip_xmax"``: at most ``max_fingers - 1`` largest eigenvalues are tried off
            (weightwatcher 0.7.7's rule: only values of at least half the number of eigenvalues change the
            default 10; see :func:`~lightning_htsr.spectra.fingers.fit_fix_fingers`).
        finger_thresh: ``fix_fingers="clip_xmax"``: drop of alpha that identifies fingers (default 1.0).
        max_N: ``ww_compat`` layer selection: skip layers with ``N`` above it (``None``: weightwatcher's 50000).
    """

    normalize: bool = True
    ww_conv_scaling: bool = False
    fit: FitKind = "fast"
    min_tail: int = 10
    ks: KSConvention = "two_sided"
    fit_zero_tol: float | None = None
    precision: Precision = "auto"
    route: Route = "auto"
    backend: Backend = "torch"
    rank_eps: float | None = None
    entropy_epsilon: float = 0.0
    weak_rank_tol: float | None = None
    min_evals: int = 10
    max_evals: int | None = None
    phase_config: PhaseConfig = field(default_factory=PhaseConfig)
    warn_unclassified: bool = False
    fix_fingers: str | None = None
    randomize: bool = False
    seed: int | None = None
    xmax: int | float | None = None
    max_fingers: int = 10
    finger_thresh: float = 1.0
    max_N: int | None = None

    def __post_init__(self) -> None:
        """The one check of the shared options (a ``ValueError`` naming the allowed values)."""
        check_choice("backend", self.backend, Backend)
        check_choice("fit", self.fit, FitKind)
        check_choice("precision", self.precision, Precision)
        check_choice("route", self.route, Route)
        check_choice("ks", self.ks, KSConvention)
        check_fit_options(self)

    @classmethod
    def weightwatcher(cls, **overrides: Any) -> AnalysisOptions:
        """weightwatcher 0.7.7's default ``analyze()`` conventions (CPU): no ``1/N``, conv slices scaled by
        ``sqrt(1/2)``, eigenvalues ``<= 1e-5`` dropped before an exhaustive fit with tails of 2+ points and the
        lower-step KS distance, float64 SVD, entropy epsilon 1e-10, float64 rank tolerance, ``min_evals=8``."""
        base = cls(
            normalize=False,
            ww_conv_scaling=True,
            fit="exact",
            min_tail=2,
            ks="lower",
            fit_zero_tol=WW_EVALS_THRESH,
            precision="float64",
            route="svd",
            rank_eps=torch.finfo(torch.float64).eps,
            entropy_epsilon=WW_ENTROPY_EPSILON,
            weak_rank_tol=WW_WEAK_RANK_TOL,
            min_evals=8,
            warn_unclassified=True,
        )
        return replace(base, **overrides)


@dataclass
class MatrixAnalysis:
    """Everything computed for one matrix.

    Attributes:
        record: The row (see :data:`~lightning_htsr.records.COLUMNS`).
        eigenvalues: Sorted float64 CPU tensor, or ``None`` for skipped matrices.
        powerlaw: Power-law fit, or ``None``.
        mp: Marchenko-Pastur fit, or ``None``.
        phase: Phase result, or ``None``.
        fit_settings: The :func:`~lightning_htsr.spectra.powerlaw.fit_scan` arguments that reproduce ``powerlaw`` from
            ``eigenvalues`` (``None`` where it is not a power-law search: truncated fits, ``xmin_peak``).
    """

    record: dict[str, Any]
    eigenvalues: Tensor | None = None
    powerlaw: PowerLawFit | None = None
    mp: MarchenkoPasturFit | None = None
    phase: PhaseResult | None = None
    fit_settings: dict[str, Any] | None = None

    def fit_scan(self, max_points: int = 1024) -> FitScan | None:
        """``D(xmin)`` and ``alpha(xmin)`` of this matrix's power-law fit (same fit, same numbers at its ``xmin``),
        for :func:`~lightning_htsr.fit_plots.plot_fit_diagnostics`; ``None`` without a power-law search."""
        if self.eigenvalues is None or self.fit_settings is None:
            return None
        return fit_scan(self.eigenvalues, **self.fit_settings, max_points=max_points)


def matrix_identity(matrix: WeightMatrix) -> dict[str, Any]:
    """The record columns that describe what a matrix is (name, type, shape, dtype, note)."""
    return {
        "name": matrix.name,
        "layer_type": matrix.layer_type,
        "module_type": matrix.module_type,
        "N": matrix.N,
        "M": matrix.M,
        "Q": matrix.Q,
        "num_slices": matrix.num_slices,
        "rf": matrix.num_slices,
        "num_evals": matrix.num_evals,
        "dtype": matrix.dtype,
        "note": matrix.note,
    }


def _scale(matrix: WeightMatrix, options: AnalysisOptions) -> float:
    scale = 1.0 / matrix.N if options.normalize else 1.0
    if options.ww_conv_scaling and matrix.layer_type == "conv2d":
        scale *= 0.5
    return scale


def _skipped(ident: dict[str, Any], reason: str, kind: SkipKind) -> dict[str, Any]:
    """The record of a matrix without a spectrum."""
    return empty_record(**ident, status="skipped", skip_reason=reason, skip_kind=kind.value)


def analyze_matrices(matrices: Sequence[WeightMatrix], options: AnalysisOptions | None = None) -> list[MatrixAnalysis]:
    """Analyze extracted matrices: eigenvalues in batches on their device, then fits, metrics and phase.

    Never raises on bad weights: problems become ``status="skipped"`` (no spectrum) or ``"degenerate"`` (a
    spectrum whose fit or entropy is undefined) with the reason in ``skip_reason``.

    Args:
        matrices: Output of :func:`~lightning_htsr.weights.modules.weight_matrices`.
        options: Conventions (default :class:`AnalysisOptions`).

    Returns:
        One :class:`MatrixAnalysis` per matrix, in order.
    """
    options = options or AnalysisOptions()
    todo = [m for m in matrices if m.skip_reason is None and m.slices is not None]
    spectra = compute_spectra(
        [m.slices for m in todo],  # type: ignore[misc]
        scales=[_scale(m, options) for m in todo],
        precision=options.precision,
        route=options.route,
        backend=options.backend,
        rank_eps=options.rank_eps,
    )
    by_name = {id(m): s for m, s in zip(todo, spectra)}
    out = []
    for matrix in matrices:
        spectrum = by_name.get(id(matrix))
        if spectrum is None:
            out.append(MatrixAnalysis(_skipped(matrix_identity(matrix), matrix.skip_reason or "not analyzed",
                                               matrix.skip_kind or SkipKind.UNREADABLE)))
        else:
            out.append(_analyze_spectrum(matrix, spectrum, options))
    return out


def _batches(matrices: Iterable[WeightMatrix], budget: int) -> Iterator[list[WeightMatrix]]:
    """Consecutive matrices grouped while their float32 size stays within ``budget`` bytes (at least one each)."""
    batch: list[WeightMatrix] = []
    size = 0
    for matrix in matrices:
        cost = 4 * matrix.slices.numel() if matrix.slices is not None else 0
        if batch and size + cost > budget:
            yield batch
            batch, size = [], 0
        batch.append(matrix)
        size += cost
    if batch:
        yield batch


def analyze_stream(
    matrices: Iterable[WeightMatrix],
    options: AnalysisOptions | None = None,
    *,
    batch_bytes: int = BATCH_BYTES,
    device: torch.device | str | None = None,
) -> Iterator[MatrixAnalysis]:
    """:func:`analyze_matrices` over a stream: batches within ``batch_bytes``, each dropped once analyzed.

    Peak memory is one batch (a single matrix when it is larger than the budget) plus the next matrix, upcast one
    batch at a time, whatever the number of matrices.

    Args:
        matrices: :class:`~lightning_htsr.weights.matrix.WeightMatrix` objects, e.g. a lazy iterator over a checkpoint.
        options: Conventions (default :class:`AnalysisOptions`).
        batch_bytes: Bytes of float32 weights per batched call.
        device: Move each batch there first (e.g. ``"cuda"``); ``None`` leaves the weights where they are.

    Yields:
        One :class:`MatrixAnalysis` per matrix, in order (their ``slices`` are released).
    """
    options = options or AnalysisOptions()
    for batch in _batches(matrices, batch_bytes):
        if device is not None:
            for matrix in batch:
                matrix.slices = matrix.slices.to(device) if matrix.slices is not None else None
        with torch.no_grad():
            results = analyze_matrices(batch, options)
        for matrix in batch:
            matrix.slices = None
        yield from results


def _extra_columns(matrix: WeightMatrix, spectrum: Spectrum, options: AnalysisOptions) -> dict[str, Any]:
    """The ``randomize=True`` columns (shuffled copies through the original's eigenvalue routine).

    Each matrix gets its own generator, seeded by ``options.seed`` and its name, so the shuffles do not depend on
    how matrices are batched or streamed.
    """
    if not options.randomize or matrix.slices is None:
        return {}
    key = zlib.crc32(matrix.name.encode())
    rng = np.random.default_rng(None if options.seed is None else [options.seed, key])
    return random_columns(spectrum.eigenvalues, matrix.slices, _scale(matrix, options), matrix.Q, matrix.M, rng,
                          precision=spectrum.precision, route=spectrum.route,
                          backend=options.backend, rank_eps=options.rank_eps)


def _analyze_spectrum(matrix: WeightMatrix, spectrum: Spectrum, options: AnalysisOptions) -> MatrixAnalysis:
    ident = matrix_identity(matrix)
    ident.update(precision=spectrum.precision, route=spectrum.route)
    if spectrum.error:
        return MatrixAnalysis(_skipped(ident, spectrum.error, spectrum.error_kind or SkipKind.SOLVER_FAILED))
    ev = spectrum.eigenvalues
    lam_max = float(ev[-1]) if ev.numel() else 0.0
    if lam_max <= 0.0:
        return MatrixAnalysis(_skipped(ident, "all-zero weights", SkipKind.ALL_ZERO), ev)
    ranks = rank_metrics(ev, spectrum.zero_tol)
    powerlaw, extra, settings = fit_tail(ev, options, spectrum.floor)
    norms = norm_metrics(ev, powerlaw.alpha)
    entropy = matrix_entropy(ev, ranks["matrix_rank"], epsilon=options.entropy_epsilon)
    phase = classify_phase(ev, matrix.N, matrix.M, num_slices=matrix.num_slices, zero_tol=spectrum.floor,
                           config=options.phase_config, powerlaw=powerlaw)
    problems = []
    if not powerlaw.ok:
        problems.append(f"power-law fit: {powerlaw.reason}")
    if math.isnan(entropy):
        problems.append(f"entropy undefined at rank {ranks['matrix_rank']}")
    record = empty_record(
        **ident,
        status="degenerate" if problems else "success",
        skip_reason="; ".join(problems),
        skip_kind=SkipKind.DEGENERATE.value if problems else "",
        alpha=powerlaw.alpha,
        D=powerlaw.D,
        xmin=powerlaw.xmin,
        xmax=powerlaw.xmax,
        sigma=powerlaw.sigma,
        num_pl_spikes=powerlaw.num_pl_spikes,
        warning=alpha_warning(powerlaw.alpha, weightwatcher_labels=options.warn_unclassified)
        if phase.phase is not None or options.warn_unclassified else "",
        entropy=entropy,
        **norms,
        **ranks,
        **esd_metrics(ev, sv_min=spectrum.sv_min, weak_tol=options.weak_rank_tol
                      if options.weak_rank_tol is not None else spectrum.zero_tol),
        **detx_metrics(ev, powerlaw.num_pl_spikes),
        **phase.diagnostics(),
    )
    record.update(extra, **_extra_columns(matrix, spectrum, options))  # optional columns, as in weightwatcher
    return MatrixAnalysis(record, ev, powerlaw, phase.mp, phase, settings)


def model_matrices(model: nn.Module, options: AnalysisOptions, *, include: Sequence[str] | str | None = None,
                    exclude: Sequence[str] | str | None = None, layer_types: Sequence[str | type] | None = None,
                    ww_compat: bool = False, lora: LoraMode = "merged") -> list[WeightMatrix]:
    """The matrices :func:`analyze` reports: :func:`~lightning_htsr.weights.modules.weight_matrices` with the options'
    size limits, or under ``ww_compat`` weightwatcher's own layer selection
    (:func:`~lightning_htsr.weights.ww_select.ww_select`, its ``N``, ``M`` and ``rf``)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. TypedStorage / lazy-module chatter while traversing
        matrices = weight_matrices(model, include=include, exclude=exclude, layer_types=layer_types,
                                   min_evals=0 if ww_compat else options.min_evals,
                                   max_evals=None if ww_compat else options.max_evals, lora=lora)
        if ww_compat:
            matrices = ww_select(model, matrices, min_evals=options.min_evals, max_evals=options.max_evals,
                                 max_n=options.max_N)
    return matrices


def records_table(records: list[dict[str, Any]], *, stacklevel: int = 4) -> pd.DataFrame:
    """The end of every offline front door: warn about bad weights (:func:`warn_bad_input`), then one table.

    Args:
        records: One analysis' records.
        stacklevel: Of the warning; the default points at the caller of the front door that calls this.

    Returns:
        :func:`~lightning_htsr.records.records_to_frame` of the records.
    """
    warn_bad_input(records, stacklevel=stacklevel)
    return records_to_frame(records)


def resolve_options(options: AnalysisOptions | None = None, *, ww_compat: bool = False, fit: FitKind = "fast",
                    min_tail: int | None = None, precision: Precision = "auto", backend: Backend = "torch",
                    min_evals: int | None = None, max_evals: int | None = None,
                    phase_config: PhaseConfig | None = None, fix_fingers: str | None = None,
                    randomize: bool = False, seed: int | None = None,
                    xmax: int | float | None = None,  # noqa: PYI041 - an int and a float mean different things
                    max_fingers: int | None = None, finger_thresh: float | None = None,
                    max_N: int | None = None) -> AnalysisOptions:
    """The :class:`AnalysisOptions` of the conventions every front door takes (:func:`analyze`,
    :func:`analyze_state_dict`, :func:`~lightning_htsr.analyze_checkpoint`, the CLI and
    :class:`~lightning_htsr.HTSRCallback`); the options are checked once, in :class:`AnalysisOptions`.

    Args:
        options: Full :class:`AnalysisOptions`; returned as they are, overriding every other argument.
        ww_compat: weightwatcher 0.7.7's conventions (:meth:`AnalysisOptions.weightwatcher`), so that ``alpha, D,
            xmin, log_norm, log_spectral_norm, stable_rank, entropy`` match ``WeightWatcher(model=m).analyze()`` on
            CPU; ``fit`` and ``precision`` are then weightwatcher's.
        fit: Power-law search, ``"fast"`` (default) or ``"exact"``.
        min_tail: Smallest power-law tail (default 10; 2 under ``ww_compat``).
        precision: ``"auto"`` (float32 where accurate enough, float64 where not), ``"float32"`` or ``"float64"``.
        backend: ``"torch"`` or ``"cupy"`` (CUDA only; ``pip install -e ".[cupy]"``).
        min_evals: The one minimum spectrum size: matrices with fewer non-zero eigenvalues get no phase and stay out
            of the model-level means (it sets ``phase_config.min_evals``, default 50). Below the power-law fit's
            own floor (:attr:`AnalysisOptions.min_evals`: 10 eigenvalues, or ``min_evals`` if smaller) a matrix
            is skipped. Under ``ww_compat`` also weightwatcher's ``min_evals`` (layers below it skipped; default 8).
        max_evals: Skip matrices with more pooled eigenvalues (default: no limit; 15000 under ``ww_compat``).
        phase_config: Phase-classifier thresholds.
        fix_fingers: weightwatcher's options from here on, the :class:`AnalysisOptions` fields of the same names
            (also ``randomize``, ``seed``, ``xmax``, ``max_fingers``, ``finger_thresh``, ``max_N``). Those given
            (not ``None``; ``randomize`` when true) are applied over ``options`` too.

    Example:
        >>> o = resolve_options(min_evals=20)
        >>> o.phase_config.min_evals, o.min_evals
        (20, 10)
        >>> resolve_options(ww_compat=True, xmax=-2, max_N=4096).xmax
        -2
    """
    ww_options = {"fix_fingers": fix_fingers, "randomize": randomize, "seed": seed, "xmax": xmax,
                  "max_fingers": max_fingers, "finger_thresh": finger_thresh, "max_N": max_N}
    given = {k: v for k, v in ww_options.items() if v is not None and v is not False}
    if options is not None:
        return replace(options, **given) if given else options
    base = AnalysisOptions.weightwatcher() if ww_compat else AnalysisOptions()
    changes: dict[str, Any] = {"precision": precision if not ww_compat else base.precision, "backend": backend}
    if not ww_compat or fit in TPL_FITS:
        changes["fit"] = fit
    config = phase_config if phase_config is not None else base.phase_config
    if min_evals is not None:
        config = replace(config, min_evals=min_evals)
    changes["min_evals"] = (min_evals if min_evals is not None else base.min_evals) if ww_compat else \
        min(base.min_evals, config.min_evals)
    changes["phase_config"] = config
    for key, value in (("min_tail", min_tail), ("max_evals", max_evals)):
        if value is not None:
            changes[key] = value
    return replace(base, **changes, **given)


#: How records without a ``skip_kind`` column (built by hand, or read from files written before it existed) are
#: recognized as routine skips: by words of the ``skip_reason`` messages of that time.
_LEGACY_ROUTINE_WORDS = ("min_evals", "max_evals", "max_N", "a single column", "weightwatcher 0.7.7 does not analyze")


def is_routine_skip(record: Mapping[str, Any]) -> bool:
    """Whether a record was skipped for its size or by ``ww_compat``'s selection (its :class:`SkipKind` is
    routine), not because of its weights.

    Example:
        >>> is_routine_skip({"status": "skipped", "skip_kind": "too_few_evals", "skip_reason": "any wording"})
        True
    """
    if "skip_kind" not in record:
        return any(word in (record.get("skip_reason") or "") for word in _LEGACY_ROUTINE_WORDS)
    try:
        return SkipKind(record["skip_kind"]).routine
    except ValueError:  # "" (analyzed, or an error the analysis recorded) or a missing value read back from a file
        return False


def bad_input_rows(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records skipped or degenerate because of their weights (not merely their size; see :func:`is_routine_skip`)."""
    return [r for r in records if r["status"] != "success" and not is_routine_skip(r)]


def _low_precision_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records analyzed from weights whose stored precision blurs the ESD (8-bit floats, integer-quantized)."""
    return [r for r in records if r["status"] == "success" and str(r.get("note") or "").startswith(LOW_PRECISION)]


def warn_bad_input(
    records: Iterable[dict[str, Any]],
    *,
    who: str = "lightning-htsr",
    seen: set[str] | None = None,
    stacklevel: int = 3,
) -> None:
    """Warn about every matrix whose weights could not be analyzed (or only partly), and why.

    One ``UserWarning`` lists the skipped and degenerate matrices with their ``skip_reason`` (size-based skips such
    as ``min_evals`` are routine and left out); a second one lists matrices analyzed from low-precision weights
    (8-bit floats, integer-quantized) with the ``note`` saying what that does to the ESD.

    Args:
        records: Records of one analysis.
        who: Start of the message.
        seen: ``"name|reason"`` keys already warned about; they are left out and new ones added (the callback keeps
            one set per run, so a matrix that stays bad for many epochs is reported once).
        stacklevel: Passed to ``warnings.warn``.
    """
    records = list(records)
    for rows, reason_key, what in (
        (bad_input_rows(records), "skip_reason", "weight matrices not fully analyzed"),
        (_low_precision_rows(records), "note", "weight matrices analyzed from low-precision weights"),
    ):
        if seen is not None:
            rows = [r for r in rows if f"{r['name']}|{r[reason_key]}" not in seen]
            seen.update(f"{r['name']}|{r[reason_key]}" for r in rows)
        if not rows:
            continue
        shown = "; ".join(f"{r['name']} ({r['status']}: {r[reason_key]})" for r in rows[:8])
        more = f"; and {len(rows) - 8} more" if len(rows) > 8 else ""
        warnings.warn(f"{who}: {len(rows)} {what}: {shown}{more}", UserWarning, stacklevel=stacklevel)
