"""Task scores joined with representation metrics, and their Spearman correlation (the paper's
question: does a label-free metric of a layer predict how well the layer embeds text?).

``join``: one row per (checkpoint, state, layer, task, metrics dataset). The metrics of a task's own
texts (``source`` "task"; in tables written before ``source`` was kept, a dataset named after a task)
join that task only; a named dataset joins every task.

``correlate``: for each metrics dataset (the task-own-text datasets pooled as ``(each task's
texts)``), each metric column and each task type (and ``(all tasks)``), one point per (checkpoint,
state, layer): x = the metric (averaged over the tasks' own texts for the pooled datasets), y = the
mean main score over the tasks of that type. ``spearman_rho`` and ``p_value`` are
``scipy.stats.spearmanr`` over the points where both are finite (``n``, at least 3, and neither
constant, else empty); ``ci95_low``/``ci95_high`` is the Fisher z interval with Bonett and Wright's
(2000) standard error ``sqrt((1 + rho^2 / 2) / (n - 3))`` (``n`` at least 4); both statistics are
``lensbench.intervals.spearman`` and ``spearman_interval``.
"""

from __future__ import annotations

import math

from ..intervals import spearman, spearman_interval
from .columns import LAST, LAYER_NORM, METRICS, _mean, natural_sort, ordered

OWN_TEXTS = "(each task's texts)"
ALL_TYPES = "(all tasks)"


def metric_columns(frame) -> list[str]:
    """The metric columns of ``frame``: the four metrics and columns named after them (their
    normalisations, e.g. ``dataset_entropy_<normalisation>``)."""
    return [c for c in frame.columns if any(c == m or c.startswith(m + "_") for m in METRICS)]


def _ids(frame, keys: list[str]):
    """One string per row naming its checkpoint (the join key: a state column read back as float in
    one table and int in the other still matches)."""
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    return ["\x1f".join(cell(v) for v in row) for row in frame[keys].itertuples(index=False, name=None)]


def join(scores, metrics, keys: list[str]):
    """Each score row of ``scores`` with the metrics of its (checkpoint, state, layer), one row per
    metrics dataset (see the module's doc). ``keys`` are the scores' keys; the two tables join on the
    checkpoint (model, revision, state columns), not on ``layer_norm``: the metrics' own setting is
    kept as ``metrics_layer_norm``."""
    values = metric_columns(metrics)
    checkpoint = [k for k in keys if k != LAYER_NORM]
    last = [LAST] if LAST in scores else []
    left = scores[[*keys, "layer", *last, "task", "task_type", "main_score"]].assign(_id=_ids(scores, checkpoint))
    source = ["source"] if "source" in metrics else []
    right = metrics[["dataset", *source, "layer", *values]].assign(_id=_ids(metrics, checkpoint))
    if LAYER_NORM in metrics:
        right.insert(len(right.columns) - 1, "metrics_layer_norm", metrics[LAYER_NORM])
    joined = left.merge(right, on=["_id", "layer"], how="inner", sort=False).drop(columns="_id")
    own = joined["source"].eq("task") if source else joined["dataset"].isin(set(scores["task"]))
    joined = joined[~own | (joined["dataset"] == joined["task"])]
    joined = joined[[c for c in joined.columns if c != LAST] + last]
    return natural_sort(joined, [*keys, "layer", "task", "dataset"]).reset_index(drop=True)


def groups(joined) -> list[str]:
    """The metrics datasets of ``joined`` as ``correlate`` reports them (own-text datasets pooled)."""
    return ordered(_group(joined))


def _group(joined):
    """Each row's dataset, ``(each task's texts)`` for the metrics of the row's own task's texts
    (``source`` "task"; tables without ``source``: a dataset named after the row's task)."""
    own = joined["source"].eq("task") if "source" in joined else joined["dataset"] == joined["task"]
    return joined["dataset"].where(~own, OWN_TEXTS)


def points(joined, keys: list[str], group: str, task_type: str, values: list[str]):
    """One row per (checkpoint, state, layer) of one dataset group and task type: ``main_score`` (the
    mean over its tasks) and each metric of ``values`` (the mean over those tasks' rows)."""
    part = joined[_group(joined) == group]
    if task_type != ALL_TYPES:
        part = part[part["task_type"] == task_type]
    aggs = {"main_score": ("main_score", _mean), "n_tasks": ("task", "nunique"),
            **({LAST: (LAST, "first")} if LAST in part else {}), **{v: (v, _mean) for v in values}}
    return part.groupby([*keys, "layer"], sort=False, dropna=False).agg(**aggs).reset_index()


def correlate(joined, keys: list[str]):
    """The Spearman correlation of every metric with the main score (see the module's doc)."""
    import pandas as pd

    values = metric_columns(joined)
    rows = []
    for group in groups(joined):
        part = joined[_group(joined) == group]
        for task_type in [ALL_TYPES, *ordered(part["task_type"].unique())]:
            pts = points(part, keys, group, task_type, values)
            n_tasks = int(part["task"].nunique() if task_type == ALL_TYPES else
                          part.loc[part["task_type"] == task_type, "task"].nunique())
            for metric in values:
                rho, p, n = spearman(pts[metric], pts["main_score"])
                low, high = spearman_interval(rho, n)
                rows.append({"dataset": group, "metric": metric, "task_type": task_type, "n_tasks": n_tasks,
                             "n": n, "spearman_rho": rho, "ci95_low": low, "ci95_high": high, "p_value": p})
    columns = ["dataset", "metric", "task_type", "n_tasks", "n", "spearman_rho", "ci95_low", "ci95_high", "p_value"]
    return pd.DataFrame(rows, columns=columns)
