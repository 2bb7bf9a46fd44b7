"""Representation metrics of lensbench.layer_sweep.metrics against a literal transcription of the
reference code of Skean et al. (2025) and against known answers.

The reference below transcribes, from GitHub OFSkean/information_flow,
``experiments/utils/metrics/metric_functions.py`` (``normalize``, ``compute_entropy`` with its
``N > D`` branch and elementwise clamp, ``compute_curvature`` with its Python loop) and, from
uk-cliplab/representation-itl, ``repitl.matrix_itl.matrixAlphaEntropy`` (eigenvalues ``> 0`` kept
and rescaled to sum 1). The stored repitl versions compute ``1 / (1 - alpha)`` even for
``alpha = 1``; the transcription takes the Shannon limit there. The pipeline glue (per-prompt token
states without padding, mean pooling over the non-padding tokens, averages over prompts) follows
``text_automodel_wrapper.py`` of the same repository and the description in the paper.
``ref_entropy_normalization`` transcribes ``entropy_normalization`` of ``metric_functions.py``; the
per-prompt normalisation before the average follows ``compute_per_forward_pass`` of
``experiments/utils/metrics/metric_utils.py`` (``N`` = the prompt's tokens), the dataset entropy's
follows ``compute_on_concatenated_passes`` (``N`` = the prompts), the curvature's ``logD`` follows
``compute_curvature``.

Measured agreement (random float64 fixtures below, every metric and layer, alpha in {1, 2, 0.5},
right and left padding, batch sizes 1, 3, 4 and all): max relative difference 8.9e-16 (effective
rank; 4.1e-16 dataset entropy, 2.7e-16 prompt entropy, 2.0e-16 curvature), against the 1e-10
required here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lensbench.layer_sweep.metrics import (
    NORMALISATIONS,
    RepresentationMetrics,
    curvature,
    matrix_entropy,
    normalize_rows,
)

METRICS = ("prompt_entropy", "dataset_entropy", "curvature", "effective_rank")
REF_NORMALISATIONS = ("maxEntropy", "logN", "logD", "logNlogD")  # the reference's list, less 'raw'
NORMALISED = tuple(f"{m}_{n}" for m in ("prompt_entropy", "dataset_entropy") for n in REF_NORMALISATIONS) + (
    "curvature_logD",)


# ---------------------------------------------------------------------------------------------
# Reference transcription (kept close to the original code on purpose)
# ---------------------------------------------------------------------------------------------


def ref_normalize(R):
    with torch.no_grad():
        mean = R.mean(dim=0)
        R = R - mean
        norms = torch.norm(R, p=2, dim=1, keepdim=True)
        R = R / norms
    return R


def ref_generalizedInformationPotential(K, alpha):
    ek, _ = torch.linalg.eigh(K)
    mk = torch.gt(ek, 0.0)
    mek = ek[mk]
    mek = mek / torch.sum(mek)
    GIP = torch.sum(torch.exp(alpha * torch.log(mek)))
    return GIP


def ref_matrixAlphaEntropy(K, alpha):
    if alpha == 1:  # Shannon limit of the same (positive, rescaled) spectrum
        ek, _ = torch.linalg.eigh(K)
        mek = ek[torch.gt(ek, 0.0)]
        mek = mek / torch.sum(mek)
        return -torch.sum(mek * torch.log(mek))
    GIP = ref_generalizedInformationPotential(K, alpha)
    H = (1.0 / (1.0 - alpha)) * torch.log(GIP)
    return H


def ref_compute_entropy(hidden_states, alpha=1):
    """'raw' normalisation only."""
    L, N, D = hidden_states.shape

    if N > D:
        cov = torch.matmul(hidden_states.transpose(1, 2), hidden_states)  # D x D
    else:
        cov = torch.matmul(hidden_states, hidden_states.transpose(1, 2))  # N x N

    cov = torch.clamp(cov, min=0)
    entropies = []
    for layer_cov in cov:
        try:
            layer_cov = layer_cov.cpu()
            layer_cov = layer_cov.double() / torch.trace(layer_cov.double())
            entropies.append(ref_matrixAlphaEntropy(layer_cov, alpha=alpha).item())
        except Exception:
            entropies.append(np.nan)
    return entropies


def ref_entropy_normalization(entropy, normalization, N, D):
    assert normalization in ['maxEntropy', 'logN', 'logD', 'logNlogD', 'raw', 'length']

    if normalization == 'maxEntropy':
        entropy /= min(math.log(N), math.log(D))
    elif normalization == 'logN':
        entropy /= math.log(N)
    elif normalization == 'logD':
        entropy /= math.log(D)
    elif normalization == 'logNlogD':
        entropy /= (math.log(N) * math.log(D))
    elif normalization == 'raw':
        pass
    elif normalization == 'length':
        entropy = N

    return entropy


def ref_compute_curvature(hidden_states):
    """'raw' normalisation only."""
    L, N, D = hidden_states.shape

    def calculate_paired_curvature(a, b):
        dotproduct = torch.abs(a.T @ b)
        norm_a = torch.norm(a)
        norm_b = torch.norm(b)
        if norm_a == 0 or norm_b == 0:
            return 0
        argument = torch.clamp(dotproduct / (norm_a * norm_b), min=-1, max=1)
        curvature = torch.arccos(argument)
        return curvature.item()

    def calculate_layer_average_k_curvature(layer_p):
        summation, counter = 0, 0
        for k in range(1, layer_p.shape[0] - 1):
            v_k = layer_p[k].unsqueeze(1) - layer_p[k - 1].unsqueeze(1)
            v_kplusone = layer_p[k + 1].unsqueeze(1) - layer_p[k].unsqueeze(1)
            curvature = calculate_paired_curvature(v_kplusone, v_k)
            summation += curvature
            counter += 1
        return summation / counter if counter > 0 else 0

    return [calculate_layer_average_k_curvature(layer.double()) for layer in hidden_states]


def reference_metrics(prompts, alpha):
    """``prompts``: list of ``[L, T_i, D]`` token states (no padding). One dict per layer."""
    prompt_entropies = [ref_compute_entropy(torch.stack([ref_normalize(x) for x in p]), alpha) for p in prompts]
    curvatures = [ref_compute_curvature(p) for p in prompts]
    pooled = torch.stack([p.mean(dim=1) for p in prompts], dim=1)  # L x N x D
    dataset = torch.stack([ref_normalize(x) for x in pooled])
    dataset_entropy = ref_compute_entropy(dataset, alpha)
    dataset_shannon = ref_compute_entropy(dataset, 1)
    L, N, D = dataset.shape
    # compute_per_forward_pass: each prompt's entropies normalised (N = its tokens), then averaged
    prompt_normalised = {norm: np.array([[ref_entropy_normalization(x, norm, p.shape[1], D) for x in values]
                                         for p, values in zip(prompts, prompt_entropies)]).mean(axis=0)
                         for norm in REF_NORMALISATIONS}
    curvature_mean = np.array(curvatures).mean(axis=0)
    rows = []
    for layer in range(L):
        row = {
            "layer": layer,
            "prompt_entropy": np.array(prompt_entropies).mean(axis=0)[layer],
            "dataset_entropy": dataset_entropy[layer],
            "curvature": curvature_mean[layer],
            "effective_rank": math.exp(dataset_shannon[layer]),
            "n_prompts": len(prompts),
        }
        for norm in REF_NORMALISATIONS:
            row[f"prompt_entropy_{norm}"] = prompt_normalised[norm][layer]
            row[f"dataset_entropy_{norm}"] = ref_entropy_normalization(dataset_entropy[layer], norm, N, D)
        row["curvature_logD"] = [x / math.log(D) for x in curvature_mean][layer]  # compute_curvature's 'logD'
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """The matrices here are tiny: one thread spares the thread pool's overhead (seconds when busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_prompts(seed, lengths, n_layers, dim):
    """Random token trajectories ``[L, T, D]`` with a prompt offset and layer-to-layer drift."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for t in lengths:
        x = torch.randn(1, 1, dim, generator=g, dtype=torch.float64) * 2
        x = x + torch.randn(1, t, dim, generator=g, dtype=torch.float64).cumsum(1)
        layers = [x]
        for _ in range(n_layers - 1):
            layers.append(layers[-1] + 0.5 * torch.randn(1, t, dim, generator=g, dtype=torch.float64))
        prompts.append(torch.cat(layers))
    return prompts


def batches(prompts, batch_size, side):
    """Pad into transformers-like batches; padding holds NaN so that any use of it shows."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        n_layers, _, dim = chunk[0].shape
        width = max(p.shape[1] for p in chunk) + 1  # at least one pad column everywhere
        hidden = torch.full((n_layers, len(chunk), width, dim), float("nan"), dtype=torch.float64)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, p in enumerate(chunk):
            t = p.shape[1]
            cols = slice(0, t) if side == "right" else slice(width - t, width)
            hidden[:, i, cols] = p
            mask[i, cols] = 1
        out.append((list(hidden.unbind(0)), mask))
    return out


