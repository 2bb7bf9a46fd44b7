"""Statistics of the memory slots a model reads, and how ablating a slot relates to swapping it.

Pure functions over memory_ablation's records and tables (no model):

- ``reads(records)``: one row per slot read by the unablated model at an answer position (layer,
  row, group, position, slot, weight), from the records' ``slots``/``weights``.
- ``key_statistics(reads)``: per layer and slot, how often it is read, by how many rows and groups,
  the mean and spread of the softmax weight it gets, and the co-read cluster of the most-read slots;
  with ``slot_pairs`` (the pairs of slots read at the same answer position) and their clustering.
- ``ablation_swap_correlation(acc, swaps)``: per slot, the accuracy drop of ablating it alone
  against the share of answers that change when its value is swapped with another's, and
  Spearman's rho of the two per pair of families (``lensbench.intervals.spearman``).
- ``figures(plt, run_dir)``: slot_pairs.png and ablation_swap_correlation.png from the CSVs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: The slots of each layer that are clustered (the most read; fewer when fewer are read).
CLUSTER_SLOTS = 64
#: Average-linkage clusters are cut at this distance (1 - Jaccard): a cluster's slots share, on
#: average over their pairs, at least 1 - CLUSTER_DISTANCE of the positions either is read at.
CLUSTER_DISTANCE = 0.8
#: slot_pairs.csv keeps the pairs co-read at least this often ...
MIN_CO_READS = 2
#: ... at most this many per layer (the most co-read), and every co-read pair of clustered slots.
MAX_PAIRS = 20000
#: Non-swap transforms whose single-slot states give a slot's ablation impact, and swap transforms
#: whose pairs are slots.
SLOT_ABLATIONS = ("mask_memory_keys", "ablate_memory_values")
SLOT_SWAPS = ("swap_memory_values",)
#: The ``group`` of correlation rows over all groups (the mean of the groups' drops).
ALL_GROUPS = "(all groups)"

READ_COLUMNS = ["layer", "row", "group", "position", "slot", "weight"]
STAT_COLUMNS = ["layer", "slot", "rank", "reads", "share", "positions", "rows", "groups", "weight_mean",
                "weight_std", "weight_sum", "cluster", "cluster_size", "leaf"]
PAIR_COLUMNS = ["layer", "a", "b", "co_reads", "positions_a", "positions_b", "jaccard", "cluster_a", "cluster_b"]
CORRELATION_COLUMNS = ["ablation", "swap", "group", "slot", "exact_drop", "ablation_states", "changed_share",
                       "swaps", "n", "spearman_rho", "ci95_low", "ci95_high", "p_value"]


def reads(records: list[dict[str, Any]], baseline: str = "baseline"):
    """One row per slot read (every head's top-k) at every answer position of the unablated
    model's examples: ``layer``, ``row`` (split/index), ``group``, ``position`` (a number unique to
    the row's answer position), ``slot``, ``weight`` (its softmax weight in that head)."""
    import pandas as pd

    from ..synthetic.datasets import group_of

    out: list[tuple] = []
    position = 0
    for rec in records:
        if rec["labels"].get("intervention") != baseline:
            continue
        for ex in rec["examples"]:
            if "slots" not in ex:
                continue
            row = f"{ex.get('split') or ''}/{ex['index']}"
            group = group_of(ex)
            for layer, per_pos in ex["slots"].items():
                for p, (slots, weights) in enumerate(zip(per_pos, ex["weights"][layer])):
                    at = position + p
                    out += [(int(layer), row, group, at, int(s), float(w)) for s, w in zip(slots, weights)]
            position += max((len(v) for v in ex["slots"].values()), default=0)
    return pd.DataFrame(out, columns=READ_COLUMNS)


def key_statistics(table):
    """(key_statistics, slot_pairs) of the reads ``table`` (``reads``); see the module's doc and
    docs/memory_ablation.md for the columns."""
    import pandas as pd

    stats, pairs = [], []
    for layer, part in table.groupby("layer", sort=True):
        s = part.groupby("slot").agg(reads=("weight", "size"), positions=("position", "nunique"),
                                     rows=("row", "nunique"), groups=("group", "nunique"),
                                     weight_mean=("weight", "mean"), weight_std=("weight", lambda w: w.std(ddof=0)),
                                     weight_sum=("weight", "sum")).reset_index()
        s = s.sort_values(["reads", "slot"], ascending=[False, True], kind="stable").reset_index(drop=True)
        s.insert(0, "layer", layer)
        s.insert(2, "rank", range(1, len(s) + 1))
        s.insert(4, "share", s["reads"] / s["reads"].sum())
        co, index = _co_reads(part)
        clustered = s["slot"].head(CLUSTER_SLOTS).tolist()
        cluster, size, leaf = _cluster(co, index, s.set_index("slot")["positions"], clustered)
        s["cluster"] = s["slot"].map(cluster).astype("Int64")
        s["cluster_size"] = s["slot"].map(size).astype("Int64")
        s["leaf"] = s["slot"].map(leaf).astype("Int64")
        stats.append(s)
        pairs.append(_pairs(layer, co, index, s.set_index("slot")["positions"], cluster))
    stats = pd.concat(stats, ignore_index=True) if stats else pd.DataFrame(columns=STAT_COLUMNS)
    pairs = pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame(columns=PAIR_COLUMNS)
    return stats[STAT_COLUMNS], pairs[PAIR_COLUMNS]


def _co_reads(part):
    """The sparse slot x slot matrix of co-reads (answer positions where both slots are read, by any
    heads) of one layer's reads, and the slots its rows and columns stand for."""
    import numpy as np
    from scipy import sparse

    once = part[["position", "slot"]].drop_duplicates()
    slots, col = np.unique(once["slot"].to_numpy(), return_inverse=True)
    _, row = np.unique(once["position"].to_numpy(), return_inverse=True)
    x = sparse.csr_matrix((np.ones(len(once), dtype=np.int64), (row, col)), shape=(row.max() + 1, len(slots)))
    return (x.T @ x).tocsr(), {int(s): i for i, s in enumerate(slots)}


def _cluster(co, index: dict[int, int], positions, slots: list[int]):
    """Average-linkage clusters (cut at ``CLUSTER_DISTANCE`` of 1 - Jaccard) of ``slots``: each
    slot's cluster (0 the largest, ties by leaf order), its cluster's size, and its place in the
    dendrogram's leaf order."""
    import numpy as np
    from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
    from scipy.spatial.distance import squareform

    if not slots:
        return {}, {}, {}
    if len(slots) == 1:
        return {slots[0]: 0}, {slots[0]: 1}, {slots[0]: 0}
    idx = [index[s] for s in slots]
    c = co[idx][:, idx].toarray().astype(float)
    p = np.array([positions[s] for s in slots], dtype=float)
    jaccard = c / (p[:, None] + p[None, :] - c)
    distance = 1 - jaccard
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="average")
    labels = fcluster(tree, t=CLUSTER_DISTANCE, criterion="distance")
    order = leaves_list(tree)
    leaf = {slots[i]: k for k, i in enumerate(order)}
    first = {}
    for i in order:
        first.setdefault(labels[i], len(first))
    counts = {lab: int((labels == lab).sum()) for lab in first}
    ranked = sorted(first, key=lambda lab: (-counts[lab], first[lab]))
    number = {lab: k for k, lab in enumerate(ranked)}
    cluster = {s: number[labels[i]] for i, s in enumerate(slots)}
    return cluster, {s: counts[labels[i]] for i, s in enumerate(slots)}, leaf


