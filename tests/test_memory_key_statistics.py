"""memory_ablation's key statistics, slot co-read clustering and ablation/swap correlation
(lensbench.memory.key_statistics): each statistic against a second implementation written with
plain loops from its definition on hand-made records, the clustering on slots read together or
alone, the correlation against scipy's spearmanr, and one run on a tiny memory model."""

from __future__ import annotations

import itertools
import json
import math

import pandas as pd
import pytest

from lensbench.memory.key_statistics import (ALL_GROUPS, CORRELATION_COLUMNS, PAIR_COLUMNS, STAT_COLUMNS,
                                             ablation_swap_correlation, key_statistics, reads)
from test_memory_ablation import analysis, run, trained  # noqa: F401 (the tiny memory model fixture)


def example(index, bucket, split, slots, weights, layer="1"):
    return {"index": index, "bucket": bucket, "split": split, "slots": {layer: slots}, "weights": {layer: weights}}


#: Slots 5 and 6 are always read together (at the same position, by different heads); slot 9 is
#: read alone (every head of its one position reads it); slot 5 is read twice, with weights 0.2 and
#: 0.6, by row 0 at its first position.
RECORDS = [
    {"labels": {"intervention": "baseline"}, "examples": [
        example(0, 1, "seen", [[5, 6, 5, 6], [1, 2, 3, 4]], [[0.2, 0.8, 0.6, 0.4], [0.1, 0.2, 0.3, 0.4]]),
        example(1, 1, "seen", [[5, 6, 7, 8], [9, 9, 9, 9]], [[0.5, 0.5, 0.9, 0.1], [0.7, 0.3, 0.2, 0.8]]),
        example(2, 2, "heldout", [[5, 6, 1, 2], [3, 4, 7, 8], [5, 6, 3, 4]],
                [[0.3, 0.7, 0.6, 0.4], [0.1, 0.9, 0.5, 0.5], [0.4, 0.6, 0.5, 0.5]]),
    ]},
    {"labels": {"intervention": "mask"}, "examples": [{"index": 0, "bucket": 1, "split": "seen"}]},
]


def loops(records):
    """Every statistic of key_statistics.csv and slot_pairs.csv from its definition, with loops."""
    reads_of, weights, rows, groups, at = {}, {}, {}, {}, {}
    sets = []  # the slots read at each answer position (over heads)
    for rec in records:
        if rec["labels"]["intervention"] != "baseline":
            continue
        for ex in rec["examples"]:
            for per_pos, per_weight in zip(ex["slots"]["1"], ex["weights"]["1"]):
                for s, w in zip(per_pos, per_weight):
                    reads_of[s] = reads_of.get(s, 0) + 1
                    weights.setdefault(s, []).append(w)
                    rows.setdefault(s, set()).add((ex["split"], ex["index"]))
                    groups.setdefault(s, set()).add(f"bucket={ex['bucket']}/{ex['split']}")
                sets.append(set(per_pos))
                for s in set(per_pos):
                    at[s] = at.get(s, 0) + 1
    total = sum(reads_of.values())
    stats = {}
    for s in reads_of:
        mean = sum(weights[s]) / len(weights[s])
        std = math.sqrt(sum((w - mean) ** 2 for w in weights[s]) / len(weights[s]))
        stats[s] = {"reads": reads_of[s], "share": reads_of[s] / total, "rows": len(rows[s]), "groups": len(groups[s]),
                    "positions": at[s], "weight_mean": mean, "weight_std": std, "weight_sum": sum(weights[s])}
    co = {}
    for a, b in itertools.combinations(sorted(reads_of), 2):
        n = sum(1 for read in sets if a in read and b in read)
        if n:
            co[a, b] = (n, n / (at[a] + at[b] - n))
    return stats, co


def test_each_statistic_equals_its_definition():
    stats, pairs = key_statistics(reads(RECORDS))
    assert list(stats.columns) == STAT_COLUMNS and list(pairs.columns) == PAIR_COLUMNS
    want, co = loops(RECORDS)
    got = stats.set_index("slot")
    assert sorted(got.index) == sorted(want)
    for s, row in want.items():
        for column, value in row.items():
            assert got.loc[s, column] == pytest.approx(value, abs=1e-12), (s, column)
    five = stats.set_index("slot").loc[5]
    assert five.reads == 5 and five.rows == 3 and five.groups == 2
    # row 0, first position: slot 5 read by two heads with weights 0.2 and 0.6 -> mean 0.4 there
    one = reads([{"labels": {"intervention": "baseline"}, "examples": [RECORDS[0]["examples"][0]]}])
    assert key_statistics(one)[0].set_index("slot").loc[5, "weight_mean"] == pytest.approx(0.4)
    assert key_statistics(one)[0].set_index("slot").loc[5, "weight_std"] == pytest.approx(0.2)
    # ranks by reads, ties by slot; shares sum to 1
    assert stats["rank"].tolist() == list(range(1, len(stats) + 1))
    assert stats["reads"].is_monotonic_decreasing and stats["share"].sum() == pytest.approx(1)
    # every co-read pair of clustered slots is listed (all slots are clustered here), with its Jaccard
    listed = {(a, b): (c, j) for a, b, c, j in zip(pairs.a, pairs.b, pairs.co_reads, pairs.jaccard)}
    assert set(listed) == set(co)
    for key, (n, jaccard) in co.items():
        assert listed[key][0] == n and listed[key][1] == pytest.approx(jaccard)
    assert listed[5, 6] == (4, 1.0)


