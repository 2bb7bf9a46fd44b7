"""The layer sweep's tables and figures, from the stored records (what ``collect_results.py`` did).

Tables: ``layer_sweep.csv`` (tidy: one row per checkpoint, state, layer and task),
``representation_metrics.csv``, ``progress.csv`` (rewritten: one row per evaluation),
``summary_layer_by_task.csv`` (layer x task scores), ``summary_task_type.csv`` (mean per task
type), ``best_layers.csv`` (the best layer per task and per checkpoint). Figures: ``layer_curve.png``,
``heatmap_layer_task__<checkpoint>.png``, ``heatmap_checkpoint_layer__<task type>.png`` and
``representation_metrics.png``; ``draw_figures`` redraws them from the tables (``lensbench plot``).

``n_nonfinite_texts`` (both tables) counts the texts whose pooled embedding is NaN or inf; such a
layer's scores and metrics are NaN, means over them are NaN, and the figures leave them blank.
Records stored before the count was kept lack it: the cell is empty (unknown).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..tables import pyplot, save_figure, write_csv
from . import progress

TABLE = "layer_sweep.csv"
METRICS_TABLE = "representation_metrics.csv"
BY_TASK = "summary_layer_by_task.csv"
BY_TYPE = "summary_task_type.csv"
BEST = "best_layers.csv"
ALL_TASKS = "(mean over tasks)"
METRICS = ("prompt_entropy", "dataset_entropy", "curvature", "effective_rank")
NONFINITE = "n_nonfinite_texts"
SCORE_VALUES = ("layer", "task", "task_type", "main_score", "n_texts", NONFINITE)  # the rest are checkpoint keys


def _mean(values):
    """The mean, NaN when any value is (a NaN score must not vanish into a mean over the others)."""
    return values.mean(skipna=False)


def _grid(frame, index: list[str], columns: str, agg="first"):
    """``main_score`` of ``frame`` as an ``index`` x ``columns`` table, keeping rows and columns whose
    scores are all NaN (``pivot_table`` drops them)."""
    return frame.groupby([*index, columns], sort=True)["main_score"].agg(agg).unstack(columns)


def _labels(records: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for rec in records:
        names += [k for k in (rec.get("labels") or {}) if k not in names]
    return names


def _checkpoint_keys(labels: list[str]) -> list[str]:
    return ["model", "revision", *labels]


def write_tables(records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    import pandas as pd

    labels = _labels(records)
    keys = _checkpoint_keys(labels)
    written: list[Path] = []
    score_rows, progress_rows, metric_rows = [], [], []
    for rec in records:
        head = {"model": rec["model"], "revision": rec.get("revision", ""), **(rec.get("labels") or {})}
        if rec.get("kind") == "task":
            for s in rec["scores"]:
                score_rows.append({**head, "layer": s["layer"], "task": rec["task"], "task_type": rec["task_type"],
                                   "main_score": s["main_score"], "n_texts": rec["n_texts"],
                                   NONFINITE: s.get(NONFINITE)})  # None: stored before it was counted
                progress_rows.append({"model": rec["model"], "revision": rec.get("revision", ""), "state": rec["state"],
                                      "layer": s["layer"], "task": rec["task"], "status": "done",
                                      "main_score": s["main_score"], "duration_s": s["duration_s"], "time": s["time"]})
        elif rec.get("kind") == "metrics":
            for m in rec["layers"]:
                metric_rows.append({**head, "dataset": rec["dataset"], "layer": m["layer"],
                                    **{k: m[k] for k in METRICS}, "n_prompts": m["n_prompts"], "alpha": rec["alpha"],
                                    NONFINITE: m.get(NONFINITE)})
    if score_rows:
        scores = pd.DataFrame(score_rows).sort_values([*keys, "task", "layer"], kind="stable")
        scores = scores[[*keys, "layer", "task", "task_type", "main_score", "n_texts", NONFINITE]]
        scores[NONFINITE] = scores[NONFINITE].astype("Int64")  # empty where unknown
        written.append(write_csv(scores, run_dir / TABLE))
        written += _summaries(scores, keys, run_dir)
        table = pd.DataFrame(progress_rows, columns=list(progress.COLUMNS)).sort_values(
            ["model", "revision", "state", "task", "layer"], kind="stable")
        written.append(write_csv(table, run_dir / progress.PROGRESS))
    if metric_rows:
        metrics = pd.DataFrame(metric_rows).sort_values([*keys, "dataset", "layer"], kind="stable")
        metrics[NONFINITE] = metrics[NONFINITE].astype("Int64")
        written.append(write_csv(metrics, run_dir / METRICS_TABLE))
    return written


def _summaries(scores, keys: list[str], run_dir: Path) -> list[Path]:
    import pandas as pd

    by_task = _grid(scores, [*keys, "layer"], "task")
    by_task["mean"] = by_task.mean(axis=1, skipna=False)
    by_task = by_task.reset_index()
    by_task.columns.name = None
    by_type = (scores.groupby([*keys, "layer", "task_type"], sort=True)["main_score"]
               .agg(mean_main_score=_mean, n_tasks="size").reset_index())
    best_rows = []
    for values, group in scores.groupby([*keys, "task"], sort=True):
        best_rows.append(_best(dict(zip([*keys, "task"], values)), group))
    mean = scores.groupby([*keys, "layer"], sort=True)["main_score"].agg(_mean).reset_index()
    for values, group in mean.groupby(keys, sort=True):
        key = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        best_rows.append(_best({**key, "task": ALL_TASKS}, group))
    best = pd.DataFrame(best_rows).astype({"best_layer": "Int64"})  # empty when no layer scored
    return [write_csv(by_task, run_dir / BY_TASK), write_csv(by_type, run_dir / BY_TYPE), write_csv(best, run_dir / BEST)]


def _best(head: dict[str, Any], group) -> dict[str, Any]:
    """The best layer of one (checkpoint, task) (the earliest of ties, among the finite scores)
    against the last layer."""
    group = group.sort_values("layer")
    finite = group[group["main_score"].notna()]
    top = finite.loc[finite["main_score"].idxmax()] if len(finite) else {"layer": None, "main_score": float("nan")}
    last = group.iloc[-1]
    return {**head, "best_layer": top["layer"], "best_score": float(top["main_score"]),
            "last_layer": int(last["layer"]), "last_score": float(last["main_score"]),
            "gain_over_last": float(top["main_score"] - last["main_score"]), "n_layers": len(group)}


def _safe(name: str) -> str:
    return re.sub(r"[^\w.@=-]+", "_", str(name)).strip("_") or "x"


def _checkpoint_name(row: dict[str, Any], keys: list[str]) -> str:
    parts = [str(row["model"])] + ([f"@{row['revision']}"] if row.get("revision") else [])
    parts += [f" {k}={row[k]}" for k in keys[2:]]
    return "".join(parts)


def draw_figures(run_dir: Path) -> list[Path]:
    import pandas as pd

    outputs: list[Path] = []
    if (run_dir / TABLE).exists():
        scores = pd.read_csv(run_dir / TABLE, keep_default_na=False, na_values=[""])
        keys = [c for c in scores.columns if c not in SCORE_VALUES]
        scores["revision"] = scores["revision"].fillna("").astype(str)
        outputs.append(_curve(scores, keys, run_dir))
        outputs += _layer_task_heatmaps(scores, keys, run_dir)
        outputs += _checkpoint_layer_heatmaps(scores, keys, run_dir)
    if (run_dir / METRICS_TABLE).exists():
        outputs.append(_metric_curves(pd.read_csv(run_dir / METRICS_TABLE, keep_default_na=False, na_values=[""]),
                                      run_dir))
    if not outputs:
        from ..errors import LensbenchError

        raise LensbenchError(f"{run_dir} holds neither {TABLE} nor {METRICS_TABLE}; run the layer sweep first")
    return outputs


def _curve(scores, keys: list[str], run_dir: Path) -> Path:
    plt = pyplot()
    types = sorted(scores["task_type"].unique())
    panels = ["all tasks", *types] if len(types) > 1 else types
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        part = scores if panel == "all tasks" else scores[scores["task_type"] == panel]
        mean = part.groupby([*keys, "layer"], sort=True)["main_score"].agg(_mean).reset_index()
        for values, group in mean.groupby(keys, sort=True):
            row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
            ax.plot(group["layer"], group["main_score"], marker="o", markersize=3, label=_checkpoint_name(row, keys))
        ax.set_title(f"{panel} (mean main score)" if panel == "all tasks" else panel)
        ax.set_xlabel("layer (0 = embedding output)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MTEB main score")
    return _save(fig, axes, scores.groupby(keys).ngroups, run_dir / "layer_curve.png")


def _save(fig, axes, lines: int, out: Path) -> Path:
    """A legend in the last panel when it has at most 12 lines (more would hide the curves), then saved and closed."""
    if lines <= 12:
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    pyplot().close(fig)
    return out


def _heatmap(matrix, title: str, out: Path) -> Path:
    """Draw ``matrix`` (rows x layers) as a heatmap with a colour bar; save it to ``out``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * matrix.shape[1], max(2.6, 1.2 + 0.3 * matrix.shape[0])))
    image = ax.imshow(matrix.values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(matrix.shape[1]), [str(x) for x in matrix.columns], fontsize=7)
    ax.set_yticks(range(matrix.shape[0]), [str(y) for y in matrix.index], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def _layer_task_heatmaps(scores, keys: list[str], run_dir: Path) -> list[Path]:
    outputs = []
    for values, group in scores.groupby(keys, sort=True):
        name = _checkpoint_name(dict(zip(keys, values if isinstance(values, tuple) else (values,))), keys)
        matrix = _grid(group, ["task"], "layer")
        outputs.append(_heatmap(matrix, f"{name}: main score", run_dir / f"heatmap_layer_task__{_safe(name)}.png"))
    return outputs


def _checkpoint_layer_heatmaps(scores, keys: list[str], run_dir: Path) -> list[Path]:
    scores = scores.assign(checkpoint=[_checkpoint_name(r, keys) for r in scores[keys].to_dict("records")])
    return [_heatmap(_grid(group, ["checkpoint"], "layer", _mean),
                     f"{task_type}: mean main score", run_dir / f"heatmap_checkpoint_layer__{_safe(task_type)}.png")
            for task_type, group in scores.groupby("task_type", sort=True)]


def _metric_curves(metrics, run_dir: Path) -> Path:
    plt = pyplot()
    keys = [c for c in metrics.columns if c not in ("layer", *METRICS, "n_prompts", "alpha", NONFINITE)]
    metrics["revision"] = metrics["revision"].fillna("").astype(str)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8), squeeze=False)
    for ax, name in zip(axes[0], METRICS):
        for values, group in metrics.groupby(keys, sort=True):
            row = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
            label = _checkpoint_name(row, [k for k in keys if k != "dataset"]) + f" / {row['dataset']}"
            ax.plot(group["layer"], group[name], marker="o", markersize=3, label=label)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    return _save(fig, axes, metrics.groupby(keys).ngroups, run_dir / "representation_metrics.png")