def _pairs(layer: int, co, index: dict[int, int], positions, cluster: dict[int, int]):
    """One layer's rows of slot_pairs.csv: the pairs co-read at least ``MIN_CO_READS`` times (the
    ``MAX_PAIRS`` most co-read) and every co-read pair of two clustered slots."""
    import numpy as np
    import pandas as pd
    from scipy import sparse

    upper = sparse.triu(co, k=1).tocoo()
    slot_of = np.array(sorted(index, key=index.get))
    frame = pd.DataFrame({"layer": layer, "a": slot_of[upper.row], "b": slot_of[upper.col],
                          "co_reads": upper.data.astype(np.int64)})
    frame = frame.sort_values(["co_reads", "a", "b"], ascending=[False, True, True], kind="stable")
    both = frame["a"].isin(cluster.keys()) & frame["b"].isin(cluster.keys())
    frequent = frame[frame["co_reads"] >= MIN_CO_READS].head(MAX_PAIRS)
    frame = frame[both | frame.index.isin(frequent.index)].copy()
    frame["positions_a"] = frame["a"].map(positions).astype(np.int64)
    frame["positions_b"] = frame["b"].map(positions).astype(np.int64)
    frame["jaccard"] = frame["co_reads"] / (frame["positions_a"] + frame["positions_b"] - frame["co_reads"])
    frame["cluster_a"] = frame["a"].map(cluster).astype("Int64")
    frame["cluster_b"] = frame["b"].map(cluster).astype("Int64")
    return frame.reset_index(drop=True)


