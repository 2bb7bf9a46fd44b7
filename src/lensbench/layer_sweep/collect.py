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

import hashlib
import math
import numbers
import re
from pathlib import Path
from typing import Any

from ..tables import write_csv
from . import progress

TABLE = "layer_sweep.csv"
METRICS_TABLE = "representation_metrics.csv"
BY_TASK = "summary_layer_by_task.csv"
BY_TYPE = "summary_task_type.csv"
BEST = "best_layers.csv"
JOINED = "layer_metrics_scores.csv"
CORRELATION = "metric_score_correlation.csv"
ALL_TASKS = "(mean over tasks)"
METRICS = ("prompt_entropy", "dataset_entropy", "curvature", "effective_rank")
NONFINITE = "n_nonfinite_texts"
LAYER_NORM = "layer_norm"  # the embedding's final norm ("final" or "none"); a key only where it varies
LAST = "model_last_layer"  # the model's last hidden-state index (relative depth, best_layers' last layer)


def _mean(values):
    """The mean, NaN when any value is (a NaN score must not vanish into a mean over the others)."""
    return values.mean(skipna=False)


def natural_key(value: Any) -> tuple:
    """Sort key of ``value`` with its digit runs compared as numbers (``step94000`` < ``step100000``);
    missing values first."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ()
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(value)) if t)


def ordered(values) -> list:
    """The distinct ``values`` in natural order (numbers as numbers)."""
    import pandas as pd

    distinct = list(dict.fromkeys(values))
    if all(isinstance(v, numbers.Number) for v in distinct if not pd.isna(v)):
        return sorted(distinct, key=lambda v: (not pd.isna(v), v if not pd.isna(v) else 0))
    return sorted(distinct, key=natural_key)


def natural_sort(frame, columns: list[str]):
    """``frame`` sorted (stably) by ``columns``: numeric columns by value, the others in natural order."""
    import pandas as pd
    from pandas.api.types import is_numeric_dtype

    def key(series):
        if is_numeric_dtype(series.dtype):
            return series
        if all(isinstance(x, numbers.Number) for x in series if not pd.isna(x)):  # numbers beside None
            return pd.to_numeric(series, errors="coerce")
        ranks = {v: i for i, v in enumerate(sorted({natural_key(x) for x in series}))}
        return series.map(lambda x: ranks[natural_key(x)])

    return frame.sort_values(columns, key=key, kind="stable") if len(frame) else frame


def table_keys(frame) -> list[str]:
    """The checkpoint keys of a stored table: its columns before ``layer`` (model, revision, state
    columns, and ``dataset`` in the metrics table), and ``layer_norm`` where it takes several values
    (an empty one, of a record stored before it was kept, is not one)."""
    columns = list(frame.columns)
    keys = columns[: columns.index("layer")]
    if LAYER_NORM in frame and len({v for v in frame[LAYER_NORM] if _present(v)}) > 1:
        keys.append(LAYER_NORM)
    return keys


def _grid(frame, index: list[str], columns: str, agg="first"):
    """``main_score`` of ``frame`` as (heads, cells): one row per distinct ``index`` (in the frame's
    order) x one column per ``columns`` value (natural order), keeping rows and columns whose scores
    are all NaN (``pivot_table`` drops them) and rows whose keys are missing."""
    frame = frame.assign(_row=frame.groupby(index, sort=False, dropna=False).ngroup())
    cells = frame.groupby(["_row", columns], sort=False)["main_score"].agg(agg).unstack(columns)
    heads = frame.drop_duplicates("_row").set_index("_row")[index]
    cells = cells.reindex(index=heads.index, columns=ordered(frame[columns].unique()))
    cells.columns.name = None
    return heads, cells


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


def _safe(name: str) -> str:
    return re.sub(r"[^\w.@=-]+", "_", str(name)).strip("_") or "x"


def checkpoint_name(row: dict[str, Any], keys: list[str]) -> str:
    """A checkpoint's label in figures: ``model@revision`` and its state columns as ``k=v``."""
    parts = [str(row["model"])] + ([f"@{row['revision']}"] if _present(row.get("revision")) else [])
    parts += [f" {k}={row[k]}" for k in keys if k not in ("model", "revision") and _present(row[k])]
    return "".join(parts)


def file_stem(row: dict[str, Any], keys: list[str]) -> str:
    """A short file-name part for a checkpoint: the model's name, its revision when short, and an
    8-character digest of the rest (state columns, a long revision) when there is any."""
    stem = _safe(row["model"])
    revision = str(row["revision"]) if _present(row.get("revision")) else ""
    if revision and len(_safe(revision)) <= 24:
        stem, revision = f"{stem}@{_safe(revision)}", ""
    rest = [revision] + [f"{k}={row[k]}" for k in keys if k not in ("model", "revision") and _present(row[k])]
    if any(rest):
        stem += "__" + hashlib.sha256("\x1f".join(rest).encode("utf-8")).hexdigest()[:8]
    return stem


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != ""


def draw_figures(run_dir: Path) -> list[Path]:
    from .figures import draw_figures as draw

    return draw(Path(run_dir))
