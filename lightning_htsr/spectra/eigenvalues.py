"""Stage 2 of the pipeline: weight matrices -> eigenvalues (the ESD).

The eigenvalues of ``W^T W`` are computed on the weights' own device under ``no_grad``, never by copying weights to
the host. Two routes give the same numbers:

* ``"gram"``: form the Gram matrix of the smaller side, ``W^T W`` (``M x M`` for a tall ``N x M`` slice), and call
  ``torch.linalg.eigvalsh``. Gram matrices of equal size are stacked into one batched call, whatever the shapes of
  the weights they came from. On one CPU thread this is 2-3x faster than ``svdvals`` for every shape measured
  (``benchmarks/bench_analyze.py`` prints the table), and the default. On the CPU the Gram matrix is formed by BLAS
  ``?syrk`` (SciPy), which computes only the triangle ``eigvalsh`` reads: half the flops of a matrix product.
* ``"svd"``: ``torch.linalg.svdvals`` squared. Slower; exact down to ``eps * sigma_max`` in singular values, so it is
  what the weightwatcher-compatible mode uses to reproduce ranks of rank-deficient matrices.

Precision policy. fp16/bf16 weights are upcast (LAPACK/cuSOLVER have no half-precision eigensolvers). With
``precision="auto"`` (default) the Gram route runs in float32, whose eigenvalues carry an absolute error of about
``2 sqrt(M) eps32 lambda_max`` (measured: 7e-6 lambda_max at M = 1024). That is accurate for every metric computed
from the bulk and the tail; only eigenvalues below the *resolution floor* ``8 sqrt(M) eps lambda_max`` are
indistinguishable from zero. When more than 1 % of a matrix's spectrum lies under that floor (heavy-tailed spectra
spanning many decades, rank collapse) or the float32 Gram overflows, that matrix is recomputed in float64. On the
CPU, a matrix whose aspect ratio alone predicts a redo (nearly square: the Marchenko-Pastur bulk of ``Q = 1`` puts
0.5-1 % of its eigenvalues under the float32 floor) goes to float64 directly. Float64 weights are always computed
in float64; ``precision="float64"`` forces it for all.

``backend="cupy"`` runs the same Gram + ``eigvalsh`` through CuPy on CUDA tensors, handed over zero-copy with DLPack.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController
from torch import Tensor

from ..weights.matrix import SkipKind, tall
from .marchenko_pastur import mp_cdf, mp_support

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Precision",
    "Route",
    "Spectrum",
    "compute_spectra",
    "default_zero_tol",
    "eigenvalues",
    "resolution_floor",
]

Precision = Literal["auto", "float32", "float64"]
Route = Literal["auto", "gram", "svd"]
Backend = Literal["torch", "cupy"]

#: Gram-route eigenvalues below ``RESOLUTION_FACTOR * sqrt(M) * eps * lambda_max`` are numerical zeros
#: (4x the error measured on Gaussian matrices, which is ``~2 sqrt(M) eps lambda_max``).
RESOLUTION_FACTOR = 8.0
#: Under ``precision="auto"``, a float32 spectrum with more than this fraction below the floor is redone in float64.
AUTO_FLOAT64_FRACTION = 0.01
#: CPU Gram matrices of at least this size come from BLAS ``syrk`` one slice at a time; smaller ones from one batched
#: matrix product (measured crossover on one core: ~128).
SYRK_MIN_SIZE = 128
#: Upper bound on the bytes of one batched ``eigvalsh`` input; larger stacks are split.
MAX_BATCH_BYTES = 256 * 2**20


class BackendUnavailableError(ImportError):
    """The requested backend cannot run here (package or device missing); the message says what to install."""


@dataclass
class Spectrum:
    """Eigenvalues of one (pooled) matrix, on the host in float64, sorted ascending.

    Attributes:
        eigenvalues: ``(num_slices * M,)`` float64 CPU tensor, scaled by the caller's factor; negative round-off
            is clipped to 0.
        precision: ``"float32"`` or ``"float64"``: the arithmetic actually used.
        route: ``"gram"`` or ``"svd"``.
        zero_tol: Eigenvalues ``<= zero_tol`` count as zero for ``matrix_rank``: the larger of the route's
            resolution floor and NumPy's rank tolerance ``(max(N, M) * eps * sigma_max)^2``.
        floor: The route's resolution floor alone (:func:`resolution_floor`): eigenvalues below it are noise.
            Fits and the phase classifier use this one; NumPy's tolerance is relative to ``sigma_max`` and would
            call the bulk of a very heavy-tailed matrix "zero".
        error: Empty, or why the eigenvalues could not be computed (non-finite weights, solver failure).
        sv_min: The largest over the slices of each slice's smallest singular value (``sqrt`` of its smallest
            scaled eigenvalue): weightwatcher's ``sv_min``.
        error_kind: The :class:`~lightning_htsr.weights.matrix.SkipKind` of ``error`` (``None`` without one).
    """

    eigenvalues: Tensor
    precision: str
    route: str
    zero_tol: float
    floor: float = math.nan
    error: str = ""
    sv_min: float = math.nan
    error_kind: SkipKind | None = None

    @property
    def ok(self) -> bool:
        """Whether eigenvalues were computed."""
        return not self.error


def _compute_dtype(stack: Tensor, precision: Precision, route: str) -> torch.dtype:
    """The first arithmetic tried for one matrix (``precision="auto"`` may still redo a float32 one in float64)."""
    if precision == "float64" or stack.dtype == torch.float64:
        return torch.float64
    if precision == "auto" and route == "gram" and _float64_up_front(stack):
        return torch.float64
    return torch.float32


def resolution_floor(lambda_max: float, M: int, dtype: torch.dtype, route: str) -> float:
    """Absolute eigenvalue below which a route's results are indistinguishable from zero.

    Args:
        lambda_max: Largest eigenvalue of the matrix (same units as the eigenvalues).
        M: Size of the Gram matrix (the smaller side of one slice).
        dtype: Arithmetic used (``torch.float32`` or ``torch.float64``).
        route: ``"gram"`` (floor ``8 sqrt(M) eps lambda_max``) or ``"svd"`` (floor ``(8 eps)^2 lambda_max``).

    Returns:
        The floor, in the units of ``lambda_max``.
    """
    eps = torch.finfo(dtype).eps
    if route == "gram":
        return RESOLUTION_FACTOR * math.sqrt(M) * eps * lambda_max
    return (RESOLUTION_FACTOR * eps) ** 2 * lambda_max


def check_choice(name: str, value: object, choices: Any) -> None:
    """Raise a ``ValueError`` naming the allowed values unless ``value`` is one of ``choices`` (a ``Literal`` type,
    e.g. :data:`Precision`, or a sequence): the one check of the shared options.

    Example:
        >>> check_choice("precision", "float16", Precision)
        Traceback (most recent call last):
        ...
        ValueError: precision must be 'auto', 'float32' or 'float64', got 'float16'
    """
    allowed = get_args(choices) or tuple(choices)
    if value not in allowed:
        quoted = [repr(c) for c in allowed]
        raise ValueError(f"{name} must be {', '.join(quoted[:-1])} or {quoted[-1]}, got {value!r}")


def default_zero_tol(lambda_max: float, n: int, dtype: torch.dtype | np.dtype | type) -> float:
    """Numerical-zero threshold for bare eigenvalues whose solver is unknown (the functional API's default).

    The Gram route's resolution floor ``8 sqrt(n) eps lambda_max`` (:func:`resolution_floor`, what the records
    use for a single matrix) with ``eps`` of the eigenvalues' own dtype: float32 eigenvalues
    (``eigenvalues(w, precision="float32")``) keep the float32 floor, so noise below it is not fitted. Non-float
    dtypes count as float64.

    Example:
        >>> default_zero_tol(1.0, 100, torch.float32) > default_zero_tol(1.0, 100, torch.float64)
        True
    """
    if isinstance(dtype, torch.dtype):
        eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    else:
        kind = np.dtype(dtype)
        eps = float(np.finfo(kind).eps) if kind.kind == "f" else float(np.finfo(np.float64).eps)
    return RESOLUTION_FACTOR * math.sqrt(max(n, 1)) * eps * lambda_max


def _numpy_rank_tol(lambda_max: float, N: int, eps: float) -> float:
    """``np.linalg.matrix_rank``'s tolerance ``sigma_max * max(N, M) * eps``, expressed on eigenvalues."""
    return lambda_max * (N * eps) ** 2


