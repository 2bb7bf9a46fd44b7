"""Per-layer representation metrics of Skean et al. (2025), "Layer by Layer: Uncovering Hidden
Representations in Language Models", ported from their code (GitHub OFSkean/information_flow,
``experiments/utils/metrics/metric_functions.py``, with ``matrixAlphaEntropy`` of the ``repitl``
package) and rearranged to stream over batches. All linear algebra runs in float64.

With ``Z`` an ``N x D`` matrix, one row per sample (the tokens of one prompt, or one mean-pooled
vector per prompt of the dataset):

``normalize_rows``
    ``Z <- Z - mean_rows(Z)``, then ``z_i <- z_i / ||z_i||_2``.
matrix entropy ``S_alpha(Z)``
    ``K = clamp(ZᵀZ, min=0)`` if ``N > D`` else ``clamp(ZZᵀ, min=0)`` (the smaller of the two; the
    clamp is elementwise, as in the reference, so ``K`` need not be positive semi-definite and the
    branch taken matters); ``A = K / tr K``; ``λ = eigvalsh(A)``; keep ``λ > 0`` and rescale those
    to sum 1 (as repitl does); ``S_1 = -Σ λ log λ``, ``S_α = log(Σ λ^α) / (1 - α)`` (natural log).
curvature of a token trajectory ``z_0 .. z_{T-1}``
    ``v_k = z_k - z_{k-1}``; ``c_k = arccos(|<v_{k+1}, v_k>| / (|v_{k+1}| |v_k|))`` (``c_k = 0`` if
    a step is zero; note the absolute value, as in the reference), averaged over ``k = 1 .. T-2``;
    0 when ``T < 3``.
prompt entropy
    mean over prompts of ``S_α(normalize_rows(token states of the prompt))``.
dataset entropy
    ``S_α(normalize_rows(P))``, ``P`` one row per prompt: its token states mean-pooled over the
    non-padding tokens.
effective rank
    ``exp(S_1(normalize_rows(P)))``.
curvature (per layer)
    mean over prompts of the curvature of the prompt's raw (not normalised) token states.

Normalisations (information_flow's ``entropy_normalization``, in
``experiments/utils/metrics/metric_functions.py``): an entropy of ``N`` samples of dimension ``D``
divided by ``log N`` (``logN``), ``log D`` (``logD``), ``min(log N, log D)`` (``maxEntropy``, the
largest value the entropy can take, so the ratio lies in 0..1: the reference's default, first in
its ``EvaluationMetricSpecifications.normalizations`` and the default of its ``compute_entropy``) or
``log N * log D`` (``logNlogD``); ``raw`` is the entropy itself. The prompt entropy is normalised per
prompt (``N`` its tokens, ``D`` the hidden size) before the average over prompts, as the reference's
``compute_per_forward_pass`` does; the dataset entropy with ``N`` the prompts. Curvature has ``raw``
and ``logD`` (divided by ``log D``), as the reference's ``compute_curvature``. A divisor of 0 (one
token, or ``D = 1``) leaves 0: the entropy of a single sample is 0 there (the reference divides by
zero and stops).

Degenerate cases. A row whose centred norm is 0 stays 0 and a matrix without a positive eigenvalue
has entropy 0, so a one-token prompt (or one whose token states are all equal) has prompt entropy
0.0 and curvature 0.0, and counts in the averages. The reference divides 0 by 0 there; the NaN
matrix has NaN eigenvalues, none of which passes repitl's ``> 0`` test, so it too returns 0 for
``alpha = 1`` (but ``±inf`` for ``alpha != 1``, where we keep 0). The dataset entropy and effective
rank need at least two prompts and are NaN otherwise.

Non-finite states (NaN or inf, as a model whose weights hold NaN gives). A prompt whose mean-pooled
states at a layer are not finite (some token state is NaN or inf) is counted in that layer's
``n_nonfinite_texts`` and makes its prompt entropy and curvature NaN (it is not handed to
``eigvalsh``, which fails on NaN); the dataset entropy and effective rank of a layer holding such a
prompt are NaN too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["NORMALISATIONS", "RepresentationMetrics", "curvature", "entropy_divisor", "matrix_entropy", "normalize_rows"]

#: information_flow's normalisations of an entropy besides ``raw`` (see the module docstring); each
#: adds the columns ``prompt_entropy_<name>`` and ``dataset_entropy_<name>``.
NORMALISATIONS = ("logN", "logD", "maxEntropy", "logNlogD")


def normalize_rows(z: Tensor) -> Tensor:
    """Centre the rows of ``z`` (``[..., N, D]``) over ``N``, then scale each row to unit L2 norm.

    A row whose centred norm is 0 is left at 0 (the reference's ``0/0`` gives NaN)."""
    z = z - z.mean(dim=-2, keepdim=True)
    norms = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    return z / torch.where(norms > 0, norms, torch.ones_like(norms))


def _spectrum(z: Tensor) -> Tensor:
    """Distribution ``λ`` (``[..., min(N, D)]``, zeros for dropped eigenvalues) of the trace-normalised,
    elementwise-clamped Gram matrix of ``z`` (``[..., N, D]``, float64)."""
    n, d = z.shape[-2:]
    zt = z.transpose(-1, -2)
    k = (zt @ z if n > d else z @ zt).clamp(min=0)
    trace = k.diagonal(dim1=-2, dim2=-1).sum(-1)
    k = k / torch.where(trace > 0, trace, torch.ones_like(trace))[..., None, None]
    lam = torch.linalg.eigvalsh(k).clamp(min=0)  # repitl keeps only the eigenvalues > 0 ...
    total = lam.sum(-1, keepdim=True)
    return lam / torch.where(total > 0, total, torch.ones_like(total))  # ... and rescales them


def _renyi(p: Tensor, alpha: float) -> Tensor:
    """Rényi entropy of order ``alpha`` of the distributions ``p`` (``[..., n]``) in nats; 0 if ``p = 0``."""
    if alpha == 1.0:
        return -torch.special.xlogy(p, p).sum(-1)
    positive = p > 0
    mass = torch.where(positive, torch.where(positive, p, 1.0) ** alpha, 0.0).sum(-1)
    return torch.where(mass > 0, torch.log(mass) / (1.0 - alpha), torch.zeros_like(mass))


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not alpha > 0 or math.isinf(alpha):
        raise ValueError(f"alpha must be positive and finite, got {alpha}")
    return alpha


def matrix_entropy(z: Tensor, alpha: float = 1.0) -> float:
    """Matrix-based Rényi entropy ``S_alpha`` of the rows of ``z`` (``[N, D]``, rows already normalised
    with :func:`normalize_rows`), in nats; see the module docstring."""
    return float(_renyi(_spectrum(z.double()), _check_alpha(alpha)))


def entropy_divisor(normalisation: str, n: int, d: int) -> float:
    """What information_flow's ``entropy_normalization`` divides an entropy of ``n`` samples of
    dimension ``d`` by under ``normalisation`` (one of ``NORMALISATIONS``, or ``raw``: 1)."""
    log_n, log_d = math.log(n), math.log(d)
    divisors = {"raw": 1.0, "logN": log_n, "logD": log_d, "maxEntropy": min(log_n, log_d), "logNlogD": log_n * log_d}
    if normalisation not in divisors:
        raise ValueError(f"unknown normalisation {normalisation!r}; use one of {', '.join(divisors)}")
    return divisors[normalisation]


def _divide(value: Tensor | float, divisor: float) -> Tensor | float:
    """``value / divisor``; a divisor of 0 (then the entropy is 0: one sample) leaves ``value * 0``
    (0, or NaN for NaN)."""
    return value / divisor if divisor != 0 else value * 0.0


def _curvatures(z: Tensor) -> Tensor:
    """Average curvature of the trajectories ``z`` (``[..., T, D]``, float64), shape ``[...]``."""
    if z.shape[-2] < 3:
        return z.new_zeros(z.shape[:-2])
    v = z.diff(dim=-2)
    after, before = v[..., 1:, :], v[..., :-1, :]
    dot = (after * before).sum(-1).abs()
    scale = torch.linalg.vector_norm(after, dim=-1) * torch.linalg.vector_norm(before, dim=-1)
    nonzero = scale > 0
    cosine = dot / torch.where(nonzero, scale, torch.ones_like(scale))
    angle = torch.where(nonzero, torch.arccos(cosine.clamp(-1.0, 1.0)), torch.zeros_like(cosine))
    return angle.mean(-1)


def curvature(z: Tensor) -> float:
    """Average curvature (radians) of the token trajectory ``z`` (``[T, D]``, raw states)."""
    return float(_curvatures(z.double()))


class RepresentationMetrics:
    """Accumulates the metrics of the module docstring over the batches of one dataset.

    ``alpha``: order of the entropies (the effective rank always uses ``S_1``). ``layers``: indices
    into ``hidden_states`` to keep (0 = embeddings; negative counts from the end; default all).
    ``store_dtype``: dtype of the stored mean-pooled vectors (``N x len(layers) x D`` on the CPU;
    float32 halves the memory of float64 at a relative cost of about 1e-7).

    Per prompt, all kept layers are processed together: one batched matmul and one batched
    ``eigvalsh`` over a ``[L, T, T]`` stack (``[L, D, D]`` when ``T > D``), on the device of the
    hidden states. Prompts without any unmasked token are skipped.
    """

    def __init__(
        self, alpha: float = 1.0, layers: Sequence[int] | None = None, store_dtype: torch.dtype = torch.float32
    ) -> None:
        self.alpha = _check_alpha(alpha)
        self.store_dtype = store_dtype
        self._requested = None if layers is None else [int(x) for x in layers]
        self.layers: list[int] | None = None  # resolved on the first update
        self.n_hidden: int | None = None
        self.n_prompts = 0
        self._entropy_sum: Tensor | None = None
        self._normalised_sums: dict[str, Tensor] = {}  # normalisation -> per-prompt normalised entropies summed
        self._curvature_sum: Tensor | None = None
        self.dim: int | None = None  # hidden size D
        self._nonfinite: Tensor | None = None  # prompts whose pooled states are not finite, per layer
        self._pooled: list[Tensor] = []

    def _resolve(self, n_hidden: int) -> None:
        if self.layers is None:
            requested = list(range(n_hidden)) if self._requested is None else self._requested
            layers = [x + n_hidden if x < 0 else x for x in requested]
            if any(not 0 <= x < n_hidden for x in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"layers {requested} invalid for {n_hidden} hidden states")
            self.layers, self.n_hidden = layers, n_hidden
            self._entropy_sum = torch.zeros(len(layers), dtype=torch.float64)
            self._normalised_sums = {name: torch.zeros(len(layers), dtype=torch.float64) for name in NORMALISATIONS}
            self._curvature_sum = torch.zeros(len(layers), dtype=torch.float64)
            self._nonfinite = torch.zeros(len(layers), dtype=torch.int64)
        elif n_hidden != self.n_hidden:
            raise ValueError(f"got {n_hidden} hidden states, earlier batches had {self.n_hidden}")

    @torch.no_grad()
    def update(self, hidden_states: Sequence[Tensor], attention_mask: Tensor) -> None:
        """Add a batch: ``hidden_states`` as transformers' ``output_hidden_states`` (one ``[B, T, D]``
        tensor per layer), ``attention_mask`` ``[B, T]`` (nonzero = real token; any padding side)."""
        self._resolve(len(hidden_states))
        assert self.layers is not None and self._entropy_sum is not None and self._curvature_sum is not None
        first = hidden_states[self.layers[0]]
        if attention_mask.shape != first.shape[:2]:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} vs hidden states {tuple(first.shape)}")
        mask = attention_mask.to(first.device) != 0
        self.dim = first.shape[-1]
        entropy = self._entropy_sum.to(first.device)
        normalised = {name: total.to(first.device) for name, total in self._normalised_sums.items()}
        curv = self._curvature_sum.to(first.device)
        nonfinite = self._nonfinite
        assert nonfinite is not None
        pooled = []
        for i in range(mask.shape[0]):
            tokens = mask[i].nonzero().squeeze(1)
            if tokens.numel() == 0:
                continue
            z = torch.stack([hidden_states[layer][i, tokens] for layer in self.layers]).double()  # [L, T, D]
            mean = z.mean(dim=1)  # [L, D]
            bad = ~torch.isfinite(mean).all(dim=-1)  # [L]: some token state is NaN or inf
            if bad.any():
                nonfinite += bad.cpu()
                z = torch.where(bad[:, None, None], 0.0, z)  # eigvalsh fails on NaN; the layer's sums become NaN
            prompt_entropy = torch.where(bad, math.nan, _renyi(_spectrum(normalize_rows(z)), self.alpha))
            entropy += prompt_entropy
            for name, total in normalised.items():  # per prompt: N = its tokens
                total += _divide(prompt_entropy, entropy_divisor(name, z.shape[1], z.shape[2]))
            curv += torch.where(bad, math.nan, _curvatures(z))
            pooled.append(mean)
        self._entropy_sum, self._curvature_sum = entropy.cpu(), curv.cpu()
        self._normalised_sums = {name: total.cpu() for name, total in normalised.items()}
        if pooled:
            self._pooled.append(torch.stack(pooled).to("cpu", self.store_dtype))  # [B, L, D]
            self.n_prompts += len(pooled)

    @torch.no_grad()
    def compute(self, layers: list[int] | None = None) -> list[dict]:
        """One dict per layer (default: all kept ones): ``layer``, ``prompt_entropy``,
        ``dataset_entropy``, ``curvature``, ``effective_rank`` (all raw), then ``prompt_entropy_<n>`` and
        ``dataset_entropy_<n>`` for each normalisation ``n`` of ``NORMALISATIONS`` and ``curvature_logD``
        (see the module docstring), ``n_prompts``, ``n_nonfinite_texts`` (prompts whose pooled states at
        that layer are not finite).

        The effective rank is ``exp(S_1)`` of the normalised dataset matrix: the exponential of the
        Shannon entropy of its trace-normalised Gram spectrum (squared singular values, up to the
        reference's elementwise clamp of the Gram matrix), as in the definition of Skean et al.; Roy & Vetterli's effective rank uses the distribution of the
        singular values themselves (not squared) and so gives a different number."""
        if self.layers is None:
            raise RuntimeError("compute() before any update()")
        assert self.n_hidden is not None and self._entropy_sum is not None and self._curvature_sum is not None
        assert self.dim is not None
        wanted = self.layers if layers is None else [x + self.n_hidden if x < 0 else x for x in layers]
        missing = [x for x in wanted if x not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} were not kept (kept: {self.layers})")
        n = self.n_prompts
        pooled = torch.cat(self._pooled) if self._pooled else None
        results = []
        for layer in wanted:
            j = self.layers.index(layer)
            dataset_entropy = effective_rank = math.nan
            bad = self._nonfinite is not None and int(self._nonfinite[j]) > 0
            if n >= 2 and pooled is not None and not bad:
                p = _spectrum(normalize_rows(pooled[:, j].double()))
                dataset_entropy = float(_renyi(p, self.alpha))
                effective_rank = math.exp(dataset_entropy if self.alpha == 1.0 else float(_renyi(p, 1.0)))
            curv = float(self._curvature_sum[j]) / n if n else math.nan
            row = {
                "layer": layer,
                "prompt_entropy": float(self._entropy_sum[j]) / n if n else math.nan,
                "dataset_entropy": dataset_entropy,
                "curvature": curv,
                "effective_rank": effective_rank,
            }
            for name in NORMALISATIONS:
                row[f"prompt_entropy_{name}"] = float(self._normalised_sums[name][j]) / n if n else math.nan
            for name in NORMALISATIONS:
                row[f"dataset_entropy_{name}"] = _divide(dataset_entropy, entropy_divisor(name, max(n, 1), self.dim))
            row["curvature_logD"] = _divide(curv, entropy_divisor("logD", 1, self.dim))
            row["n_prompts"] = n
            row["n_nonfinite_texts"] = int(self._nonfinite[j]) if self._nonfinite is not None else 0
            results.append(row)
        return results
