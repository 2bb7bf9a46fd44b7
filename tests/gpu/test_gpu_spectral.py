"""Spectral norms of matrices on CUDA against their exact values (matrices built from chosen
singular values), with full float32 matmuls and with TF32 (float32_matmul_precision high, the
default of a GPU run)."""

from __future__ import annotations

import pytest
import torch
from .gpu_models import GPU

from lensbench.linalg import spectral_norm

pytestmark = GPU


def _planted(m: int, n: int, seed: int) -> tuple[torch.Tensor, float]:
    """A float64 matrix with singular values 3, 2.7 (a gap of 10%) then decaying to 3e-3; its largest."""
    k = min(m, n)
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = 3.0 * torch.logspace(0, -3, k, dtype=torch.float64)
    s[1] = 2.7
    return (u * s) @ v.T, 3.0


@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("method", ["auto", "lanczos", "power", "exact"])
@pytest.mark.parametrize("shape", [(512, 384), (96, 1024), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_spectral_norm_on_cuda_is_within_its_bound_of_the_exact_value(cuda, precision, method, shape, dtype):
    matrix, exact = _planted(*shape, seed=shape[0] * shape[1])
    on_gpu = matrix.to(cuda, dtype)
    stored = float(torch.linalg.svdvals(on_gpu.double().cpu())[0])  # exact for the rounded entries
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        result = spectral_norm(on_gpu, tol=1e-4, method=method)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert result.converged, result
    assert abs(stored - exact) / exact < (1e-6 if dtype == torch.float32 else 1e-2)  # the rounding of the entries
    rel = (stored - result.sigma) / stored
    if result.method == "exact":
        assert abs(rel) <= 1e-5, result
    else:  # a Ritz value: never above the largest singular value (up to rounding), within tol below it
        assert -1e-6 <= rel <= 1e-4 + 1e-6, result


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_a_gaussian_matrix_on_cuda_meets_the_default_tolerance(cuda, precision):
    """The hard case (close leading singular values), against float64 on the CPU."""
    a = torch.randn(2048, 512, generator=torch.Generator().manual_seed(16))
    exact = float(torch.linalg.matrix_norm(a.double(), ord=2))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        results = {method: spectral_norm(a.to(cuda), method=method) for method in ("lanczos", "exact")}
    finally:
        torch.set_float32_matmul_precision(previous)
    for method, result in results.items():
        assert result.converged and result.method == method
        assert abs(result.sigma - exact) <= 1e-4 * exact, result