def run(prompts, batch_size=4, side="right", alpha=1.0, **kwargs):
    metrics = RepresentationMetrics(alpha=alpha, store_dtype=kwargs.pop("store_dtype", torch.float64), **kwargs)
    for hidden, mask in batches(prompts, batch_size, side):
        metrics.update(hidden, mask)
    return metrics.compute()


def rel_diff(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


# (seed, lengths, n_layers, dim): the first has prompts longer than D (the D x D branch of the prompt
# entropy) and more prompts than D (the D x D branch of the dataset entropy); the second neither.
CASES = [
    (0, [2, 3, 5, 16, 9, 14, 7, 4, 13, 11, 6, 15, 8, 3, 10, 12, 2, 5, 9, 16], 3, 12),
    (1, [4, 2, 9, 7, 3, 12, 5, 8, 6, 11], 4, 32),
]


# ---------------------------------------------------------------------------------------------
# Agreement with the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, alpha):
    seed, lengths, n_layers, dim = case
    prompts = make_prompts(seed, lengths, n_layers, dim)
    expected = reference_metrics(prompts, alpha)
    worst = 0.0
    for side, batch_size in [("right", 4), ("left", 3), ("left", len(prompts))]:
        got = run(prompts, batch_size, side, alpha)
        assert [r["layer"] for r in got] == list(range(n_layers))
        for g, e in zip(got, expected):
            assert g["n_prompts"] == e["n_prompts"] == len(prompts)
            for key in METRICS + NORMALISED:
                assert math.isfinite(e[key]) and e[key] > 0
                worst = max(worst, rel_diff(g[key], e[key]))
    assert worst <= 1e-10, worst


def test_normalised_columns_are_the_references_divisions():
    """Every normalisation of the reference is a column, each its own division (the per-prompt
    normalisation differs from normalising the average: prompts have different lengths)."""
    assert set(NORMALISATIONS) == set(REF_NORMALISATIONS)
    prompts = make_prompts(*CASES[0])
    row = run(prompts)[1]
    n, d = len(prompts), prompts[0].shape[2]
    for norm in REF_NORMALISATIONS:
        divisor = ref_entropy_normalization(1.0, norm, n, d) ** -1
        assert row[f"dataset_entropy_{norm}"] == pytest.approx(row["dataset_entropy"] / divisor, rel=1e-12)
    assert row["curvature_logD"] == pytest.approx(row["curvature"] / math.log(d), rel=1e-12)
    averaged_then_divided = row["prompt_entropy"] / math.log(np.mean([p.shape[1] for p in prompts]))
    assert abs(row["prompt_entropy_logN"] - averaged_then_divided) > 1e-3 * averaged_then_divided
    # d = 12 < most prompts' lengths: maxEntropy divides those prompts by log D, the shorter by log N
    assert row["prompt_entropy_maxEntropy"] != pytest.approx(row["prompt_entropy_logD"], rel=1e-6)
    assert row["prompt_entropy_maxEntropy"] != pytest.approx(row["prompt_entropy_logN"], rel=1e-6)
    assert 0 < row["prompt_entropy_maxEntropy"] <= 1 and 0 < row["dataset_entropy_maxEntropy"] <= 1


def test_one_token_prompt_has_zero_entropy_as_in_the_reference():
    z = make_prompts(2, [1], 2, 8)[0]  # L x 1 x D
    normalised = torch.stack([ref_normalize(x) for x in z])
    assert normalised.isnan().all()  # 0/0 in the reference's normalize ...
    assert ref_compute_entropy(normalised) == [0.0, 0.0]  # ... NaN eigenvalues all fail "> 0": empty sum
    assert all(math.isinf(x) for x in ref_compute_entropy(normalised, alpha=2))  # log(0) / (1 - alpha)
    assert ref_compute_curvature(z) == [0, 0]
    assert normalize_rows(z[0]).abs().max() == 0
    assert matrix_entropy(normalize_rows(z[0])) == 0.0
    hidden, mask = batches([z], 1, "left")[0]
    metrics = RepresentationMetrics(store_dtype=torch.float64)
    metrics.update(hidden, mask)
    for row in metrics.compute():
        assert row["prompt_entropy"] == 0.0 and row["curvature"] == 0.0 and row["n_prompts"] == 1
        assert math.isnan(row["dataset_entropy"]) and math.isnan(row["effective_rank"])  # needs >= 2 prompts
        # log N = 0 for one token: the reference divides by zero; lensbench keeps the entropy's 0
        assert all(row[f"prompt_entropy_{norm}"] == 0.0 for norm in NORMALISATIONS)
        assert row["curvature_logD"] == 0.0
        assert all(math.isnan(row[f"dataset_entropy_{norm}"]) for norm in NORMALISATIONS)
    with pytest.raises(ZeroDivisionError):
        ref_entropy_normalization(0.0, "logN", 1, 8)


# ---------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_orthogonal_equal_norm_rows_have_entropy_log_k(k, alpha):
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(k), dtype=torch.float64))
    z = 3.0 * q[:k]
    assert matrix_entropy(z, alpha) == pytest.approx(math.log(k), abs=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 3.0])
