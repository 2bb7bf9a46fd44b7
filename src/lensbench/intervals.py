"""Uncertainty of the rates and means an analysis reports, in one place for every analysis.

- ``wilson(k, n)``: the Wilson score interval of a rate (k of n items), e.g. exact match of a group.
- ``mean_interval(values)``: the Student t interval of a mean over items.
- ``ratio_interval(sums, counts)``: the interval of a mean over tokens grouped in texts, ``sum(sums)
  / sum(counts)``, with the texts as the independent units (a cluster-robust, delta-method standard
  error and a t quantile on texts - 1 degrees of freedom), since tokens of one text are not independent.
- ``paired_bootstrap(baseline, other)``: a seeded percentile bootstrap interval of the mean paired
  difference ``baseline - other`` (a drop), resampling the pairs (rows) with replacement.
- ``mcnemar_p(baseline, other)``: the exact McNemar test of two paired binary outcomes (a
  two-sided binomial test of the discordant pairs against 1/2); ``signed_rank_p`` the Wilcoxon
  signed-rank test of paired continuous values (scipy); ``paired_p`` picks one of them.
- ``spearman(x, y)``: Spearman's rho, its p-value and n over the pairs where both are finite
  (scipy.stats.spearmanr); ``spearman_interval(rho, n)`` its Fisher z interval.
- ``error_bars(table, column)``: matplotlib's ``yerr`` from a table's ``<column>_ci_low`` and ``_ci_high``.

Every function takes plain sequences or numpy arrays; a NaN among the values makes the result NaN
(a group with an unscored row has no statistic, as its mean is NaN), and so does no value at all.
Intervals are two-sided at ``confidence`` (default 0.95); p-values are two-sided and uncorrected
for the number of states and groups tested.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

CONFIDENCE = 0.95
#: Resamples of ``paired_bootstrap`` and the seed of its generator (the same for every call, so an
#: interval depends on its pairs only, not on which other groups were computed before it).
BOOTSTRAP_RESAMPLES = 5000
BOOTSTRAP_SEED = 0

NAN2 = (math.nan, math.nan)


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(k, n, confidence: float = CONFIDENCE):
    """Wilson score interval ``(low, high)`` of the rate ``k / n``: the p with
    |k/n - p| <= z sqrt(p (1 - p) / n), i.e. (p̂ + z²/2n ± z sqrt(p̂(1-p̂)/n + z²/4n²)) / (1 + z²/n).
    ``k`` and ``n`` may be numbers or arrays (then two arrays come back); n = 0 or a NaN gives NaN.
    Unlike p̂ ± z sqrt(p̂(1-p̂)/n) it stays inside [0, 1] and is not empty at k = 0 or k = n."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    z = _z(confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        bad = ~(n > 0) | ~np.isfinite(p)
        # exact ends at k = 0 and k = n (where the formula leaves a rounding error)
        low = np.where(bad, np.nan, np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0)))
        high = np.where(bad, np.nan, np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0)))
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def mean_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student t interval of the mean of ``values`` (items drawn independently):
    mean ± t_{(1+c)/2, n-1} s / sqrt(n), s the sample standard deviation. NaN for fewer than 2
    values or a NaN among them; (mean, mean) when all values are equal."""
    from scipy.stats import t

    x = np.asarray(values, dtype=float)
    if x.size < 2 or np.isnan(x).any():
        return NAN2
    mean = float(x.mean())
    half = float(t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean - half, mean + half


def ratio_interval(sums, counts, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval of the ratio mean R = Σ y_i / Σ n_i over clusters i (texts), y_i the sum of a value
    over the n_i tokens of text i. Its delta-method (linearisation) standard error, with the texts
    drawn independently, is sqrt(k / (k - 1) · Σ (y_i - R n_i)²) / Σ n_i for k texts (Cochran 1977,
    §6.9; the CR1 cluster-robust error of a mean); the interval is R ± t_{(1+c)/2, k-1} · se.
    NaN for fewer than 2 texts with tokens, no token, or a NaN among the values; a rate (y_i counts
    of n_i) may leave [0, 1] only by the width of this normal approximation, so it is clipped there
    by the caller that knows it is a rate."""
    from scipy.stats import t

    y = np.asarray(sums, dtype=float)
    n = np.asarray(counts, dtype=float)
    keep = n > 0
    y, n = y[keep], n[keep]
    k, total = y.size, n.sum()
    if k < 2 or np.isnan(y).any():
        return NAN2
    ratio = y.sum() / total
    se = math.sqrt(k / (k - 1) * float(((y - ratio * n) ** 2).sum())) / total
    half = float(t.ppf(0.5 + confidence / 2, k - 1)) * se
    return float(ratio - half), float(ratio + half)


