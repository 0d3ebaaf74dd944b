"""Eigenvalue stage: routes, batching, precision policy, devices and backends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_htsr.spectra import synthetic
from lightning_htsr.spectra.eigenvalues import (
    AUTO_FLOAT64_FRACTION,
    BackendUnavailableError,
    compute_spectra,
    eigenvalues,
    resolution_floor,
)


def reference(w: torch.Tensor) -> np.ndarray:
    return np.sort(np.linalg.svd(w.double().numpy(), compute_uv=False) ** 2)


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (200, 200)])
@pytest.mark.parametrize("route", ["gram", "svd"])
def test_routes_agree_with_numpy_svd(shape: tuple[int, int], route: str) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ev = eigenvalues(w, normalize=False, precision="float64", route=route).numpy()
    np.testing.assert_allclose(ev, reference(w), rtol=1e-9, atol=1e-9 * ev.max())
    ev32 = eigenvalues(w, normalize=False, precision="float32", route=route).numpy()
    np.testing.assert_allclose(ev32, reference(w), atol=1e-5 * ev.max())


def test_normalization_divides_by_the_larger_side() -> None:
    w = torch.randn(50, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.testing.assert_allclose(eigenvalues(w).numpy(), reference(w) / 400, rtol=1e-6)


def test_stack_of_slices_is_pooled() -> None:
    stack = torch.randn(9, 64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pooled = np.sort(np.concatenate([reference(s) for s in stack]))
    np.testing.assert_allclose(eigenvalues(stack, normalize=False).numpy(), pooled, rtol=1e-9, atol=1e-12)


def test_batched_equals_one_at_a_time() -> None:
    g = torch.Generator().manual_seed(1)
    stacks = [torch.randn(1, 256, 64, generator=g), torch.randn(1, 512, 64, generator=g),
              torch.randn(4, 100, 64, generator=g), torch.randn(1, 80, 40, generator=g)]
    together = compute_spectra(stacks)
    for stack, spectrum in zip(stacks, together):
        alone = compute_spectra([stack])[0]
        torch.testing.assert_close(spectrum.eigenvalues, alone.eigenvalues, rtol=1e-5, atol=1e-6)


def test_half_precision_weights_are_upcast() -> None:
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16):
        rounded = w.to(dtype)
        got = eigenvalues(rounded).numpy()
        np.testing.assert_allclose(got, reference(rounded.float()) / 256, atol=1e-5 * got.max())


def test_auto_precision_keeps_float32_for_well_conditioned_matrices() -> None:
    w = torch.randn(1024, 256, generator=torch.Generator().manual_seed(0))
    assert compute_spectra([w.unsqueeze(0)])[0].precision == "float32"


def test_auto_precision_redoes_heavy_tails_in_float64() -> None:
    """Pareto(mu=0.8) spans more decades than float32 Gram resolves: most of the spectrum is under the floor."""
    w = synthetic.pareto(1000, 500, 0.8, seed=0)
    spectrum = compute_spectra([w.unsqueeze(0)], scales=[1e-3])[0]
    assert spectrum.precision == "float64"
    forced32 = compute_spectra([w.unsqueeze(0)], precision="float32")[0]
    below = float((forced32.eigenvalues <= forced32.floor).double().mean())
    assert below > AUTO_FLOAT64_FRACTION
    truth = reference(w)
    top = spectrum.eigenvalues.numpy()[-50:] / 1e-3
    np.testing.assert_allclose(top, truth[-50:], rtol=1e-8)


def test_float32_overflow_is_recomputed_in_float64() -> None:
    w = torch.full((64, 32), 3e20) + torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 1e19
    spectrum = compute_spectra([w.unsqueeze(0)])[0]
    assert spectrum.ok and spectrum.precision == "float64"
    assert float(spectrum.eigenvalues[-1]) == pytest.approx(reference(w)[-1], rel=1e-6)


def test_non_finite_matrix_does_not_spoil_the_batch() -> None:
    g = torch.Generator().manual_seed(0)
    good, bad = torch.randn(1, 100, 50, generator=g), torch.randn(1, 100, 50, generator=g)
    bad[0, 3, 4] = float("nan")
    spectra = compute_spectra([good, bad, good.clone()])
    assert spectra[0].ok and spectra[2].ok
    assert not spectra[1].ok and "non-finite" in spectra[1].error
    torch.testing.assert_close(spectra[0].eigenvalues, spectra[2].eigenvalues)


def test_rank_tolerance_and_floor() -> None:
    rank3 = torch.randn(200, 3, dtype=torch.float64) @ torch.randn(3, 100, dtype=torch.float64)
    for precision in ("float32", "float64"):
        spectrum = compute_spectra([rank3.unsqueeze(0).float()], precision=precision)[0]
        assert int((spectrum.eigenvalues > spectrum.zero_tol).sum()) == 3
        assert spectrum.floor <= spectrum.zero_tol
    lam = 7.0
    assert resolution_floor(lam, 100, torch.float32, "gram") == pytest.approx(
        8 * 10 * torch.finfo(torch.float32).eps * lam
    )
    assert resolution_floor(lam, 100, torch.float64, "svd") < resolution_floor(lam, 100, torch.float64, "gram")


def test_square_random_matrix_rank_in_each_precision() -> None:
    """float32 Gram cannot resolve the smallest ~0.5 % of a square random spectrum; float64 resolves them all."""
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    s64 = compute_spectra([w.unsqueeze(0)], precision="float64")[0]
    assert int((s64.eigenvalues <= s64.zero_tol).sum()) == 0
    s32 = compute_spectra([w.unsqueeze(0)], precision="float32")[0]
    assert int((s32.eigenvalues <= s32.zero_tol).sum()) <= 0.01 * 512


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_gram_by_syrk_matches_the_matrix_product_in_every_layout(dtype: torch.dtype) -> None:
    """The CPU Gram comes from BLAS syrk (one triangle): same eigenvalues for C- and Fortran-ordered weights, for
    strided views, for stacks batched together, and for parameters that require grad."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 300, 70, generator=g, dtype=dtype)
    layouts = [w, w.transpose(-1, -2).contiguous().transpose(-1, -2), w[:, ::2, :],
               torch.nn.Parameter(w.clone())]
    eps = torch.finfo(dtype).eps
    for stack in layouts:
        got = compute_spectra([stack], precision="float32" if dtype == torch.float32 else "float64")[0]
        ref = np.sort(np.concatenate([reference(s.detach()) for s in stack]))
        np.testing.assert_allclose(got.eigenvalues.numpy(), ref, atol=64 * math.sqrt(70) * eps * ref.max())


