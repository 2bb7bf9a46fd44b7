"""Exact merging of per-item summary statistics (count, mean, M2 = sum of squared deviations, and
log-bucketed sketches for medians), and the one console line about non-finite values."""

from __future__ import annotations

import math


def chan_merge(n_a: int, mean_a: float, m2_a: float, n_b: int, mean_b: float, m2_b: float) -> tuple[float, float]:
    """Mean and M2 of two groups of ``n_a`` and ``n_b`` values combined (Chan et al.'s pairwise
    update): exact whatever order or batching the groups came in. Two empty groups give (mean_a, m2_a)."""
    n = n_a + n_b
    if n == 0:
        return mean_a, m2_a
    delta = mean_b - mean_a
    return mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


# -- non-finite values: counted, said once on the console, left out of figures ----------------------

def place(model: str, dataset: str, labels) -> str:
    """Where a row of an analysis's table is, in few words: ``model / dataset``, with a perturbed
    state's level and repetition (``(level 0.1, repeat 0)``) when there is one."""
    labels = dict(labels or {})
    state = ", ".join(f"{word} {labels[key]}" for key, word in (("level_value", "level"), ("repeat_index", "repeat"))
                      if key in labels)
    return f"{model} / {dataset}" + (f" ({state})" if state else "")


def nonfinite_warning(analysis: str, counts: dict[str, int], what: str, column: str | None, table: str) -> str | None:
    """Say on the console (one warning line, also in the run log) where an analysis met non-finite
    values (NaN or inf): ``counts`` maps a place ("model / dataset layer 3") to how many ``what``
    it found there; the line names the ``column`` of ``table`` that counts them (None: the values
    are themselves the table's cells). None (and nothing said) when every count is 0."""
    from .logs import console

    found = [(place, n) for place, n in counts.items() if n]
    if not found:
        return None
    total = sum(n for _, n in found)
    shown = "; ".join(f"{place}: {n}" for place, n in found[:3])
    if len(found) > 3:
        shown += f"; and {len(found) - 3} more"
    counted = f"counted in {column} of {table}, the statistics over them are not finite" if column else \
        f"left as NaN or inf in {table}"
    line = (f"{analysis}: {total} non-finite (NaN or inf) {what} ({shown}); {counted}, "
            "and the figures draw the finite values only")
    console.warning(line)
    return line


# -- medians that merge exactly: a log-bucketed histogram (DDSketch) -------------------------------

#: Relative accuracy of ``sketch_quantile``: the value returned is within this fraction of the true one.
SKETCH_ACCURACY = 1e-3
#: Values closer to 0 than this count as 0.
SKETCH_ZERO = 1e-12


def value_sketch(values, accuracy: float = SKETCH_ACCURACY) -> dict:
    """A mergeable summary of the finite values of a tensor for quantiles with relative accuracy
    ``accuracy`` (DDSketch's log buckets, centred): value v > 0 falls in bucket round(log_gamma(v)),
    gamma = (1 + a) / (1 - a), whose value gamma^i is within ``accuracy`` of v (and exact for
    v = 1: a cosine of 1 reads 1); negative values in their own buckets, |v| < SKETCH_ZERO in ``zero``.
    Bucket counts add up exactly, so the merged sketch does not depend on batching or ranks.
    JSON-ready: {"zero": n, "pos": [[index...], [count...]], "neg": [[index...], [count...]]}."""
    import torch

    v = values.detach().double().flatten()
    v = v[torch.isfinite(v)]
    log_gamma = math.log((1 + accuracy) / (1 - accuracy))
    out: dict = {"zero": int((v.abs() < SKETCH_ZERO).sum())}
    for side, part in (("pos", v[v >= SKETCH_ZERO]), ("neg", -v[v <= -SKETCH_ZERO])):
        index, count = torch.unique(torch.round(torch.log(part) / log_gamma).long(), return_counts=True)
        out[side] = [index.tolist(), count.tolist()]
    return out


def merge_sketches(a: dict | None, b: dict | None) -> dict | None:
    """The sketch of two groups of values together (None: a group without a sketch)."""
    if a is None or b is None:
        return None
    out = {"zero": a["zero"] + b["zero"]}
    for side in ("pos", "neg"):
        counts: dict[int, int] = {}
        for part in (a[side], b[side]):
            for index, count in zip(part[0], part[1]):
                counts[index] = counts.get(index, 0) + count
        keys = sorted(counts)
        out[side] = [keys, [counts[k] for k in keys]]
    return out


def sketch_quantile(sketch: dict | None, q: float, accuracy: float = SKETCH_ACCURACY) -> float:
    """The ``q`` quantile of a sketch's values: the value of rank floor(q (n - 1)) (0-based, for
    q = 0.5 the lower median) within relative error ``accuracy``; NaN for no values or no sketch."""
    if sketch is None:
        return math.nan
    gamma = (1 + accuracy) / (1 - accuracy)
    # In increasing order: negative buckets from the largest magnitude down, zero, positive buckets up.
    ordered = [(-(gamma**i), c) for i, c in sorted(zip(*sketch["neg"]), reverse=True)]
    ordered.append((0.0, sketch["zero"]))
    ordered += [(gamma**i, c) for i, c in sorted(zip(*sketch["pos"]))]
    n = sum(c for _, c in ordered)
    if n == 0:
        return math.nan
    rank, seen = math.floor(q * (n - 1)), 0
    for value, count in ordered:
        seen += count
        if seen > rank:
            return value
    return ordered[-1][0]
