"""Power-iteration spectral norm, Frobenius norm and stable rank against exact linear algebra."""

from __future__ import annotations

import math

import pytest
import torch

from lensbench.linalg import frobenius, matrix_stats, spectral_norm


def _exact(a: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(a.double(), ord=2).item()


@pytest.mark.parametrize("shape", [(64, 64), (256, 256), (300, 120), (120, 300), (1000, 17)])
def test_random_matrices_within_1e3(shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    result = spectral_norm(a, tol=1e-6, max_iter=5000)
    assert result.converged and result.iterations > 1
    assert abs(result.sigma - _exact(a)) <= 1e-3 * _exact(a)
    assert result.sigma <= _exact(a) * (1 + 1e-6)  # the estimate approaches from below


@pytest.mark.parametrize("rank", [1, 3, 10])
def test_low_rank_matrices_converge_fast_and_exactly(rank):
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(200, rank, generator=g) @ torch.randn(rank, 150, generator=g)
    result = spectral_norm(a)
    assert abs(result.sigma - _exact(a)) <= 1e-4 * _exact(a)
    if rank == 1:
        assert result.iterations <= 3


def test_stable_rank_of_rank_one_is_one_and_of_identity_is_n():
    u, v = torch.randn(50, 1), torch.randn(1, 40)
    stats = matrix_stats(u @ v, "dW", tol=1e-8, max_iter=100)
    assert stats["dW_stable_rank"] == pytest.approx(1.0, rel=1e-5)
    assert stats["dW_fro"] == pytest.approx(torch.linalg.matrix_norm(u @ v).item(), rel=1e-6)
    eye = matrix_stats(torch.eye(30, dtype=torch.float64), "W", tol=1e-10, max_iter=100)
    assert eye["W_stable_rank"] == pytest.approx(30.0, rel=1e-9) and eye["W_spec"] == pytest.approx(1.0)


def test_zero_matrix_and_non_convergence_are_reported():
    zero = matrix_stats(torch.zeros(8, 5), "dW", tol=1e-6, max_iter=10)
    assert zero["dW_fro"] == 0 and zero["dW_spec"] == 0 and math.isnan(zero["dW_stable_rank"])  # undefined
    a = torch.randn(400, 400, generator=torch.Generator().manual_seed(1))
    capped = spectral_norm(a, tol=1e-12, max_iter=3)
    assert not capped.converged and capped.iterations == 3


def test_frobenius_accumulates_in_float64():
    a = torch.full((3000, 3000), 0.1, dtype=torch.float32)
    assert frobenius(a) == pytest.approx(0.1 * 3000, rel=1e-6)
    with pytest.raises(ValueError):
        spectral_norm(torch.ones(3))