def _rank_eps(weight_dtype: torch.dtype) -> float:
    """Machine epsilon of the weights as NumPy's ``matrix_rank`` would see them (half precision counts as float32:
    the upcast values are exact, so their rank is that of a float32 matrix)."""
    return torch.finfo(torch.float64 if weight_dtype == torch.float64 else torch.float32).eps


def _eigvalsh(grams: Tensor, cupy) -> Tensor:  # noqa: ANN001 - the cupy module, or None for torch
    if cupy is not None:
        return torch.from_dlpack(cupy.linalg.eigvalsh(cupy.from_dlpack(grams.contiguous())))
    return torch.linalg.eigvalsh(grams)


def _gram(stack: Tensor, cupy, out: Tensor | None = None) -> Tensor:  # noqa: ANN001 - cupy module or None
    """``W^T W`` per slice (only its lower triangle is meaningful: ``eigvalsh`` reads no other); with ``out``
    (torch only) written into it instead of a new tensor."""
    if cupy is not None:
        w = cupy.from_dlpack(stack.contiguous())
        return torch.from_dlpack(cupy.matmul(w.transpose(0, 2, 1), w))
    if _syrk_applies(stack):
        out = torch.zeros(stack.shape[0], stack.shape[-1], stack.shape[-1], dtype=stack.dtype) if out is None else out
        with _blas_threads_like_torch():
            for w, g in zip(stack, out):
                _syrk_lower(w, g)
        return out
    return torch.matmul(stack.transpose(-1, -2), stack, out=out)


