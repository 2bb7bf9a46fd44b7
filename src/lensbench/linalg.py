"""Matrix statistics: Frobenius norm, spectral norm by power iteration, stable rank."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Spectral:
    sigma: float  # estimate of the largest singular value, from below
    iterations: int
    converged: bool  # the relative change of sigma fell to ``tol`` within ``max_iter``


def spectral_norm(matrix: torch.Tensor, tol: float = 1e-6, max_iter: int = 1000, seed: int = 0) -> Spectral:
    """Largest singular value of a 2-D ``matrix`` by power iteration on ``AᵀA``.

    Starts from a seeded Gaussian vector and stops when the estimate changes by at most
    ``tol`` (relative) between two iterations, or after ``max_iter`` iterations. The estimate
    ``||Aᵀu||`` with ``u = Av/||Av||`` never exceeds the true value and converges to it at the rate
    ``(σ₂/σ₁)²`` per iteration. Runs on the matrix's device and in its dtype.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    a = matrix
    if a.shape[0] < a.shape[1]:
        a = a.T  # iterate with the shorter vector
    gen = torch.Generator(device=a.device).manual_seed(seed)
    v = torch.randn(a.shape[1], generator=gen, device=a.device, dtype=a.dtype)
    v /= torch.linalg.vector_norm(v)
    previous = 0.0
    for iteration in range(1, max_iter + 1):
        u = a @ v
        norm_u = torch.linalg.vector_norm(u)
        if norm_u == 0:
            return Spectral(0.0, iteration, True)
        u /= norm_u
        v = a.T @ u
        sigma_t = torch.linalg.vector_norm(v)
        v /= sigma_t
        sigma = float(sigma_t)
        if abs(sigma - previous) <= tol * sigma:
            return Spectral(sigma, iteration, True)
        previous = sigma
    return Spectral(previous, max_iter, False)


def frobenius(matrix: torch.Tensor, chunk: int = 1 << 18) -> float:
    """``||A||_F``, accumulated in float64 over chunks of ``chunk`` entries (no full float64 copy)."""
    flat = matrix.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=matrix.device)
    for start in range(0, flat.numel(), chunk):
        total += flat[start : start + chunk].double().square().sum()
    return float(total.sqrt())


def matrix_stats(matrix: torch.Tensor, prefix: str, tol: float, max_iter: int) -> dict[str, float | int | bool]:
    """``{prefix}_fro``, ``{prefix}_spec`` (+ iterations, converged) and ``{prefix}_stable_rank``."""
    fro = frobenius(matrix)
    spec = spectral_norm(matrix, tol=tol, max_iter=max_iter)
    return {
        f"{prefix}_fro": fro,
        f"{prefix}_spec": spec.sigma,
        f"{prefix}_spec_iters": spec.iterations,
        f"{prefix}_spec_converged": spec.converged,
        # ||A||_F² / ||A||_2² (at least 1); undefined (NaN) for a zero matrix: no change at all
        f"{prefix}_stable_rank": fro * fro / (spec.sigma * spec.sigma) if spec.sigma > 0 else math.nan,
    }