def test_slots_read_together_share_a_cluster_and_a_slot_read_alone_has_its_own():
    stats, pairs = key_statistics(reads(RECORDS))
    cluster = stats.set_index("slot")["cluster"]
    assert cluster[5] == cluster[6]
    assert (cluster.drop(9) != cluster[9]).all()
    alone = stats.set_index("slot").loc[9]
    assert alone.cluster_size == 1
    sizes = stats.drop_duplicates("cluster").set_index("cluster")["cluster_size"]
    assert sizes.sum() == len(stats) and list(sizes.sort_index()) == sorted(sizes, reverse=True)  # 0 the largest
    assert sorted(stats["leaf"]) == list(range(len(stats)))


def test_only_the_most_read_slots_are_clustered_and_rare_pairs_left_out(monkeypatch):
    from lensbench.memory import key_statistics as ks

    monkeypatch.setattr(ks, "CLUSTER_SLOTS", 3)
    stats, pairs = key_statistics(reads(RECORDS))
    clustered = set(stats.loc[stats.cluster.notna(), "slot"])
    assert clustered == set(stats.slot[:3]) and stats.cluster[3:].isna().all()
    both = pairs.a.isin(clustered) & pairs.b.isin(clustered)
    assert (pairs.loc[~both, "co_reads"] >= ks.MIN_CO_READS).all()
    _, co = loops(RECORDS)
    assert len(pairs) == sum(1 for (a, b), (n, _) in co.items() if n >= 2 or {a, b} <= clustered)