def _one_slot(target: Any) -> int | None:
    """The slot of a state whose target is one slot (``[s]``), else None."""
    try:
        value = json.loads(target) if isinstance(target, str) and target else None
    except ValueError:
        return None
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], int):
        return value[0]
    return None


def ablation_swap_correlation(acc, swaps):
    """Per slot and pair of families (a single-slot ablation family, a slot-value swap family), the
    ablation impact against the swap effect, and one summary row per pair of families and group;
    empty when no pair of families shares at least one slot. ``acc``: accuracy.csv's table;
    ``swaps``: swap_matrix.csv's (see docs/memory_ablation.md for the columns)."""
    import pandas as pd

    from ..intervals import spearman, spearman_interval

    transform = acc["transform"].astype(str)
    single = acc[transform.isin(SLOT_ABLATIONS)].assign(slot=lambda t: t["target"].map(_one_slot))
    single = single[single["slot"].notna()].astype({"slot": int})
    swap_families = set(acc.loc[transform.isin(SLOT_SWAPS), "intervention"])
    swaps = swaps[swaps["intervention"].isin(swap_families)].dropna(subset=["a", "b"])
    rows = []
    if not len(single) or not len(swaps):
        return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)
    scored = acc[transform.isin(SLOT_SWAPS)].groupby(["intervention", "target"], sort=False)["n"].sum()
    swaps = swaps.assign(a=swaps["a"].astype(int), b=swaps["b"].astype(int))
    swaps = swaps.assign(share=[c / scored.get((iv, json.dumps([a, b], separators=(",", ":"))), math.nan)
                                for iv, a, b, c in zip(swaps["intervention"], swaps["a"], swaps["b"], swaps["changed"])])
    for swap, sw in swaps.groupby("intervention", sort=False):
        effect: dict[int, list[float]] = {}
        for a, b, share in zip(sw["a"], sw["b"], sw["share"]):
            effect.setdefault(a, []).append(share)
            effect.setdefault(b, []).append(share)
        for ablation, ab in single.groupby("intervention", sort=False):
            drops = {ALL_GROUPS: ab.groupby(["slot", "target"])["exact_drop"].mean().groupby("slot").mean()}
            for group, part in ab.groupby("group", sort=False):
                drops[group] = part.groupby("slot")["exact_drop"].mean()
            states = ab.groupby("slot")["target"].nunique()
            common = sorted(set(drops[ALL_GROUPS].index) & set(effect))
            if not common:
                continue
            for group, drop in drops.items():
                x = [float(drop.get(s, math.nan)) for s in common]
                y = [sum(effect[s]) / len(effect[s]) for s in common]
                rows += [{"ablation": ablation, "swap": swap, "group": group, "slot": s, "exact_drop": xs,
                          "ablation_states": int(states[s]), "changed_share": ys, "swaps": len(effect[s])}
                         for s, xs, ys in zip(common, x, y)]
                rho, p, n = spearman(x, y)
                low, high = spearman_interval(rho, n)
                rows.append({"ablation": ablation, "swap": swap, "group": group, "n": n, "spearman_rho": rho,
                             "ci95_low": low, "ci95_high": high, "p_value": p})
    table = pd.DataFrame(rows, columns=CORRELATION_COLUMNS)
    return table.astype({"slot": "Int64", "ablation_states": "Int64", "swaps": "Int64", "n": "Int64"})


def write_tables(records: list[dict[str, Any]], acc, run_dir: Path, swaps: bool) -> list[Path]:
    """key_statistics.csv and slot_pairs.csv (when the unablated model's reads were recorded), and
    ablation_swap_correlation.csv (``swaps``: this run wrote swap_matrix.csv, and single-slot
    ablations and value swaps share slots)."""
    from ..tables import write_csv

    run_dir = Path(run_dir)
    outputs = []
    table = reads(records)
    if len(table):
        stats, pairs = key_statistics(table)
        outputs += [write_csv(stats, run_dir / "key_statistics.csv"), write_csv(pairs, run_dir / "slot_pairs.csv")]
    if swaps:
        outputs += write_correlation(acc, run_dir / "swap_matrix.csv", run_dir)
    return outputs