def _syrk_applies(stack: Tensor) -> bool:
    """CPU float matrices large enough that the saved flops outweigh one BLAS call per slice."""
    return (stack.device.type == "cpu" and stack.dtype in (torch.float32, torch.float64)
            and stack.shape[-1] >= SYRK_MIN_SIZE)


def _syrk_lower(w: Tensor, out: Tensor) -> None:
    """Lower triangle of ``out`` := ``w^T w`` for one ``(N, M)`` CPU slice, by BLAS ``?syrk``.

    ``syrk`` computes one triangle of a symmetric product: half the flops of the matrix product torch would run
    (measured on one core at M = 4096: float64 1.8 s instead of 3.6 s, float32 0.8 s instead of 2.0 s). Both
    operands are handed to SciPy's BLAS as Fortran-ordered views, so nothing is copied when ``w`` is contiguous in
    either orientation.
    """
    syrk = blas.dsyrk if w.dtype == torch.float64 else blas.ssyrk
    a = w.detach().numpy()
    target = out.numpy().T  # Fortran-ordered view of out^T: its upper triangle is out's lower triangle
    if a.flags.f_contiguous:  # a^T a with a read in Fortran order
        result = syrk(1.0, a, trans=1, lower=0, c=target, overwrite_c=1)
    else:  # (a^T)(a^T)^T with a^T, a Fortran-ordered view of a C-ordered a
        result = syrk(1.0, a.T, trans=0, lower=0, c=target, overwrite_c=1)
    if not np.shares_memory(result, target):  # f2py made a copy after all
        target[...] = result


def _blas_threads_like_torch():  # noqa: ANN202 - a context manager
    """SciPy's BLAS (the CPU Gram products) limited to torch's intra-op thread count, so that ``--threads`` and
    ``torch.set_num_threads`` govern both libraries and several processes do not oversubscribe the cores."""
    return _scipy_blas_pools().limit(limits=torch.get_num_threads())


@functools.cache
def _scipy_blas_pools():  # noqa: ANN202 - threadpoolctl's controller
    """The BLAS thread pools loaded so far (SciPy's among them), found once: a fresh scan costs ~6 ms per call."""
    return ThreadpoolController().select(user_api="blas")


