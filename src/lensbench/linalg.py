"""Matrix statistics: Frobenius norm, spectral norm (Lanczos, power iteration or exact), stable rank.

The spectral norm ``σ_max(A) = ||A||_2`` comes from one of three methods:

- ``lanczos``: the Lanczos method on ``AᵀA`` for the shorter side (``n × n``, never formed: each
  iteration is one product with ``A`` and one with ``Aᵀ``) from a seeded Gaussian start vector,
  with full reorthogonalisation. The products run in the matrix's dtype (float32 or float64;
  bfloat16 and float16 are widened to float32 first) on its device; the Krylov basis and the small
  tridiagonal problem are float64. Its Krylov space is that of Golub–Kahan bidiagonalisation, so
  its Ritz values are the same.
- ``power``: power iteration on ``AᵀA`` with the same stopping rule (slower on hard matrices).
- ``exact``: ``torch.linalg.svdvals`` (in float64 on the CPU, in the matrix's dtype elsewhere).

``auto`` takes ``exact`` when the smaller side has at most ``exact_max_dim`` entries, else
``lanczos``.

**What ``converged`` guarantees.** Both iterative methods produce a singular triplet estimate
``(θ, u, v)`` with unit vectors, ``Av = θu`` and ``Aᵀu = θv + ρw`` (``w`` a unit vector; Lanczos:
``θ = σ``, ``v`` the Ritz vector of ``AᵀA`` and ``ρ = β|s_k|/σ`` from its tridiagonal problem;
power iteration: ``θ = ||Av|| ≤ σ``), and stop when ``bound = ρ/√2 ≤ tol·σ``. Then, in exact
arithmetic:

1. some singular value ``σ_j`` of ``A`` satisfies ``|σ_j − θ| ≤ bound`` (the residual bound for
   the eigenvalue ``θ`` of ``[[0, A], [Aᵀ, 0]]`` with the unit eigenvector estimate ``(u, v)/√2``);
2. ``θ ≤ σ ≤ σ_max`` (a Ritz value never exceeds the largest singular value; for Lanczos it also
   grows monotonically with the Krylov dimension).

So ``0 ≤ σ_max − σ ≤ tol·σ`` whenever ``σ_j`` is the largest singular value. A Krylov method cannot
prove that last point: a start vector nearly orthogonal to the top singular vector could leave it
unseen. The start vector is Gaussian, and Lanczos also requires at least ``MIN_STEPS`` steps (unless
the Krylov space is exhausted, when its Ritz values are exact), so this needs the start vector to
be nearly orthogonal to every singular vector whose singular value exceeds ``σ(1 + tol)``. The
products' rounding in the matrix's dtype adds to the bound (relative ``≈ 1e-7`` in float32;
observed below ``1e-7``); they are full float32 products whatever ``float32_matmul_precision``
says (no TF32). ``exact`` is always converged (exact up to the rounding of the SVD).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

METHODS = ("auto", "lanczos", "power", "exact")
EXACT_MAX_DIM = 128  # auto: svdvals up to this smaller side (CPU: slower than Lanczos above it)
MIN_STEPS = 8  # Lanczos steps before ``converged`` may be claimed (unless the space is exhausted)
RESTART = 128  # Lanczos basis size at which it restarts from its Ritz vector (bounds its memory)
BLOCK = 32  # Lanczos basis vectors allocated at a time


@dataclass(frozen=True)
class Spectral:
    sigma: float  # estimate of the largest singular value: never above it (up to rounding)
    iterations: int  # products with A and with Aᵀ (one of each per iteration); 0 for exact
    converged: bool  # ``bound <= tol * sigma`` (see the module's docstring for what that guarantees)
    method: str = "lanczos"  # lanczos, power or exact: the method used
    bound: float = math.inf  # ρ/√2: some singular value lies within it of the Ritz value (0 for exact)


def spectral_norm(matrix: torch.Tensor, tol: float = 1e-4, max_iter: int = 1000, seed: int = 0,
                  method: str = "auto", exact_max_dim: int = EXACT_MAX_DIM) -> Spectral:
    """Largest singular value of a 2-D ``matrix`` (see the module's docstring).

    ``tol`` is the relative error bound to certify, ``max_iter`` the most iterations (one product
    with ``A`` and one with ``Aᵀ`` each), ``seed`` seeds the Gaussian start vector.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(matrix.shape)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    a = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()  # exact widening
    if a.shape[0] < a.shape[1]:
        a = a.T  # m >= n: the shorter vectors and Krylov dimension at most n
    if a.numel() == 0:
        return Spectral(0.0, 0, True, "exact", 0.0)
    if method == "auto":
        method = "exact" if a.shape[1] <= exact_max_dim else "lanczos"
    with _full_float32():
        if method == "exact":
            return _exact(a)
        if method == "power":
            return _power(a, tol, max_iter, seed)
        return _lanczos(a, tol, max_iter, seed)


@contextmanager
def _full_float32():
    """Full float32 products while a norm is computed: under ``float32_matmul_precision`` high or
    medium (the default of a GPU run) float32 products may round their inputs to TF32 or bfloat16,
    relative ``1e-3``, which the bound in the module's docstring does not cover."""
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


@contextmanager
def _one_thread(on: bool = True):
    """Run a small CPU problem in the calling thread only: LAPACK on a matrix of a few hundred
    columns gains nothing from more threads, and on a busy machine each parallel region can wait
    milliseconds for its threads (svdvals of 256 × 128: 1.4 ms on one thread, over 100 ms on two
    with other processes running)."""
    threads = torch.get_num_threads()
    if on and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if on and threads > 1:
            torch.set_num_threads(threads)


def _exact(a: torch.Tensor) -> Spectral:
    cpu = a.device.type == "cpu"
    with _one_thread(cpu and a.shape[1] <= 2 * EXACT_MAX_DIM):
        if not bool(torch.isfinite(a).all()):  # svdvals fails on NaN/inf; the norm is undefined
            return Spectral(math.nan, 0, False, "exact", math.inf)
        values = torch.linalg.svdvals(a.double() if cpu else a)
    return Spectral(float(values[0]), 0, True, "exact", 0.0)


def _start(a: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=a.device).manual_seed(seed)
    v = torch.randn(a.shape[1], generator=gen, device=a.device, dtype=torch.float64)
    return v / torch.linalg.vector_norm(v)


def _product(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``a @ x`` for a float64 vector ``x``, in ``a``'s dtype, returned in float64."""
    return (a @ x.to(a.dtype)).to(torch.float64)


def _gram_product(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``aᵀ(a x)`` for a float64 vector ``x``, in ``a``'s dtype, returned in float64."""
    return (a.T @ (a @ x.to(a.dtype))).to(torch.float64)


class _Basis:
    """Orthonormal float64 vectors, stored in blocks of ``BLOCK`` allocated as they fill (the memory
    follows the Krylov dimension reached, not the most it could reach)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.dim, self.device, self.count = dim, device, 0
        self.blocks: list[torch.Tensor] = []

    def append(self, x: torch.Tensor, scale: float) -> None:
        """Store ``x * scale``."""
        if self.count == len(self.blocks) * BLOCK:
            self.blocks.append(torch.empty(BLOCK, self.dim, dtype=torch.float64, device=self.device))
        torch.mul(x, scale, out=self.blocks[-1][self.count % BLOCK])
        self.count += 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i // BLOCK][i % BLOCK]

    def _filled(self):
        for j, block in enumerate(self.blocks):
            yield j * BLOCK, block[: min(BLOCK, self.count - j * BLOCK)]

    def _project_out(self, x: torch.Tensor) -> None:
        for _, block in self._filled():
            x.sub_(block.T @ (block @ x))

    def orthogonalize(self, x: torch.Tensor) -> None:
        """Remove from ``x`` (in place) its components along the basis: Gram–Schmidt, block by block,
        repeated once when it cancelled most of ``x`` (the test of Daniel, Gragg, Kaufman, Stewart)."""
        if self.count == 0:
            return
        before = torch.linalg.vector_norm(x)
        self._project_out(x)
        if torch.linalg.vector_norm(x) < 0.7 * before:
            self._project_out(x)

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``Σ_i coefficients[i] · vector_i`` over the first ``len(coefficients)`` vectors."""
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for start, block in self._filled():
            part = coefficients[start : start + block.shape[0]]
            if len(part):
                total += block[: len(part)].T @ part
        return total


def _ritz(alphas: list[float], betas: list[float]) -> tuple[float, float, np.ndarray]:
    """Largest eigenvalue ``θ`` of the tridiagonal ``T`` (diagonal ``alphas``, off-diagonal
    ``betas[:k-1]``) as ``σ = √θ``, the residual ``ρ = betas[k-1]·|s_k| / σ`` of the singular triplet
    it gives (0 when there is no ``betas[k-1]``) and its eigenvector ``s``."""
    k = len(alphas)
    t = np.diag(np.asarray(alphas, dtype=np.float64))
    if k > 1:
        off = np.asarray(betas[: k - 1], dtype=np.float64)
        t += np.diag(off, 1) + np.diag(off, -1)
    with _one_thread():  # a tiny problem
        values, vectors = torch.linalg.eigh(torch.from_numpy(t))
    sigma = math.sqrt(max(float(values[-1]), 0.0))
    s = vectors[:, -1].numpy()
    rho = betas[k - 1] * abs(float(s[-1])) / sigma if len(betas) >= k and sigma > 0 else 0.0
    return sigma, rho, s


def _lanczos(a: torch.Tensor, tol: float, max_iter: int, seed: int) -> Spectral:
    """Lanczos on ``AᵀA`` (``n × n``, the shorter side; never formed): ``AᵀA V = V T + β v e_kᵀ``.
    A Ritz pair ``(θ, y = V s)`` gives the singular triplet ``σ = √θ``, ``v = y``, ``u = Av/σ``
    (a unit vector: ``‖Ay‖² = θ``) with ``Av = σu`` and ``‖Aᵀu − σv‖ = β|s_k|/σ = ρ``."""
    n = a.shape[1]
    device = a.device
    v = _start(a, seed)
    steps, sigma, bound, scale = 0, 0.0, math.inf, 0.0
    while True:  # one cycle per restart
        size = min(n, RESTART, max_iter - steps)
        vs = _Basis(n, device)
        vs.append(v, 1.0)
        alphas: list[float] = []
        betas: list[float] = []
        exhausted = False  # the Krylov space is invariant: the Ritz values are eigenvalues of AᵀA
        next_check, last = steps + max(1, MIN_STEPS - steps), None
        for k in range(size):
            w = _gram_product(a, vs[k])
            steps += 1
            alpha = float(torch.dot(vs[k], w))
            if not math.isfinite(alpha):  # NaN or inf in the matrix: the norm is undefined
                return Spectral(math.nan, steps, False, "lanczos", math.inf)
            w.sub_(vs[k], alpha=alpha)
            if k:
                w.sub_(vs[k - 1], alpha=betas[-1])
            vs.orthogonalize(w)
            beta = float(torch.linalg.vector_norm(w))
            alphas.append(alpha)
            betas.append(beta)
            scale = max(scale, abs(alpha), beta)
            if scale == 0.0:  # AᵀA v = 0 for the random start: A is zero (or v is in its null space)
                zero = not bool(a.any())
                return Spectral(0.0, steps, zero, "lanczos", 0.0 if zero else math.inf)
            if beta <= 1e-12 * scale or k + 1 == n:
                exhausted = True  # AᵀA V_k lies in span(V_k) (or V spans everything)
                break
            vs.append(w, 1.0 / beta)
            if steps >= next_check and k + 1 < size:
                sigma, rho, _ = _ritz(alphas, betas)
                bound = rho / math.sqrt(2)
                if bound <= tol * sigma:
                    return Spectral(sigma, steps, True, "lanczos", bound)
                ratio = bound / (tol * sigma) if sigma > 0 else math.inf
                next_check, last = steps + _next_check(steps, ratio, last), (steps, ratio)
        sigma, rho, s = _ritz(alphas, betas)
        bound = rho / math.sqrt(2)
        if bound <= tol * sigma and (steps >= MIN_STEPS or exhausted):
            return Spectral(sigma, steps, True, "lanczos", bound)
        if exhausted or steps >= max_iter or sigma == 0:
            return Spectral(sigma, steps, False, "lanczos", bound)
        # restart from the Ritz vector: the next cycle's Ritz value is at least this one
        v = vs.combine(torch.from_numpy(s).to(device))
        v /= torch.linalg.vector_norm(v)


def _next_check(steps: int, ratio: float, last: tuple[int, float] | None) -> int:
    """Steps until the next convergence check, from ``ratio = bound / (tol·σ)`` now and at the
    previous check: 0.7 times the steps its geometric decay predicts are still needed (the decay
    speeds up, so this rarely overshoots), at least 1 and at most half the steps so far; a quarter
    of the steps so far while the ratio is not decreasing yet."""
    if last is None or not math.isfinite(ratio) or ratio >= last[1]:
        return max(1, steps // 4)
    rate = math.log(last[1] / ratio) / (steps - last[0])
    return max(1, min(max(1, steps // 2), int(0.7 * math.log(ratio) / rate)))


def _power(a: torch.Tensor, tol: float, max_iter: int, seed: int) -> Spectral:
    """Power iteration on ``AᵀA``: ``u = Av/θ`` (``θ = ||Av||``), ``w = Aᵀu``, ``σ = ||w||``; the pair
    ``(u, v)`` has ``Av = θu`` and residual ``ρ = ||w − θv||``; ``θ ≤ σ ≤ σ_max``."""
    v = _start(a, seed)
    sigma, bound = 0.0, math.inf
    for iteration in range(1, max_iter + 1):
        u = _product(a, v)
        theta = float(torch.linalg.vector_norm(u))
        if not math.isfinite(theta):  # NaN or inf in the matrix: the norm is undefined
            return Spectral(math.nan, iteration, False, "power", math.inf)
        if theta == 0:
            zero = not bool(a.any())
            return Spectral(0.0, iteration, zero, "power", 0.0 if zero else math.inf)
        u /= theta
        w = _product(a.T, u)
        sigma = float(torch.linalg.vector_norm(w))
        bound = float(torch.linalg.vector_norm(w - theta * v)) / math.sqrt(2)
        if bound <= tol * sigma:
            return Spectral(sigma, iteration, True, "power", bound)
        v = w / sigma
    return Spectral(sigma, max_iter, False, "power", bound)


def frobenius(matrix: torch.Tensor, chunk: int | None = None) -> float:
    """``||A||_F``: squares in float32 (float64 for a float64 matrix) summed in float64, so the
    relative error is at most 2⁻²⁴ (each square is rounded once; the terms are positive).

    Chunks of ``chunk`` entries go through one reused buffer: no copy of the matrix, no allocation
    per chunk. On the CPU the default chunk (2**15) is below torch's parallel grain, so each
    operation runs in the calling thread: on a busy machine a parallel region per chunk can cost
    milliseconds of waiting for the other threads, more than the arithmetic.
    """
    if chunk is None:
        chunk = 1 << 15 if matrix.device.type == "cpu" else 1 << 22
    flat = matrix.reshape(-1)
    if flat.numel() == 0:
        return 0.0
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    buffer = torch.empty(min(chunk, flat.numel()), dtype=dtype, device=matrix.device)
    total = torch.zeros((), dtype=torch.float64, device=matrix.device)
    for start in range(0, flat.numel(), chunk):
        part = buffer[: min(chunk, flat.numel() - start)]
        if flat.dtype == dtype:
            torch.square(flat[start : start + chunk], out=part)
        else:  # bfloat16, float16: widen exactly, then square in float32
            part.copy_(flat[start : start + chunk]).square_()
        total += part.sum(dtype=torch.float64)
    return float(total.sqrt())


def matrix_stats(matrix: torch.Tensor, prefix: str, tol: float, max_iter: int, method: str = "auto",
                 exact_max_dim: int = EXACT_MAX_DIM) -> dict[str, float | int | bool | str]:
    """``{prefix}_fro``, ``{prefix}_spec`` (+ iterations, converged, method, bound) and
    ``{prefix}_stable_rank``."""
    fro = frobenius(matrix)
    spec = spectral_norm(matrix, tol=tol, max_iter=max_iter, method=method, exact_max_dim=exact_max_dim)
    return {
        f"{prefix}_fro": fro,
        f"{prefix}_spec": spec.sigma,
        f"{prefix}_spec_iters": spec.iterations,
        f"{prefix}_spec_converged": spec.converged,
        f"{prefix}_spec_method": spec.method,
        f"{prefix}_spec_bound": spec.bound,
        # ||A||_F² / ||A||_2² (at least 1); undefined (NaN) for a zero matrix: no change at all
        f"{prefix}_stable_rank": fro * fro / (spec.sigma * spec.sigma) if spec.sigma > 0 else math.nan,
    }