def write_correlation(acc, swap_matrix: Path, run_dir: Path) -> list[Path]:
    """ablation_swap_correlation.csv from ``acc`` and the swap matrix at ``swap_matrix`` (nothing
    when it is missing or no family pair shares a slot)."""
    import pandas as pd

    from ..tables import write_csv

    if not Path(swap_matrix).exists():
        return []
    table = ablation_swap_correlation(acc, pd.read_csv(swap_matrix))
    if not len(table):
        return []
    return [write_csv(table, Path(run_dir) / "ablation_swap_correlation.csv")]


def figures(plt, run_dir: Path) -> list[Path]:
    """slot_pairs.png and ablation_swap_correlation.png, from the CSVs of ``run_dir``."""
    from ..tables import save_figure

    run_dir = Path(run_dir)
    outputs = []
    for name, draw in (("slot_pairs", _pairs_figure), ("ablation_swap_correlation", _correlation_figure)):
        if (run_dir / f"{name}.csv").exists() and (name != "slot_pairs" or (run_dir / "key_statistics.csv").exists()):
            fig = draw(plt, run_dir)
            if fig is not None:
                out = run_dir / f"{name}.png"
                save_figure(fig, out, dpi=120)
                plt.close(fig)
                outputs.append(out)
    return outputs


def _pairs_figure(plt, run_dir: Path):
    """Per layer, the Jaccard co-read matrix of the clustered slots in dendrogram leaf order, with
    the clusters of more than one slot outlined."""
    import numpy as np
    import pandas as pd

    stats = pd.read_csv(run_dir / "key_statistics.csv")
    pairs = pd.read_csv(run_dir / "slot_pairs.csv")
    stats = stats[stats["leaf"].notna()]
    layers = sorted(stats["layer"].unique())
    if not layers:
        return None
    fig, axes = plt.subplots(1, len(layers), figsize=(6.5 * len(layers), 5.5), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        part = stats[stats["layer"] == layer].sort_values("leaf")
        slots = part["slot"].astype(int).tolist()
        at = {s: i for i, s in enumerate(slots)}
        grid = np.eye(len(slots))
        mine = pairs[(pairs["layer"] == layer) & pairs["a"].isin(at) & pairs["b"].isin(at)]
        for a, b, j in zip(mine["a"], mine["b"], mine["jaccard"]):
            grid[at[a], at[b]] = grid[at[b], at[a]] = j
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1)
        clusters = part["cluster"].astype(int).tolist()
        start = 0
        for i in range(1, len(clusters) + 1):
            if i == len(clusters) or clusters[i] != clusters[start]:
                if i - start > 1:
                    ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), i - start, i - start, fill=False,
                                               edgecolor="red", lw=1))
                start = i
        step = max(1, len(slots) // 32)
        ticks = list(range(0, len(slots), step))
        ax.set_xticks(ticks, [str(slots[i]) for i in ticks], rotation=90, fontsize=6)
        ax.set_yticks(ticks, [str(slots[i]) for i in ticks], fontsize=6)
        sizes = part.drop_duplicates("cluster")["cluster_size"].astype(int)
        ax.set_title(f"layer {layer}: {len(slots)} most-read slots, {len(sizes)} clusters "
                     f"(largest {sizes.max()})", fontsize=9)
        fig.colorbar(im, ax=ax, label="co-read Jaccard (same answer position)")
    fig.tight_layout()
    return fig


def _correlation_figure(plt, run_dir: Path):
    """Per pair of families (over all groups): each slot's ablation drop against its swap effect."""
    import pandas as pd

    table = pd.read_csv(run_dir / "ablation_swap_correlation.csv", keep_default_na=False, na_values=[""])
    table = table[table["group"] == ALL_GROUPS]
    points = table[table["slot"].notna()]
    if not len(points):
        return None
    families = list(dict.fromkeys(zip(points["ablation"], points["swap"])))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for ablation, swap in families:
        mine = points[(points["ablation"] == ablation) & (points["swap"] == swap)]
        summary = table[(table["ablation"] == ablation) & (table["swap"] == swap) & table["slot"].isna()].iloc[0]
        ax.scatter(mine["exact_drop"], mine["changed_share"], s=18,
                   label=f"{ablation} / {swap}: rho {summary['spearman_rho']:.2f} "
                         f"[{summary['ci95_low']:.2f}, {summary['ci95_high']:.2f}], n {int(summary['n'])}")
        for s, x, y in zip(mine["slot"], mine["exact_drop"], mine["changed_share"]):
            ax.annotate(str(int(s)), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("exact-match drop when the slot alone is ablated (mean over groups)")
    ax.set_ylabel("share of answers changed by its value swaps")
    ax.set_title("Ablation impact against swap effect per slot (Spearman, 95% Fisher z)", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig
