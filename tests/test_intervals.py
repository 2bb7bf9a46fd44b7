"""lensbench.intervals against independent computations from the formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from lensbench.intervals import (mcnemar_p, mean_interval, paired_bootstrap, paired_p, signed_rank_p, wilson)

Z = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_closed_form(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """The roots in p of (k/n - p)^2 = z^2 p (1 - p) / n (the score test's acceptance bounds)."""
    # (1 + z²/n) p² - (2 k/n + z²/n) p + (k/n)² = 0
    a = 1 + z * z / n
    b = -(2 * k / n + z * z / n)
    c = (k / n) ** 2
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("k,n", [(0, 1), (0, 10), (10, 10), (3, 10), (37, 60), (1, 400), (200, 400)])
def test_wilson_is_the_score_interval(k, n):
    low, high = wilson(k, n)
    want = wilson_closed_form(k, n)
    assert (low, high) == pytest.approx(want, abs=1e-12)
    assert 0 <= low <= k / n <= high <= 1


def test_wilson_edges_and_arrays():
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] > 0.2  # not the empty Wald interval at k = 0
    assert wilson(10, 10)[1] == 1.0 and wilson(10, 10)[0] < 0.8
    assert all(math.isnan(x) for x in wilson(0, 0))
    assert all(math.isnan(x) for x in wilson(math.nan, 5))
    low, high = wilson(np.array([0, 3, 0]), np.array([10, 10, 0]))
    assert low[:2] == pytest.approx([wilson(0, 10)[0], wilson(3, 10)[0]])
    assert math.isnan(low[2]) and math.isnan(high[2])
    # a 99% interval is wider than a 95% one
    assert wilson(3, 10, 0.99)[0] < wilson(3, 10)[0]


def test_mean_interval_is_the_t_interval():
    x = [0.2, 0.5, 0.9, 0.4, 0.7, 0.1, 0.3, 0.8, 0.6, 1.0]
    mean = sum(x) / len(x)
    s = math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))
    t9 = 2.262157162740992  # the 0.975 quantile of Student's t with 9 degrees of freedom (tables: 2.262)
    assert mean_interval(x) == pytest.approx((mean - t9 * s / math.sqrt(10), mean + t9 * s / math.sqrt(10)), abs=1e-9)
    assert mean_interval([0.5] * 4) == (0.5, 0.5)
    for bad in ([], [1.0], [1.0, math.nan, 2.0]):
        assert all(math.isnan(v) for v in mean_interval(bad))


def mcnemar_by_binomtest(a, b) -> float:
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue


def test_mcnemar_is_the_binomial_test_of_the_discordant_pairs():
    rng = np.random.default_rng(3)
    for n, p_a, p_b in [(60, 0.9, 0.6), (60, 0.8, 0.8), (400, 0.5, 0.45), (7, 1.0, 0.0), (12, 0.5, 0.5)]:
        a = (rng.random(n) < p_a).astype(int)
        b = (rng.random(n) < p_b).astype(int)
        assert mcnemar_p(a, b) == pytest.approx(mcnemar_by_binomtest(a, b), rel=1e-12)
        assert paired_p(a, b) == mcnemar_p(a, b)
    # 10 right only at baseline, 0 the other way: p = 2 / 2^10
    assert mcnemar_p([1] * 10 + [0] * 5, [0] * 15) == pytest.approx(2 / 1024)
    assert mcnemar_p([1, 0, 1], [1, 0, 1]) == 1.0  # no discordant pair
    assert math.isnan(mcnemar_p([], []))
    assert math.isnan(mcnemar_p([1, math.nan], [1, 1]))


def test_signed_rank_matches_its_exact_distribution():
    """Two-sided p of W+ under the 2^n equally likely sign assignments (no ties, no zeros)."""
    d = np.array([0.31, -0.12, 0.47, 0.05, 0.9, -0.33, 0.21, 0.6])
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    w = ranks[d > 0].sum()
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))]
    le = sum(s <= w for s in sums) / len(sums)
    ge = sum(s >= w for s in sums) / len(sums)
    want = min(1.0, 2 * min(le, ge))
    base = np.linspace(0, 1, len(d)) + 2
    assert signed_rank_p(base, base - d) == pytest.approx(want, rel=1e-9)
    assert paired_p(base, base - d) == signed_rank_p(base, base - d)
    assert signed_rank_p([0.5, 0.25], [0.5, 0.25]) == 1.0
    assert math.isnan(signed_rank_p([0.5, math.nan], [0.5, 0.1]))


def test_paired_bootstrap_is_seeded_and_resamples_pairs():
    rng = np.random.default_rng(0)
    a = (rng.random(60) < 0.8).astype(float)
    b = a * (rng.random(60) < 0.7)
    first = paired_bootstrap(a, b, seed=5)
    assert paired_bootstrap(a, b, seed=5) == first
    continuous = rng.random(60)
    assert paired_bootstrap(continuous, b, seed=6) != paired_bootstrap(continuous, b, seed=5)
    drop = float((a - b).mean())
    assert first[0] <= drop <= first[1]
    # the same draws by resampling row indices directly give nearly the same interval
    d = a - b
    idx = np.random.default_rng(11).integers(0, d.size, size=(20000, d.size))
    want = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    assert first == pytest.approx(tuple(want), abs=0.02)
    # a constant difference has no spread: the interval is that difference
    assert paired_bootstrap([1, 1, 0, 0], [1, 1, 0, 0]) == (0.0, 0.0)
    assert paired_bootstrap([0.5] * 5, [0.25] * 5) == (0.25, 0.25)
    for bad in (([], []), ([1, math.nan], [1, 0])):
        assert all(math.isnan(v) for v in paired_bootstrap(*bad))
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1])


def test_paired_bootstrap_covers_the_true_difference():
    """Over 200 synthetic data sets of 60 pairs with a known drop, the 95% interval holds it about 95% of the time."""
    rng = np.random.default_rng(1)
    true_drop = 0.25  # P(right at baseline) 0.9, a right answer kept with probability 13/18 -> 0.65
    covered = 0
    for i in range(200):
        a = (rng.random(60) < 0.9).astype(float)
        b = a * (rng.random(60) < 0.65 / 0.9)
        low, high = paired_bootstrap(a, b, seed=i)
        covered += low <= true_drop <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_error_bars_come_from_the_interval_columns():
    import pandas as pd

    from lensbench.intervals import error_bars

    table = pd.DataFrame({"rate": [0.5, 0.0, math.nan], "rate_ci_low": [0.3, 0.0, math.nan],
                          "rate_ci_high": [0.6, 0.2, math.nan]})
    below, above = error_bars(table, "rate")
    assert list(below) == pytest.approx([0.2, 0.0, 0.0]) and list(above) == pytest.approx([0.1, 0.2, 0.0])
    assert error_bars(table.drop(columns=["rate_ci_low", "rate_ci_high"]), "rate") is None