def test_square_cpu_matrices_skip_the_float32_attempt_under_auto() -> None:
    """Q = 1 puts 0.5-1 % of a Marchenko-Pastur bulk under the float32 floor: predicted, so float64 at once; tall
    matrices (Q = 4: no eigenvalue near zero) stay float32."""
    g = torch.Generator().manual_seed(0)
    square, tall = torch.randn(1, 300, 300, generator=g), torch.randn(1, 1200, 300, generator=g)
    assert [sp.precision for sp in compute_spectra([square, tall])] == ["float64", "float32"]
    assert compute_spectra([square], precision="float32")[0].precision == "float32"


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="2-D matrix or a 3-D stack"):
        eigenvalues(torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="precision"):
        compute_spectra([torch.zeros(1, 4, 4)], precision="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        eigenvalues(torch.full((8, 4), float("inf")))


def test_cupy_backend_explains_what_is_missing() -> None:
    try:
        import cupy  # noqa: F401

        have_cupy = True
    except ImportError:
        have_cupy = False
    with pytest.raises(BackendUnavailableError, match="cupy"):
        compute_spectra([torch.randn(1, 20, 10)], backend="cupy")  # CPU tensors: never valid for CuPy
    if not have_cupy:
        with pytest.raises(BackendUnavailableError, match=r"pip install -e '\.\[cupy\]'"):
            compute_spectra([torch.randn(1, 20, 10)], backend="cupy")


def cuda(test):
    """GPU-marked (``pytest -m gpu``) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@cuda
def test_cuda_eigenvalues_match_cpu_and_stay_on_device_until_the_end() -> None:
    w = torch.randn(1024, 512, generator=torch.Generator().manual_seed(0))
    cpu = compute_spectra([w.unsqueeze(0)])[0]
    gpu = compute_spectra([w.cuda().unsqueeze(0)])[0]
    torch.testing.assert_close(gpu.eigenvalues, cpu.eigenvalues, rtol=1e-4, atol=1e-5 * float(cpu.eigenvalues[-1]))
    assert gpu.eigenvalues.device.type == "cpu"  # results come back once, to the host


@cuda
def test_cupy_backend_matches_torch_on_cuda() -> None:
    pytest.importorskip("cupy")
    w = torch.randn(3, 512, 256, device="cuda")
    a = compute_spectra([w], backend="cupy")[0]
    b = compute_spectra([w], backend="torch")[0]
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-4, atol=1e-5 * float(b.eigenvalues[-1]))


def test_spectrum_of_zero_matrix() -> None:
    spectrum = compute_spectra([torch.zeros(1, 30, 20)])[0]
    assert spectrum.ok and float(spectrum.eigenvalues.max()) == 0.0
    assert not math.isnan(spectrum.zero_tol)
