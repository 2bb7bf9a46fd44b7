"""Spectral norm (Lanczos, power iteration, exact), Frobenius norm and stable rank against exact linear algebra.

The reference is ``torch.linalg.matrix_norm(ord=2)`` in float64 of the very matrix measured (a
bfloat16 matrix is widened exactly). Random Gaussian matrices are the hard case: their leading
singular values are close, so a criterion on the change of the estimate stops early (the power
iteration this module used to run reported convergence 1e-3 away from the value).
"""

from __future__ import annotations

import math

import pytest
import torch

from lensbench import linalg
from lensbench.linalg import frobenius, matrix_stats, spectral_norm

DTYPES = [torch.float32, torch.bfloat16]
# What ``converged`` guarantees (linalg's docstring): σ ≤ σ_max and σ_max − σ ≤ tol·σ, plus the
# rounding of the products in the matrix's dtype (float32 for bfloat16 input): allowed here 1e-6.
ROUNDING = 1e-6


def _exact(a: torch.Tensor) -> float:
    # one thread: on a busy machine LAPACK's parallel regions wait for their threads (seconds here)
    with linalg._one_thread():
        return torch.linalg.matrix_norm(a.double(), ord=2).item()


def _gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _planted(seed: int = 0) -> torch.Tensor:
    """param_diff's planted changes: rank 2 plus small noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(400, 2, generator=g) @ torch.randn(2, 300, generator=g) + 1e-3 * torch.randn(400, 300, generator=g)


def _check(a: torch.Tensor, result, tol: float) -> float:
    """Relative error of a converged result, checked against the guarantee; returns it."""
    exact = _exact(a)
    if exact == 0:
        assert result.sigma == 0
        return 0.0
    assert result.sigma <= exact * (1 + ROUNDING)  # a Ritz value never exceeds σ_max
    error = (exact - result.sigma) / exact
    assert error <= tol + ROUNDING, (tuple(a.shape), a.dtype, result)
    assert exact - result.sigma <= result.bound + ROUNDING * exact  # the reported bound holds
    return error


CASES = {
    "square": lambda: _gauss(384, 384, seed=1),
    "tall": lambda: _gauss(1200, 240, seed=2),
    "wide": lambda: _gauss(240, 1200, seed=3),
    "1xN": lambda: _gauss(1, 700, seed=4),
    "Nx1": lambda: _gauss(700, 1, seed=5),
    "rank-1": lambda: _gauss(400, 1, seed=6) @ _gauss(1, 250, seed=7),
    "zero": lambda: torch.zeros(300, 200),
    "rank-2 + noise": _planted,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_lanczos_meets_the_default_tolerance(case, dtype):
    a = CASES[case]().to(dtype)
    result = spectral_norm(a, method="lanczos")
    assert result.converged and result.method == "lanczos"
    assert _check(a, result, 1e-4) <= 1e-4
    assert result.iterations <= min(a.shape) or result.iterations <= 100


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_is_exact_for_small_matrices_and_lanczos_above(dtype):
    small, large = _gauss(300, 100, seed=8).to(dtype), _gauss(300, 200, seed=9).to(dtype)
    assert spectral_norm(small).method == "exact" and spectral_norm(large).method == "lanczos"
    assert spectral_norm(large, exact_max_dim=200).method == "exact"
    for a in (small, large):
        result = spectral_norm(a)
        assert result.converged and _check(a, result, 1e-4) <= 1e-4


def test_exact_mode_equals_svdvals():
    a = _gauss(257, 190, seed=10)
    # equal up to the last bits: LAPACK's rounding depends on its thread count (one for small matrices)
    result = spectral_norm(a, method="exact")
    assert result.sigma == pytest.approx(torch.linalg.svdvals(a.double())[0].item(), rel=1e-14)
    assert (result.iterations, result.converged, result.method, result.bound) == (0, True, "exact", 0.0)
    half = a.bfloat16()
    assert spectral_norm(half, method="exact").sigma == pytest.approx(torch.linalg.svdvals(half.double())[0].item(), rel=1e-14)


def test_power_iteration_uses_the_same_certified_criterion():
    a = _gauss(300, 200, seed=11)
    result = spectral_norm(a, method="power", max_iter=5000)
    assert result.converged and result.method == "power" and result.iterations > 20
    _check(a, result, 1e-4)
    capped = spectral_norm(a, method="power", max_iter=20)
    assert not capped.converged and capped.iterations == 20 and capped.bound > 1e-4 * capped.sigma


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_converged_is_claimed_only_when_the_bound_holds(method):
    """Over a grid of tolerances and iteration budgets on a hard matrix, every result that says
    converged is within tol (+ rounding) of the exact value, and small budgets do not converge."""
    a = _gauss(600, 300, seed=12)
    exact = _exact(a)
    outcomes = []
    for tol in (1e-2, 1e-3, 1e-4, 1e-6):
        for max_iter in (3, 6, 10, 16, 24, 40, 64):
            result = spectral_norm(a, tol=tol, max_iter=max_iter, method=method)
            assert result.iterations <= max_iter and result.sigma <= exact * (1 + ROUNDING)
            assert exact - result.sigma <= result.bound + ROUNDING * exact  # the bound always holds
            if result.converged:
                assert (exact - result.sigma) / exact <= tol + ROUNDING
                assert result.bound <= tol * result.sigma
            outcomes.append(result.converged)
    assert not spectral_norm(a, max_iter=6, method=method).converged  # a tiny budget: not converged
    if method == "lanczos":
        assert spectral_norm(a, tol=1e-2, max_iter=64, method=method).converged
        assert any(outcomes) and not all(outcomes)


def test_lanczos_estimate_grows_with_the_krylov_dimension():
    a = _gauss(400, 300, seed=13)
    sigmas = [spectral_norm(a, tol=1e-12, max_iter=k, method="lanczos").sigma for k in (2, 4, 8, 16, 32, 64)]
    assert sigmas == sorted(sigmas) and sigmas[-1] <= _exact(a) * (1 + ROUNDING)


def test_lanczos_restarts_from_its_ritz_vector(monkeypatch):
    monkeypatch.setattr(linalg, "RESTART", 10)  # the basis holds 10 vectors: several restarts
    a = _gauss(600, 200, seed=14)
    result = spectral_norm(a, method="lanczos")
    assert result.converged and result.iterations > 20
    _check(a, result, 1e-4)


def test_tiny_budget_is_not_converged_and_iterations_are_counted():
    a = _gauss(400, 400, seed=1)
    capped = spectral_norm(a, tol=1e-4, max_iter=3, method="lanczos")
    assert not capped.converged and capped.iterations == 3 and capped.sigma <= _exact(a)
    # fewer than MIN_STEPS steps never claim convergence, unless the Krylov space is exhausted
    rank1 = _gauss(60, 1, seed=2).double() @ _gauss(1, 40, seed=3).double()  # exactly rank 1
    exhausted = spectral_norm(rank1, max_iter=3, method="lanczos")
    assert exhausted.converged and exhausted.iterations <= 2 and exhausted.sigma == pytest.approx(_exact(rank1), rel=1e-12)


@pytest.mark.parametrize("rank", [1, 3, 10])
def test_low_rank_matrices_converge_fast_and_exactly(rank):
    # Power iteration took at most 3 iterations on rank 1 (and stopped on the change of its
    # estimate). The Krylov space of AᵀA holds the row space and the start vector's null-space
    # part after rank + 1 steps, and its Ritz values are then exact: Lanczos stops at the first
    # convergence check after that and MIN_STEPS (checks are a few steps apart).
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(200, rank, generator=g) @ torch.randn(rank, 150, generator=g)
    result = spectral_norm(a, method="lanczos")
    assert result.converged and abs(result.sigma - _exact(a)) <= 1e-6 * _exact(a)
    assert result.iterations <= max(linalg.MIN_STEPS, rank + 1) + 3
    g.manual_seed(rank)
    a64 = torch.randn(200, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 150, generator=g, dtype=torch.float64)
    exact64 = spectral_norm(a64, tol=1e-12, method="lanczos")
    assert exact64.iterations <= rank + 3 and exact64.sigma == pytest.approx(_exact(a64), rel=1e-12)


def test_stable_rank_uses_the_new_spectral_norm():
    a = _gauss(500, 200, seed=15)
    stats = matrix_stats(a, "W", tol=1e-4, max_iter=1000)
    exact_fro, exact_spec = torch.linalg.matrix_norm(a.double()).item(), _exact(a)
    assert stats["W_spec_method"] == "lanczos" and stats["W_spec_converged"]
    assert stats["W_stable_rank"] == stats["W_fro"] ** 2 / stats["W_spec"] ** 2
    assert stats["W_stable_rank"] == pytest.approx(exact_fro**2 / exact_spec**2, rel=2e-4)
    assert 0 <= stats["W_spec_bound"] <= 1e-4 * stats["W_spec"]


def test_stable_rank_of_rank_one_is_one_and_of_identity_is_n():
    u, v = torch.randn(50, 1), torch.randn(1, 40)
    stats = matrix_stats(u @ v, "dW", tol=1e-8, max_iter=100)
    assert stats["dW_stable_rank"] == pytest.approx(1.0, rel=1e-5)
    assert stats["dW_fro"] == pytest.approx(torch.linalg.matrix_norm(u @ v).item(), rel=1e-6)
    eye = matrix_stats(torch.eye(30, dtype=torch.float64), "W", tol=1e-10, max_iter=100)
    assert eye["W_stable_rank"] == pytest.approx(30.0, rel=1e-9) and eye["W_spec"] == pytest.approx(1.0)
    for method in ("lanczos", "power"):  # the identity: every vector is a singular vector
        assert matrix_stats(torch.eye(300), "W", 1e-4, 100, method=method)["W_spec"] == pytest.approx(1.0)


def test_zero_matrix_and_non_convergence_are_reported():
    for method in ("auto", "lanczos", "power", "exact"):
        zero = matrix_stats(torch.zeros(8, 5), "dW", tol=1e-6, max_iter=10, method=method)
        assert zero["dW_fro"] == 0 and zero["dW_spec"] == 0 and math.isnan(zero["dW_stable_rank"])  # undefined
        assert zero["dW_spec_converged"]
    a = torch.randn(400, 400, generator=torch.Generator().manual_seed(1))
    capped = spectral_norm(a, tol=1e-12, max_iter=3)
    assert not capped.converged and capped.iterations == 3


@pytest.mark.parametrize("method", linalg.METHODS)
def test_non_finite_matrices_have_no_spectral_norm(method):
    a = _gauss(200, 150, seed=17)
    a[3, 4] = math.nan
    result = spectral_norm(a, method=method)
    assert math.isnan(result.sigma) and not result.converged


def test_frobenius_accumulates_in_float64():
    a = torch.full((3000, 3000), 0.1, dtype=torch.float32)
    assert frobenius(a) == pytest.approx(0.1 * 3000, rel=1e-6)
    with pytest.raises(ValueError):
        spectral_norm(torch.ones(3))
    with pytest.raises(ValueError):
        spectral_norm(torch.ones(3, 3), method="svd")


@pytest.mark.parametrize("method", ["lanczos", "power", "exact"])
def test_products_are_full_float32_whatever_the_matmul_precision(method):
    a = _gauss(300, 200, seed=21)
    full = spectral_norm(a, method=method)
    previous = torch.get_float32_matmul_precision()
    seen = []
    real = linalg._lanczos if method == "lanczos" else linalg._power if method == "power" else linalg._exact

    def spy(*args):
        seen.append(torch.get_float32_matmul_precision())
        return real(*args)

    torch.set_float32_matmul_precision("medium")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(linalg, f"_{method}", spy)
            reduced = spectral_norm(a, method=method)
        assert torch.get_float32_matmul_precision() == "medium"  # given back as it was
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen == ["highest"]
    assert reduced == full
