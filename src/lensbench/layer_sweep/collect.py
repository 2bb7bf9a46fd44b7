"""The layer sweep's tables, from the stored records (what ``collect_results.py`` did).

Tables: ``layer_sweep.csv`` (tidy: one row per checkpoint, state, layer and task),
``representation_metrics.csv``, ``progress.csv`` (rewritten: one row per evaluation),
``summary_layer_by_task.csv`` (layer x task scores), ``summary_task_type.csv`` (mean per task
type), ``best_layers.csv`` (the best layer per task and per checkpoint, against the model's last
layer), and, when both scores and metrics exist, ``layer_metrics_scores.csv`` (the two joined) and
``metric_score_correlation.csv`` (see :mod:`.correlation`). The figures are drawn by
:mod:`.figures`; ``draw_figures`` redraws them from the tables (``lensbench plot``).

Rows sort by their checkpoint in natural order (``step94000`` before ``step100000``), then task and
layer. ``n_nonfinite_texts`` (both tables) counts the texts whose pooled embedding is NaN or inf;
such a layer's scores and metrics are NaN, means over them are NaN, and the figures leave them
blank. Records stored before a field was kept (``n_nonfinite_texts``, ``layer_norm``,
``model_last_layer``) lack it: the cell is empty (unknown).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..tables import write_csv
from . import progress
from .columns import (
    ALL_TASKS,
    BEST,
    BY_TASK,
    BY_TYPE,
    CORRELATION,
    JOINED,
    LAST,
    LAYER_NORM,
    METRICS_TABLE,
    NONFINITE,
    TABLE,
    _grid,
    _mean,
    natural_sort,
)


def _labels(records: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for rec in records:
        names += [k for k in (rec.get("labels") or {}) if k not in names]
    return names


def _checkpoint_keys(labels: list[str]) -> list[str]:
    return ["model", "revision", *labels]


def _norm_varies(records: list[dict[str, Any]]) -> bool:
    """Whether the task records hold several ``layer_norm`` settings (a key of the scores then; the
    metrics have their own setting, ``metrics_layer_norm``, and join on the checkpoint alone)."""
    return len({rec.get(LAYER_NORM) for rec in records if rec.get("kind") == "task"} - {None}) > 1


def write_tables(records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    import pandas as pd

    labels = _labels(records)
    columns = _checkpoint_keys(labels)
    keys = [*columns, LAYER_NORM] if _norm_varies(records) else columns
    written: list[Path] = []
    score_rows, progress_rows, metric_rows = [], [], []
    for rec in records:
        head = {"model": rec["model"], "revision": rec.get("revision", ""), **(rec.get("labels") or {})}
        embedding = {LAYER_NORM: rec.get(LAYER_NORM), LAST: rec.get(LAST)}  # None: stored before they were kept
        if rec.get("kind") == "task":
            for s in rec["scores"]:
                score_rows.append({**head, "layer": s["layer"], "task": rec["task"], "task_type": rec["task_type"],
                                   "main_score": s["main_score"], "n_texts": rec["n_texts"],
                                   NONFINITE: s.get(NONFINITE), **embedding})  # None: stored before it was counted
                progress_rows.append({"model": rec["model"], "revision": rec.get("revision", ""), "state": rec["state"],
                                      "layer": s["layer"], "task": rec["task"], "status": "done",
                                      "main_score": s["main_score"], "duration_s": s["duration_s"], "time": s["time"]})
        elif rec.get("kind") == "metrics":
            for m in rec["layers"]:
                # every metric the record holds (raw, then normalised: older records lack the latter);
                # source: "task" (a task's own texts, drawn with sample_seed) or "dataset" (first texts)
                values = {k: v for k, v in m.items() if k not in ("layer", "n_prompts", NONFINITE)}
                metric_rows.append({**head, "dataset": rec["dataset"], "source": rec.get("source", "dataset"),
                                    "layer": m["layer"], **values, "n_texts": rec.get("n_texts"),
                                    "n_prompts": m["n_prompts"], "sample_seed": rec.get("sample_seed"),
                                    "alpha": rec["alpha"], NONFINITE: m.get(NONFINITE), **embedding})
    scores = metrics = None
    if score_rows:
        scores = natural_sort(pd.DataFrame(score_rows), [*keys, "task", "layer"])
        scores = scores[[*columns, *(c for c in scores.columns if c not in columns)]]
        scores[NONFINITE] = scores[NONFINITE].astype("Int64")  # empty where unknown
        scores[LAST] = scores[LAST].astype("Int64")
        written.append(write_csv(scores, run_dir / TABLE))
        written += _summaries(scores, keys, run_dir)
        table = natural_sort(pd.DataFrame(progress_rows, columns=list(progress.COLUMNS)),
                             ["model", "revision", "state", "task", "layer"])
        written.append(write_csv(table, run_dir / progress.PROGRESS))
    if metric_rows:
        metrics = natural_sort(pd.DataFrame(metric_rows), [*keys, "source", "dataset", "layer"])
        metrics = metrics[[*columns, *(c for c in metrics.columns if c not in columns)]]
        metrics[NONFINITE] = metrics[NONFINITE].astype("Int64")
        metrics[["n_texts", "sample_seed"]] = metrics[["n_texts", "sample_seed"]].astype("Int64")  # seed: tasks only
        metrics[LAST] = metrics[LAST].astype("Int64")
        written.append(write_csv(metrics, run_dir / METRICS_TABLE))
    if scores is not None and metrics is not None:
        from .correlation import correlate, join

        joined = join(scores, metrics, keys)
        written += [write_csv(joined, run_dir / JOINED), write_csv(correlate(joined, keys), run_dir / CORRELATION)]
    return written


def _summaries(scores, keys: list[str], run_dir: Path) -> list[Path]:
    import pandas as pd

    heads, cells = _grid(scores, [*keys, "layer"], "task")
    by_task = pd.concat([heads, cells.assign(mean=cells.mean(axis=1, skipna=False))], axis=1)
    by_type = natural_sort(scores.groupby([*keys, "layer", "task_type"], sort=False, dropna=False)["main_score"]
                           .agg(mean_main_score=_mean, n_tasks="size").reset_index(), [*keys, "layer", "task_type"])
    best_rows = []
    for values, group in scores.groupby([*keys, "task"], sort=False, dropna=False):
        best_rows.append(_best(dict(zip([*keys, "task"], values)), group))
    mean = scores.groupby([*keys, "layer"], sort=False, dropna=False).agg(
        main_score=("main_score", _mean), **{LAST: (LAST, "first")}).reset_index()
    for values, group in mean.groupby(keys, sort=False, dropna=False):
        best_rows.append(_best({**dict(zip(keys, values)), "task": ALL_TASKS}, group))
    best = pd.DataFrame(best_rows).astype({"best_layer": "Int64", "last_layer": "Int64"})  # empty when none
    return [write_csv(by_task, run_dir / BY_TASK), write_csv(by_type, run_dir / BY_TYPE), write_csv(best, run_dir / BEST)]


def _best(head: dict[str, Any], group) -> dict[str, Any]:
    """The best layer of one (checkpoint, task) (the earliest of ties, among the finite scores)
    against the model's last layer (``model_last_layer``; for records stored before it was kept, the
    last layer swept, and ``last_layer_source`` says which)."""
    group = group.sort_values("layer")
    finite = group[group["main_score"].notna()]
    top = finite.loc[finite["main_score"].idxmax()] if len(finite) else {"layer": None, "main_score": float("nan")}
    known = group[LAST].dropna()
    last, source = (int(known.iloc[0]), "model") if len(known) else (int(group["layer"].iloc[-1]), "last swept")
    at_last = group.loc[group["layer"] == last, "main_score"]
    last_score = float(at_last.iloc[0]) if len(at_last) else float("nan")
    return {**head, "best_layer": top["layer"], "best_score": float(top["main_score"]),
            "last_layer": last, "last_layer_source": source, "last_score": last_score,
            "gain_over_last": float(top["main_score"]) - last_score, "n_layers": len(group)}


def draw_figures(run_dir: Path) -> list[Path]:
    from .figures import draw_figures as draw

    return draw(Path(run_dir))