def test_renyi_formula(alpha):
    weights = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    z = torch.diag(weights.sqrt())  # orthogonal rows: Gram spectrum = weights
    p = weights / weights.sum()
    expected = math.log(float((p**alpha).sum())) / (1 - alpha)
    assert matrix_entropy(z, alpha) == pytest.approx(expected, rel=1e-12)
    shannon = -float((p * p.log()).sum())
    assert matrix_entropy(z, 1.0) == pytest.approx(shannon, rel=1e-12)
    assert matrix_entropy(z, 1 + 1e-7) == pytest.approx(shannon, rel=1e-6)  # continuous at alpha = 1
    assert matrix_entropy(z, 2.0) < shannon < matrix_entropy(z, 0.5)


def test_entropy_uses_the_reference_branch_and_clamp():
    g = torch.Generator().manual_seed(3)
    for n, d in [(5, 9), (9, 5), (6, 6)]:
        z = normalize_rows(torch.randn(n, d, generator=g, dtype=torch.float64))
        assert matrix_entropy(z) == pytest.approx(ref_compute_entropy(z[None])[0], rel=1e-12)


def test_curvature_known_answers():
    direction = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    line = torch.arange(6, dtype=torch.float64)[:, None] * direction + 7
    assert curvature(line) == pytest.approx(0.0, abs=1e-7)
    zigzag = torch.tensor([[0, 0], [1, 0], [1, 1], [2, 1], [2, 2], [3, 2]], dtype=torch.float64)
    assert curvature(zigzag) == pytest.approx(math.pi / 2, rel=1e-12)
    back_and_forth = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    assert curvature(back_and_forth) == pytest.approx(0.0, abs=1e-7)  # |cos|: a reversal counts as straight
    assert curvature(torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 1.0]])) == 0.0  # zero step
    assert curvature(torch.randn(2, 4)) == 0.0
    sixty = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.5, math.sqrt(3) / 2]], dtype=torch.float64)
    assert curvature(sixty) == pytest.approx(math.pi / 3, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Invariances and options
# ---------------------------------------------------------------------------------------------


def test_independent_of_batch_split_and_padding_side():
    prompts = make_prompts(*CASES[0])
    base = run(prompts, 4, "right")
    for side, batch_size in [("left", 4), ("right", 1), ("left", 7), ("right", 20)]:
        other = run(prompts, batch_size, side)
        for a, b in zip(base, other):
            for key in METRICS:
                assert rel_diff(a[key], b[key]) <= 1e-12


def test_layer_selection_and_negative_indices():
    prompts = make_prompts(*CASES[1])
    full = run(prompts)
    picked = run(prompts, layers=[0, -1])
    assert [r["layer"] for r in picked] == [0, 3]
    for row in picked:
        reference = full[row["layer"]]
        for key in METRICS:
            assert rel_diff(row[key], reference[key]) <= 1e-12
    metrics = RepresentationMetrics(layers=[1, 2])
    for hidden, mask in batches(prompts, 4, "left"):
        metrics.update(hidden, mask)
    assert [r["layer"] for r in metrics.compute([2])] == [2]
    with pytest.raises(ValueError):
        metrics.compute([0])
    with pytest.raises(ValueError):
        RepresentationMetrics(layers=[9]).update(*batches(prompts, 4, "left")[0])
    with pytest.raises(ValueError):
        metrics.update(batches(prompts, 4, "left")[0][0][:2], batches(prompts, 4, "left")[0][1])


def test_float32_storage_and_inputs_stay_close():
    prompts = make_prompts(*CASES[0])
    exact = run(prompts)
    stored32 = run(prompts, store_dtype=torch.float32)
    inputs32 = run([p.float() for p in prompts], store_dtype=torch.float32)
    for a, b, c in zip(exact, stored32, inputs32):
        for key in METRICS:
            assert rel_diff(a[key], b[key]) <= 1e-5
            assert rel_diff(a[key], c[key]) <= 1e-4
        assert a["prompt_entropy"] == b["prompt_entropy"] and a["curvature"] == b["curvature"]


def test_empty_prompts_are_skipped():
    prompts = make_prompts(*CASES[1])
    hidden, mask = batches(prompts[:4], 4, "right")[0]
    mask[2] = 0
    metrics = RepresentationMetrics(store_dtype=torch.float64)
    metrics.update(hidden, mask)
    expected = run([prompts[i] for i in (0, 1, 3)])
    for a, b in zip(metrics.compute(), expected):
        assert a["n_prompts"] == b["n_prompts"] == 3
        for key in METRICS:
            assert rel_diff(a[key], b[key]) <= 1e-12
