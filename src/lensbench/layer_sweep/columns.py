"""The layer sweep tables' file names, columns and orderings, shared by :mod:`.collect` (which
writes the tables), :mod:`.correlation` and :mod:`.figures` (which read them)."""

from __future__ import annotations

import hashlib
import math
import numbers
import re
from typing import Any

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