def _cupy_for(tensors: Sequence[Tensor]):  # noqa: ANN202 - returns the cupy module
    """CuPy, once it is known to be importable, to see a device, and that every tensor is on CUDA."""
    cupy = _import_cupy()
    for t in tensors:
        if t.device.type != "cuda":
            raise BackendUnavailableError("backend='cupy' needs CUDA tensors; these are on " + str(t.device))
    return cupy


def _import_cupy():  # noqa: ANN202 - returns the cupy module
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError as err:
        raise BackendUnavailableError(
            "backend='cupy' needs CuPy: install the extra with `pip install -e '.[cupy]'` from a checkout "
            "(CuPy for CUDA 12), or use backend='torch'."
        ) from err
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CuPy raises its own CUDARuntimeError without a driver
        raise BackendUnavailableError(f"backend='cupy' needs a CUDA device, but CuPy sees none ({err}).") from err
    if count < 1:
        raise BackendUnavailableError("backend='cupy' needs a CUDA device, but CuPy sees none.")
    return cupy


def _raw_eigenvalues(
    stacks: Sequence[Tensor], dtypes: Sequence[torch.dtype], route: str, backend: Backend
) -> list[Tensor]:
    """Device-side eigenvalues (unsorted, one flat tensor per matrix), batched by Gram size.

    Raises whatever the solver raises (non-finite input makes LAPACK/cuSOLVER fail to converge); the caller then
    retries the matrices one by one to find the bad one, so the common path has no extra pass over the weights.
    """
    work = [stack.to(dtype) for stack, dtype in zip(stacks, dtypes)]
    if route == "svd":
        return [(torch.linalg.svdvals(w) ** 2).reshape(-1) for w in work]
    cupy = _cupy_for(work) if backend == "cupy" else None
    results: list[Tensor | None] = [None] * len(work)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, w in enumerate(work):
        groups[(w.shape[-1], w.dtype, w.device)].append(i)
    for (m, dtype, device), members in groups.items():
        per_matrix = [work[i].shape[0] for i in members]
        if cupy is None and len(members) > 1:
            # Write each Gram straight into the batch (no torch.cat copy of the whole stack afterwards).
            batch = (torch.zeros if _syrk_applies(work[members[0]]) else torch.empty)(
                (sum(per_matrix), m, m), dtype=dtype, device=device)
            for i, start, rows in zip(members, itertools.accumulate([0, *per_matrix[:-1]]), per_matrix):
                _gram(work[i], None, out=batch[start : start + rows])
        else:
            grams = [_gram(work[i], cupy) for i in members]
            batch = grams[0] if len(grams) == 1 else torch.cat(grams)
        rows = max(1, MAX_BATCH_BYTES // (m * m * batch.element_size()))
        values = torch.cat([_eigvalsh(batch[s : s + rows], cupy) for s in range(0, batch.shape[0], rows)])
        for i, part in zip(members, torch.split(values, per_matrix)):
            results[i] = part.reshape(-1)
    return [r for r in results if r is not None]


@torch.no_grad()
def compute_spectra(
    stacks: Sequence[Tensor],
    *,
    scales: Sequence[float] | None = None,
    precision: Precision = "auto",
    route: Route = "auto",
    backend: Backend = "torch",
    rank_eps: float | None = None,
) -> list[Spectrum]:
    """Eigenvalues of many matrices at once, batched, with one host transfer for all of them.

    Args:
        stacks: ``(num_slices, N, M)`` tensors with ``N >= M`` (see
            :class:`~lightning_htsr.weights.matrix.WeightMatrix`), on any device.
        scales: Factor applied to each matrix's eigenvalues (``1 / N`` for the ``X = W^T W / N`` convention).
        precision: ``"auto"``, ``"float32"`` or ``"float64"`` (see the module docstring).
        route: ``"auto"`` (Gram + ``eigvalsh``), ``"gram"`` or ``"svd"``.
        backend: ``"torch"`` or ``"cupy"``.
        rank_eps: Machine epsilon of NumPy's rank tolerance ``sigma_max * N * eps``; ``None`` takes it from each
            weight's dtype (float32 for half precision). weightwatcher uses float64's.

    Returns:
        One :class:`Spectrum` per input, in order.
    """
    check_choice("precision", precision, Precision)
    check_choice("route", route, Route)
    check_choice("backend", backend, Backend)
    scales = list(scales) if scales is not None else [1.0] * len(stacks)
    chosen = "svd" if route == "svd" else "gram"
    dtypes = [_compute_dtype(s, precision, chosen) for s in stacks]
    epsilons = [rank_eps if rank_eps is not None else _rank_eps(s.dtype) for s in stacks]
    spectra = _solve(stacks, dtypes, scales, epsilons, chosen, backend)
    if precision == "auto" and chosen == "gram":
        redo = [i for i, sp in enumerate(spectra) if sp.precision == "float32" and _needs_float64(sp)]
        if redo:
            again = _solve([stacks[i] for i in redo], [torch.float64] * len(redo), [scales[i] for i in redo],
                           [epsilons[i] for i in redo], chosen, backend)
            for i, sp in zip(redo, again):
                spectra[i] = sp
    return spectra


def _float64_up_front(stack: Tensor) -> bool:
    """Whether ``precision="auto"`` should skip the float32 attempt for this CPU matrix and go to float64 at once.

    The Marchenko-Pastur law of the matrix's aspect ratio ``Q = N / M`` predicts how much of a random bulk falls
    under the float32 resolution floor even when ``lambda_max`` is at the bulk edge; heavy tails and spikes only
    raise the floor. Where that prediction is already half the redo threshold (``Q`` near 1: 0.50 % at M = 256,
    0.99 % at M = 4096), the float32 pass is usually thrown away, and on a CPU it costs 60-70 % of the float64 one.
    On GPUs float32 is far cheaper than float64, so there the float32 pass is always tried first.
    """
    if stack.device.type != "cpu":
        return False
    n_rows, m_cols = stack.shape[-2:]
    return _redo_predicted(int(n_rows), int(m_cols))


@functools.lru_cache(maxsize=1024)
def _redo_predicted(n_rows: int, m_cols: int) -> bool:

    if m_cols < 2:
        return False
    Q = n_rows / m_cols
    _, edge = mp_support(Q)
    floor = resolution_floor(edge, m_cols, torch.float32, "gram")
    return float(mp_cdf(floor, Q)) >= AUTO_FLOAT64_FRACTION / 2


def _needs_float64(spectrum: Spectrum) -> bool:
    """Whether a float32 Gram-route spectrum must be redone in float64 (its ``floor`` is the float32 one)."""
    if spectrum.error_kind is SkipKind.SOLVER_FAILED:  # overflow or solver failure in single precision
        return True
    if spectrum.error:
        return False
    return float((spectrum.eigenvalues <= spectrum.floor).double().mean()) > AUTO_FLOAT64_FRACTION


def _solve(
    stacks: Sequence[Tensor],
    dtypes: Sequence[torch.dtype],
    scales: Sequence[float],
    epsilons: Sequence[float],
    route: str,
    backend: Backend,
) -> list[Spectrum]:
    try:
        raw = _raw_eigenvalues(stacks, dtypes, route, backend)
    except BackendUnavailableError:
        raise
    except (RuntimeError, torch.linalg.LinAlgError) as err:
        if len(stacks) == 1:
            return [_failure(stacks[0], dtypes[0], route, f"eigensolver failed: {err}")]
        # One bad matrix must not take the others down: retry one at a time.
        return [
            sp
            for i in range(len(stacks))
            for sp in _solve([stacks[i]], [dtypes[i]], [scales[i]], [epsilons[i]], route, backend)
        ]
    # The single host transfer: every eigenvalue of every matrix in one copy.
    sizes = [r.numel() for r in raw]
    values = torch.cat([r.to(torch.float64) for r in raw]).cpu() if raw else torch.zeros(0, dtype=torch.float64)
    out: list[Spectrum] = []
    for i, part in enumerate(torch.split(values, sizes)):
        dtype = dtypes[i]
        if not bool(torch.isfinite(part).all()):  # some solvers return NaN instead of raising
            out.append(_failure(stacks[i], dtype, route, "non-finite eigenvalues"))
            continue
        scaled = part.clamp(min=0.0) * scales[i]
        ev = torch.sort(scaled).values
        lam_max = float(ev[-1]) if ev.numel() else 0.0
        n_rows, m_cols = stacks[i].shape[-2:]
        floor = resolution_floor(lam_max, m_cols, dtype, route)
        tol = max(floor, _numpy_rank_tol(lam_max, n_rows, epsilons[i]))
        sv_min = math.sqrt(float(scaled.reshape(stacks[i].shape[0], -1).min(dim=1).values.max())) if ev.numel() \
            else math.nan
        out.append(Spectrum(ev, _dtype_name(dtype), route, tol, floor, sv_min=sv_min))
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "float64"


def _failure(stack: Tensor, dtype: torch.dtype, route: str, detail: str) -> Spectrum:
    """Explain a failed matrix. Only now are its weights scanned for NaN/Inf (the rare path pays for it)."""
    empty = torch.zeros(0, dtype=torch.float64)
    if not bool(torch.isfinite(stack).all()):
        return Spectrum(empty, _dtype_name(dtype), route, math.nan, math.nan, "non-finite weights (NaN or Inf)",
                        error_kind=SkipKind.NON_FINITE)
    # Finite weights: single-precision overflow or a solver failure; in float32 the auto policy redoes it in float64.
    return Spectrum(empty, _dtype_name(dtype), route, math.nan, math.nan, f"{_dtype_name(dtype)} {detail}",
                    error_kind=SkipKind.SOLVER_FAILED)


def eigenvalues(
    weight: Tensor,
    *,
    normalize: bool = True,
    precision: Precision = "auto",
    route: Route = "auto",
    backend: Backend = "torch",
) -> Tensor:
    """Eigenvalues of ``X = W^T W / N`` (or of ``W^T W`` with ``normalize=False``) for one weight.

    Args:
        weight: A 2-D matrix in any orientation, or a ``(num_slices, rows, cols)`` stack whose slice spectra are
            pooled (e.g. a convolution's kernel positions).
        normalize: Divide by ``N``, the larger side of a slice (the Marchenko-Pastur convention). weightwatcher
            does not.
        precision: See the module docstring.
        route: ``"auto"``, ``"gram"`` or ``"svd"``.
        backend: ``"torch"`` or ``"cupy"``.

    Returns:
        Sorted (ascending) CPU tensor of ``num_slices * min(rows, cols)`` eigenvalues in the precision they were
        computed in (float32 or float64; the exact values, no rounding), so that
        :func:`~lightning_htsr.spectra.powerlaw.fit_power_law` and
        :func:`~lightning_htsr.spectra.phases.classify_phase` apply that precision's resolution floor.

    Raises:
        ValueError: If the weight is not 2-D or 3-D, or contains NaN/Inf.

    Example:
        >>> import torch
        >>> w = torch.randn(400, 100, generator=torch.Generator().manual_seed(0))
        >>> ev = eigenvalues(w)
        >>> ev.shape, round(float(ev.mean()), 1)  # mean of the MP law with unit-variance entries is 1
        (torch.Size([100]), 1.0)
    """
    if weight.dim() == 2:
        weight = weight.unsqueeze(0)
    if weight.dim() != 3:
        raise ValueError(f"expected a 2-D matrix or a 3-D stack of slices, got shape {tuple(weight.shape)}")
    stack = tall(weight.detach())
    scale = 1.0 / stack.shape[-2] if normalize else 1.0
    spectrum = compute_spectra([stack], scales=[scale], precision=precision, route=route, backend=backend)[0]
    if spectrum.error:
        raise ValueError(spectrum.error)
    return spectrum.eigenvalues.to(torch.float32 if spectrum.precision == "float32" else torch.float64)