def _pairs(baseline, other) -> np.ndarray | None:
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(other, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    if a.size == 0 or np.isnan(a).any() or np.isnan(b).any():
        return None
    return a - b


def paired_bootstrap(baseline, other, confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(baseline - other) over paired rows: the pairs are
    resampled with replacement ``resamples`` times from a generator seeded ``seed``, and the
    (1-c)/2 and (1+c)/2 quantiles of the resampled means are the interval. Reproducible: the same
    pairs and seed give the same interval. NaN without pairs or with a NaN among them."""
    d = _pairs(baseline, other)
    if d is None:
        return NAN2
    values, counts = np.unique(d, return_counts=True)
    return _bootstrap(tuple(values.tolist()), tuple(counts.tolist()), confidence, resamples, seed)


@lru_cache(maxsize=4096)
def _bootstrap(values: tuple, counts: tuple, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    # Resampling n pairs with replacement draws each distinct difference a multinomial number of
    # times: the same distribution as drawing row indices, and cheaper where there are few distinct
    # differences (a binary outcome's -1, 0, 1); many distinct ones are resampled by index.
    if len(values) == 1:
        return values[0], values[0]
    n = sum(counts)
    rng = np.random.default_rng(seed)
    if len(values) <= 8:
        draws = rng.multinomial(n, np.asarray(counts, dtype=float) / n, size=resamples)
        means = draws @ np.asarray(values, dtype=float) / n
    else:
        d = np.repeat(np.asarray(values, dtype=float), counts)
        means = d[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return float(low), float(high)


def mcnemar_p(baseline, other) -> float:
    """Exact McNemar test of paired binary outcomes (1 right, 0 wrong): with b pairs right only in
    ``baseline`` and c right only in ``other``, the two-sided p-value of b under Binomial(b + c, 1/2),
    min(1, 2 P(X <= min(b, c))). 1.0 when no pair is discordant; NaN without pairs or with a NaN."""
    d = _pairs(baseline, other)
    if d is None:
        return math.nan
    b, c = int((d > 0).sum()), int((d < 0).sum())
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


def signed_rank_p(baseline, other) -> float:
    """Wilcoxon signed-rank test of paired values (scipy.stats.wilcoxon on baseline - other, zero
    differences dropped; exact for small samples without ties, else its normal approximation):
    two-sided p-value. 1.0 when every difference is 0; NaN without pairs or with a NaN."""
    from scipy.stats import wilcoxon

    d = _pairs(baseline, other)
    if d is None:
        return math.nan
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox").pvalue)


def paired_p(baseline, other) -> float:
    """The paired test of an intervention against the unablated model: ``mcnemar_p`` when both
    outcomes are binary (0/1), else ``signed_rank_p``."""
    a, b = np.asarray(baseline, dtype=float), np.asarray(other, dtype=float)
    binary = np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()
    return mcnemar_p(a, b) if binary else signed_rank_p(a, b)


def spearman(x, y) -> tuple[float, float, int]:
    """(rho, p, n): ``scipy.stats.spearmanr`` of ``x`` and ``y`` over the n pairs where both are
    finite; rho and p NaN when n < 3 or either side is constant there."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan, math.nan, n
    result = spearmanr(x[ok], y[ok])
    return float(result.statistic), float(result.pvalue), n


def spearman_interval(rho: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Fisher z interval of a Spearman ``rho`` over ``n`` points: tanh(atanh(rho) ± z SE) with
    Bonett and Wright's (2000) SE = sqrt((1 + rho² / 2) / (n - 3)). NaN for n < 4 or a NaN rho;
    (rho, rho) at |rho| = 1."""
    if n < 4 or not math.isfinite(rho):
        return NAN2
    if abs(rho) >= 1:
        return rho, rho
    half = _z(confidence) * math.sqrt((1 + rho * rho / 2) / (n - 3))
    return math.tanh(math.atanh(rho) - half), math.tanh(math.atanh(rho) + half)


def error_bars(table, column: str):
    """Error bars ``[below, above]`` of ``column`` for matplotlib's ``errorbar(yerr=...)``, from the
    table's ``<column>_ci_low`` and ``<column>_ci_high`` columns; None for a table written without
    them. An unknown (NaN) end draws no bar."""
    if f"{column}_ci_low" not in table:
        return None
    return [(table[column] - table[f"{column}_ci_low"]).clip(lower=0).fillna(0).to_numpy(),
            (table[f"{column}_ci_high"] - table[column]).clip(lower=0).fillna(0).to_numpy()]
