"""Exact merging of per-item summary statistics (count, mean, M2 = sum of squared deviations)."""

from __future__ import annotations


def chan_merge(n_a: int, mean_a: float, m2_a: float, n_b: int, mean_b: float, m2_b: float) -> tuple[float, float]:
    """Mean and M2 of two groups of ``n_a`` and ``n_b`` values combined (Chan et al.'s pairwise
    update): exact whatever order or batching the groups came in. Two empty groups give (mean_a, m2_a)."""
    n = n_a + n_b
    if n == 0:
        return mean_a, m2_a
    delta = mean_b - mean_a
    return mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n
