"""memory_ablation's intervals and paired tests, from records built here with known outcomes: the
merge pairs each row with the unablated model's same row (not the same position in the records),
and every interval and p-value equals an independent computation from its formula."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, wilcoxon

from lensbench.analyses.memory_ablation import MemoryAblation
from lensbench.intervals import BOOTSTRAP_SEED, paired_bootstrap

Z = 1.959963984540054


def wilson_closed_form(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def example(index: int, bucket: int, right: list[int | None]) -> dict:
    bad = right.count(None)
    return {"split": "seen", "bucket": bucket, "index": index, "answer": f"{index:03d}", "prediction": "x",
            "exact": (all(right) if not bad else None), "token_right": right,
            "answer_prob": 0.5 if not bad else math.nan, "answer_rank": 0.0 if not bad else math.nan,
            "answer_entropy": 1.0 if not bad else math.nan, "n_nonfinite_positions": bad,
            # the greedy answer: right on even rows that are right teacher-forced (none for a non-finite row)
            "generated": "x", "generated_exact": (all(right) and index % 2 == 0) if not bad else None}


def state(intervention: str, target: str, examples: list[dict]) -> dict:
    transform = "" if intervention == "baseline" else "mask_memory_keys"
    return {"labels": {"intervention": intervention, "transform": transform, "target": target}, "examples": examples}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    rng = np.random.default_rng(7)
    n = 40
    base_tokens = {i: [int(x) for x in rng.random(3) < 0.9] for i in range(2 * n)}
    # bucket 4: rows 0..39; bucket 16: rows 40..79. The intervention loses tokens at random.
    masked_tokens = {i: [t * int(rng.random() < 0.7) for t in r] for i, r in base_tokens.items()}
    baseline = [example(i, 4 if i < n else 16, r) for i, r in base_tokens.items()]
    masked = [example(i, 4 if i < n else 16, r) for i, r in masked_tokens.items()]
    masked.reverse()  # stored in another order: pairing is by row, not by position
    nan_rows = [example(i, 4 if i < n else 16, r) for i, r in base_tokens.items()]
    nan_rows[3] = example(3, 4, [1, None, 1])  # one row of bucket 4 with a non-finite answer position
    records = [state("baseline", "", baseline[:50]), state("masked", "[1,2]", masked),
               state("baseline", "", baseline[50:]), state("nanrow", "[3]", nan_rows)]
    folder = tmp_path_factory.mktemp("intervals")
    MemoryAblation.merge(records, folder)
    acc = pd.read_csv(folder / "accuracy.csv", keep_default_na=False, na_values=[""])
    return folder, acc, base_tokens, masked_tokens


def test_exact_match_carries_its_wilson_interval(merged):
    _, acc, base_tokens, _ = merged
    base = acc[acc.intervention == "baseline"].set_index("bucket")
    for bucket, rows in ((4, range(40)), (16, range(40, 80))):
        k = sum(all(base_tokens[i]) for i in rows)
        assert base.loc[bucket, "exact_match"] == pytest.approx(k / 40)
        low, high = wilson_closed_form(k, 40)
        assert base.loc[bucket, "exact_match_ci_low"] == pytest.approx(low, abs=1e-9)
        assert base.loc[bucket, "exact_match_ci_high"] == pytest.approx(high, abs=1e-9)
        digits = [sum(base_tokens[i]) / 3 for i in rows]
        half = 2.022690920036761 * np.std(digits, ddof=1) / math.sqrt(40)  # t_{0.975, 39}
        assert base.loc[bucket, "digit_accuracy_ci_low"] == pytest.approx(np.mean(digits) - half, abs=1e-9)
        assert base.loc[bucket, "digit_accuracy_ci_high"] == pytest.approx(np.mean(digits) + half, abs=1e-9)


def test_the_greedy_exact_match_carries_its_wilson_interval(merged):
    _, acc, base_tokens, _ = merged
    base = acc[acc.intervention == "baseline"].set_index("bucket")
    nan = acc[acc.intervention == "nanrow"].set_index("bucket")
    for bucket, rows in ((4, range(40)), (16, range(40, 80))):
        k = sum(all(base_tokens[i]) and i % 2 == 0 for i in rows)
        assert base.loc[bucket, "generated_exact_match"] == pytest.approx(k / 40)
        assert (base.loc[bucket, "generated_exact_match_ci_low"], base.loc[bucket, "generated_exact_match_ci_high"]) \
            == pytest.approx(wilson_closed_form(k, 40), abs=1e-9)
    # the non-finite row has no greedy answer: the rate and its interval are over the other 39
    k = sum(all(base_tokens[i]) and i % 2 == 0 for i in range(40) if i != 3)
    assert (nan.loc[4, "generated_exact_match_ci_low"], nan.loc[4, "generated_exact_match_ci_high"]) == \
        pytest.approx(wilson_closed_form(k, 39), abs=1e-9)


def test_drops_carry_a_paired_bootstrap_interval_and_the_paired_tests_p_value(merged):
    _, acc, base_tokens, masked_tokens = merged
    masked = acc[acc.intervention == "masked"].set_index("bucket")
    for bucket, rows in ((4, range(40)), (16, range(40, 80))):
        before = np.array([float(all(base_tokens[i])) for i in rows])
        after = np.array([float(all(masked_tokens[i])) for i in rows])
        drop = before.mean() - after.mean()
        assert masked.loc[bucket, "exact_drop"] == pytest.approx(drop)
        only_before, only_after = int(((before == 1) & (after == 0)).sum()), int(((before == 0) & (after == 1)).sum())
        assert only_before > only_after
        assert masked.loc[bucket, "exact_drop_p"] == pytest.approx(
            binomtest(only_before, only_before + only_after, 0.5).pvalue, rel=1e-9)
        # the bootstrap resamples rows: the interval is that of the rows in their pairs, with the seed
        low, high = masked.loc[bucket, "exact_drop_ci_low"], masked.loc[bucket, "exact_drop_ci_high"]
        assert (low, high) == pytest.approx(paired_bootstrap(before, after, seed=BOOTSTRAP_SEED))
        assert low <= drop <= high and low > 0  # the rows lost are many: the interval excludes 0
        d_before = np.array([sum(base_tokens[i]) / 3 for i in rows])
        d_after = np.array([sum(masked_tokens[i]) / 3 for i in rows])
        diff = d_before - d_after
        assert masked.loc[bucket, "digit_drop_p"] == pytest.approx(wilcoxon(diff[diff != 0]).pvalue, rel=1e-9)
        assert masked.loc[bucket, "digit_drop_ci_low"] <= diff.mean() <= masked.loc[bucket, "digit_drop_ci_high"]
    baseline = acc[acc.intervention == "baseline"]
    assert (baseline.exact_drop_ci_low == 0).all() and (baseline.exact_drop_ci_high == 0).all()
    assert (baseline.exact_drop_p == 1).all()


def test_each_answer_position_carries_its_interval_and_paired_test(merged):
    folder, _, base_tokens, masked_tokens = merged
    table = pd.read_csv(folder / "position_impact.csv", keep_default_na=False, na_values=[""])
    masked = table[table.intervention == "masked"].set_index("position")
    baseline = table[table.intervention == "baseline"].set_index("position")
    for p in range(3):
        before = np.array([base_tokens[i][p] for i in range(80)], dtype=float)
        after = np.array([masked_tokens[i][p] for i in range(80)], dtype=float)
        k = int(before.sum())
        assert baseline.loc[p, "token_accuracy_ci_low"] == pytest.approx(wilson_closed_form(k, 80)[0], abs=1e-9)
        assert baseline.loc[p, "token_accuracy_ci_high"] == pytest.approx(wilson_closed_form(k, 80)[1], abs=1e-9)
        only_before, only_after = int(((before == 1) & (after == 0)).sum()), int(((before == 0) & (after == 1)).sum())
        assert masked.loc[p, "drop"] == pytest.approx(before.mean() - after.mean())
        assert masked.loc[p, "drop_p"] == pytest.approx(binomtest(only_before, only_before + only_after).pvalue, rel=1e-9)
        assert (masked.loc[p, "drop_ci_low"], masked.loc[p, "drop_ci_high"]) == pytest.approx(
            paired_bootstrap(before, after))
    nan = table[table.intervention == "nanrow"].set_index("position")
    assert math.isnan(nan.loc[1, "drop_ci_low"]) and math.isnan(nan.loc[1, "token_accuracy_ci_low"])
    assert nan.loc[0, "drop_ci_low"] == nan.loc[0, "drop_ci_high"] == 0 and nan.loc[0, "drop_p"] == 1


def test_a_group_with_a_non_finite_row_has_no_interval(merged):
    _, acc, _, _ = merged
    nan = acc[acc.intervention == "nanrow"].set_index("bucket")
    columns = [f"{m}{end}" for m in ("exact_match", "digit_accuracy", "exact_drop", "digit_drop")
               for end in ("_ci_low", "_ci_high")] + ["exact_drop_p", "digit_drop_p"]
    assert nan.loc[4, columns].isna().all()
    assert nan.loc[16, columns].notna().all()
    assert nan.loc[16, "exact_drop_ci_low"] == nan.loc[16, "exact_drop_ci_high"] == 0  # same rows as baseline
    assert nan.loc[16, "exact_drop_p"] == 1.0


def test_the_figures_draw_the_intervals(merged):
    folder, _, _, _ = merged
    outputs = MemoryAblation.plot(folder)
    names = {p.name for p in outputs}
    assert {"accuracy_by_bucket.png", "exact_drop.png", "impact_matrix.png"} <= names
    assert (folder / "exact_drop.png").stat().st_size > 1000
    import matplotlib.pyplot as plt

    from lensbench.analyses.memory_ablation import _drop_figure

    drawn = []
    plt.Axes.errorbar, errorbar = (lambda self, x, y, yerr=None, **kw: drawn.append((kw["label"], list(y), yerr))
                                   or errorbar(self, x, y, yerr=yerr, **kw)), plt.Axes.errorbar
    try:
        _drop_figure(plt, pd.read_csv(folder / "accuracy.csv"), folder)
    finally:
        plt.Axes.errorbar = errorbar
    assert [label for label, _, _ in drawn] == ["masked [1,2]", "nanrow [3]"]  # largest mean drop first
    label, y, (below, above) = drawn[0]
    acc = pd.read_csv(folder / "accuracy.csv")
    masked = acc[acc.intervention == "masked"]
    assert list(below) == pytest.approx(list(masked.exact_drop - masked.exact_drop_ci_low))
    assert list(above) == pytest.approx(list(masked.exact_drop_ci_high - masked.exact_drop))