def accuracy(drops, swaps, rows_per_state=10):
    """accuracy.csv and swap_matrix.csv of single-slot masks (``drops``: slot -> drop per group)
    and value swaps (``swaps``: (a, b) -> answers changed)."""
    acc = [{"intervention": "baseline", "transform": "", "target": "", "group": g, "n": 5, "exact_drop": 0.0}
           for g in ("g1", "g2")]
    for slot, per_group in drops.items():
        acc += [{"intervention": "top_slot", "transform": "mask_memory_keys", "target": json.dumps([slot]),
                 "group": g, "n": 5, "exact_drop": d} for g, d in zip(("g1", "g2"), per_group)]
    acc.append({"intervention": "top8", "transform": "mask_memory_keys", "target": "[1,2]", "group": "g1", "n": 5,
                "exact_drop": 0.9})  # several slots: not a single-slot state
    for a, b in swaps:
        acc += [{"intervention": "swap", "transform": "swap_memory_values", "target": json.dumps([a, b],
                 separators=(",", ":")), "group": g, "n": rows_per_state // 2, "exact_drop": 0.0} for g in ("g1", "g2")]
    matrix = pd.DataFrame([{"intervention": "swap", "a": a, "b": b, "changed": c, "follow": 0, "follow_share": 0.0}
                           for (a, b), c in swaps.items()])
    return pd.DataFrame(acc), matrix


def test_correlation_is_spearman_of_the_per_slot_drops_and_swap_shares():
    from scipy.stats import spearmanr

    drops = {1: (0.5, 0.3), 2: (0.1, 0.1), 3: (0.2, 0.6), 4: (0.0, 0.1), 5: (0.3, 0.3), 6: (0.9, 0.1)}
    swaps = {(a, b): (a * 7 + b * 3) % 10 for a, b in itertools.combinations([1, 2, 3, 4, 5, 7], 2)}
    acc, matrix = accuracy(drops, swaps)
    table = ablation_swap_correlation(acc, matrix)
    assert list(table.columns) == CORRELATION_COLUMNS
    points = table[(table.group == ALL_GROUPS) & table.slot.notna()].set_index("slot")
    assert sorted(points.index) == [1, 2, 3, 4, 5]  # 6 is never swapped, 7 never ablated
    x, y = [], []
    for s in sorted(points.index):
        x.append(sum(drops[s]) / 2)
        mine = [c / 10 for (a, b), c in swaps.items() if s in (a, b)]
        y.append(sum(mine) / len(mine))
        assert points.loc[s, "exact_drop"] == pytest.approx(x[-1])
        assert points.loc[s, "changed_share"] == pytest.approx(y[-1]) and points.loc[s, "swaps"] == len(mine)
    summary = table[(table.group == ALL_GROUPS) & table.slot.isna()].iloc[0]
    expected = spearmanr(x, y)
    assert summary.n == 5 and summary.spearman_rho == pytest.approx(expected.statistic)
    assert summary.p_value == pytest.approx(expected.pvalue)
    assert summary.ci95_low < summary.spearman_rho < summary.ci95_high
    g2 = table[(table.group == "g2") & table.slot.isna()].iloc[0]
    assert g2.spearman_rho == pytest.approx(spearmanr([drops[s][1] for s in sorted(points.index)], y).statistic)


def test_no_correlation_without_both_kinds_of_state_on_the_same_slots():
    acc, matrix = accuracy({1: (0.5, 0.3), 2: (0.1, 0.1)}, {(3, 4): 2, (3, 5): 1})
    assert not len(ablation_swap_correlation(acc, matrix))
    acc, matrix = accuracy({1: (0.5, 0.3)}, {})
    assert not len(ablation_swap_correlation(acc, matrix.reindex(columns=["intervention", "a", "b", "changed"])))


def test_spearman_interval_is_shared_with_layer_sweep():
    from lensbench.intervals import spearman, spearman_interval
    from lensbench.layer_sweep import correlation

    assert correlation.spearman is spearman and correlation.spearman_interval is spearman_interval
    low, high = spearman_interval(0.5, 28)
    half = 1.959963984540054 * math.sqrt((1 + 0.125) / 25)
    assert (low, high) == pytest.approx((math.tanh(math.atanh(0.5) - half), math.tanh(math.atanh(0.5) + half)))
    assert math.isnan(spearman_interval(0.5, 3)[0]) and spearman([1, 2, 3], [1, 1, 1])[2] == 3


def test_a_run_writes_the_three_tables_and_their_figures(trained):
    interventions = [
        {"name": "top_slot", "transform": "mask_memory_keys", "params": {"layer": 1}, "top": {"n": 4, "each": True}},
        {"name": "swap", "transform": "swap_memory_values", "params": {"layer": 1}, "top": {"n": 4}},
    ]
    # teacher-forced swap answers: the swap matrix is rewritten after the merge, and the correlation with it
    run(trained, ["predict", "--config", str(analysis(trained, "key_statistics", interventions,
                                                      swap_answers="teacher_forced"))])
    out = trained / "outputs" / "key_statistics"
    stats = pd.read_csv(out / "key_statistics.csv")
    usage = pd.read_csv(out / "slot_usage.csv")
    assert list(stats.columns) == STAT_COLUMNS
    assert stats.reads.sum() == usage["count"].sum() and len(stats) == len(usage)
    assert stats.set_index("slot")["weight_sum"].round(4).to_dict() == usage.set_index("slot")["weight"].round(4).to_dict()
    assert stats.cluster.notna().sum() == min(64, len(stats))
    assert list(pd.read_csv(out / "slot_pairs.csv").columns) == PAIR_COLUMNS
    corr = pd.read_csv(out / "ablation_swap_correlation.csv", keep_default_na=False, na_values=[""])
    assert list(corr.columns) == CORRELATION_COLUMNS
    summary = corr[(corr.group == ALL_GROUPS) & corr.slot.isna()]
    assert len(summary) == 1 and summary.n.item() == 4
    points = corr[(corr.group == ALL_GROUPS) & corr.slot.notna()]
    assert (points.swaps == 3).all() and len(points) == 4
    swaps = pd.read_csv(out / "swap_matrix.csv")
    assert set(pd.read_csv(out / "swap_predictions.csv", keep_default_na=False)["compared"]) <= {"teacher_forced"}
    rows = len(pd.read_csv(out / "examples.csv").query("intervention == 'baseline'"))
    for slot, share in zip(points.slot, points.changed_share):
        mine = swaps[(swaps.a == slot) | (swaps.b == slot)]
        assert share == pytest.approx((mine.changed / rows).mean())
    acc = pd.read_csv(out / "accuracy.csv", keep_default_na=False, na_values=[""])
    for slot, drop in zip(points.slot, points.exact_drop):
        assert drop == pytest.approx(acc[acc.target == f"[{int(slot)}]"].exact_drop.mean())
    assert (out / "slot_pairs.png").exists() and (out / "ablation_swap_correlation.png").exists()
