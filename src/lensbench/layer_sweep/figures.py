"""The layer sweep's figures, drawn from its tables (``lensbench plot`` redraws them).

- Checkpoints are drawn in natural order (``step94000`` before ``step100000``). Up to ``LEGEND_MAX``
  lines get the default colours and a legend; more get colours from a colour map in that order and a
  colour bar naming them (a legend of 50 lines in 10 repeated colours cannot be read).
- The x axis is the layer; where models of different depth share a figure it is the relative depth,
  layer / the model's last layer (``model_last_layer``; the highest layer of that model in the table
  for tables written before it was kept).
- The task x layer heatmap colours each task's row on its own range (0 = the task's lowest layer
  score, 1 = its highest); the row's label gives the range.
- File names keep the model's name and a short revision; state columns and long revisions become an
  8-character digest (:func:`.columns.file_stem`); the title names the checkpoint in full.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..tables import finite, pyplot, save_figure, value_scale
from .columns import (
    LAST,
    LAYER_NORM,
    METRICS,
    METRICS_TABLE,
    TABLE,
    _grid,
    _mean,
    _safe,
    checkpoint_name,
    file_stem,
    natural_sort,
    ordered,
    table_keys,
)

LEGEND_MAX = 10  # the default colour cycle's length


def read_table(path: Path):
    """A stored table with ``model``, ``revision`` and ``layer_norm`` as text (empty, not NaN, where missing)."""
    import pandas as pd

    frame = pd.read_csv(path, keep_default_na=False, na_values=[""],
                        dtype={c: str for c in ("model", "revision", LAYER_NORM)})
    for column in ("revision", LAYER_NORM):
        if column in frame:
            frame[column] = frame[column].astype(object).where(frame[column].notna(), "")
    return frame


def draw_figures(run_dir: Path) -> list[Path]:
    outputs: list[Path] = []
    scores = metrics = None
    if (run_dir / TABLE).exists():
        scores = read_table(run_dir / TABLE)
        keys = table_keys(scores)
        scores = natural_sort(scores, [*keys, "task", "layer"])
        outputs.append(_curve(scores, keys, run_dir))
        outputs += _score_by_step(scores, keys, run_dir)
        outputs += _layer_task_heatmaps(scores, keys, run_dir)
        outputs += _checkpoint_layer_heatmaps(scores, keys, run_dir)
    if (run_dir / METRICS_TABLE).exists():
        metrics = read_table(run_dir / METRICS_TABLE)
        outputs.append(_metric_curves(metrics, run_dir))
    if scores is not None and metrics is not None:
        from .correlation import join

        joined = join(scores, metrics, keys)
        if len(joined):
            outputs.append(_scatter(joined, keys, run_dir))
    if not outputs:
        from ..errors import LensbenchError

        raise LensbenchError(f"{run_dir} holds neither {TABLE} nor {METRICS_TABLE}; run the layer sweep first")
    return outputs


# -- shared pieces -------------------------------------------------------------------------------
def _depth_axis(frame):
    """(x values, x label): the layer, or layer / the model's last layer where depths differ."""
    depth = frame.groupby("model", dropna=False)["layer"].transform("max").astype(float)
    if LAST in frame:
        depth = frame[LAST].astype(float).fillna(depth)
    if depth.nunique() > 1:
        return frame["layer"] / depth, "relative depth (layer / the model's last layer)"
    return frame["layer"].astype(float), "layer (0 = embedding output)"


def _colours(n: int):
    """Colours of ``n`` ordered lines: the default cycle (C0..C9) up to LEGEND_MAX, else a colour map."""
    if n <= LEGEND_MAX:
        return [f"C{i}" for i in range(n)], None
    cmap = pyplot().get_cmap("viridis")
    return [cmap(i / (n - 1)) for i in range(n)], cmap


def _key(fig, axes, names: list[str], cmap, what: str) -> None:
    """A legend in the last panel (default colours), or a colour bar naming the lines (a colour map),
    at most 16 names on it."""
    if cmap is None:
        if names:
            axes[-1].legend(fontsize=7)
        return
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(-0.5, len(names) - 0.5), cmap=cmap)
    bar = fig.colorbar(mappable, ax=list(axes), fraction=0.03, pad=0.01)
    ticks = sorted({round(i * (len(names) - 1) / 15) for i in range(16)}) if len(names) > 16 else range(len(names))
    bar.set_ticks(list(ticks), labels=[names[i] for i in ticks])
    bar.ax.tick_params(labelsize=6)
    bar.set_label(what, fontsize=8)


def _save(fig, out: Path) -> Path:
    save_figure(fig, out, dpi=110)
    pyplot().close(fig)
    return out


def _panels(frame) -> list[str]:
    types = ordered(frame["task_type"].unique())
    return ["all tasks", *types] if len(types) > 1 else types


def _part(frame, panel: str):
    return frame if panel == "all tasks" else frame[frame["task_type"] == panel]


# -- figures -------------------------------------------------------------------------------------
def _curve(scores, keys: list[str], run_dir: Path) -> Path:
    """Mean main score against layer, one line per checkpoint; a panel for all tasks and one per type."""
    plt = pyplot()
    panels = _panels(scores)
    x, xlabel = _depth_axis(scores)
    scores = scores.assign(_x=x)
    names = [checkpoint_name(dict(zip(keys, v)), keys) for v in scores[keys].drop_duplicates().itertuples(
        index=False, name=None)]
    colours, cmap = _colours(len(names))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + (1.5 if cmap else 0), 4),
                             squeeze=False, layout="constrained")
    for ax, panel in zip(axes[0], panels):
        mean = _part(scores, panel).groupby([*keys, "_x"], sort=False, dropna=False)["main_score"].agg(
            _mean).reset_index()
        for values, group in mean.groupby(keys, sort=False, dropna=False):
            name = checkpoint_name(dict(zip(keys, values)), keys)
            group = group.sort_values("_x")
            ax.plot(group["_x"], finite(group["main_score"]), marker="o", markersize=3, label=name,
                    color=colours[names.index(name)])
        ax.set_title(f"{panel} (mean main score)" if panel == "all tasks" else panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MTEB main score")
    _key(fig, axes[0], names, cmap, "checkpoint")
    return _save(fig, run_dir / "layer_curve.png")


def _steps(revisions: list[str]) -> list[int] | None:
    """The training step of each revision (its last number, as in ``step94000``), None when one has none."""
    numbers = [re.findall(r"\d+", str(r)) for r in revisions]
    return [int(n[-1]) for n in numbers] if all(numbers) else None


def _score_by_step(scores, keys: list[str], run_dir: Path) -> list[Path]:
    """Per model (and state) with several revisions: mean main score against training step, one
    line per layer; a panel for all tasks and one per task type."""
    plt = pyplot()
    outputs = []
    others = [k for k in keys if k != "revision"]
    for values, part in scores.groupby(others, sort=False, dropna=False):
        revisions = ordered(part["revision"].unique())
        if len(revisions) < 2:
            continue
        row = {**dict(zip(others, values)), "revision": ""}
        steps = _steps(revisions)
        at = dict(zip(revisions, steps if steps else range(len(revisions))))
        layers = ordered(part["layer"].unique())
        colours, cmap = _colours(len(layers))
        panels = _panels(part)
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + (1.5 if cmap else 0), 4),
                                 squeeze=False, layout="constrained")
        for ax, panel in zip(axes[0], panels):
            mean = _part(part, panel).groupby(["layer", "revision"], sort=False)["main_score"].agg(_mean).reset_index()
            mean["_x"] = mean["revision"].map(at)
            for layer, colour in zip(layers, colours):
                line = mean[mean["layer"] == layer].sort_values("_x")
                ax.plot(line["_x"], finite(line["main_score"]), marker="o", markersize=2, color=colour,
                        label=f"layer {layer}")
            if steps:
                value_scale(ax, steps, "x")
                ax.set_xlabel("training step")
            else:
                ax.set_xticks(range(len(revisions)), revisions, rotation=90, fontsize=6)
                ax.set_xlabel("revision")
            ax.set_title(f"{panel} (mean main score)" if panel == "all tasks" else panel)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("MTEB main score")
        fig.suptitle(checkpoint_name(row, keys), fontsize=9)
        _key(fig, axes[0], [f"layer {layer}" for layer in layers], cmap, "layer")
        outputs.append(_save(fig, run_dir / f"score_by_step__{file_stem(row, keys)}.png"))
    return outputs


def _heatmap(matrix, title: str, out: Path, bar: str) -> Path:
    """Draw ``matrix`` (rows x layers) as a heatmap with a colour bar; save it to ``out``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * matrix.shape[1], max(2.6, 1.2 + 0.3 * matrix.shape[0])),
                           layout="constrained")
    image = ax.imshow(matrix.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(matrix.shape[1]), [str(x) for x in matrix.columns], fontsize=7)
    ax.set_yticks(range(matrix.shape[0]), [str(y) for y in matrix.index], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, fraction=0.04).set_label(bar, fontsize=7)
    return _save(fig, out)


def _row_scaled(matrix):
    """Each row of ``matrix`` on its own range (0 = its lowest finite value, 1 = its highest; 0.5 for
    a row of one value), its label given that range."""
    import numpy as np

    values = matrix.to_numpy(dtype=float)
    values = np.where(np.isfinite(values), values, np.nan)
    low, high = np.nanmin(values, axis=1, keepdims=True), np.nanmax(values, axis=1, keepdims=True)
    span = high - low
    scaled = np.where(span > 0, (values - low) / np.where(span > 0, span, 1), 0.5)
    labels = [f"{name} [{lo:.3g}, {hi:.3g}]" if np.isfinite(lo) else str(name)
              for name, lo, hi in zip(matrix.index, low[:, 0], high[:, 0])]
    return matrix.__class__(np.where(np.isfinite(values), scaled, np.nan), index=labels, columns=matrix.columns)


def _layer_task_heatmaps(scores, keys: list[str], run_dir: Path) -> list[Path]:
    import warnings

    outputs = []
    for values, group in scores.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, values))
        heads, cells = _grid(group, ["task"], "layer")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a task whose every layer is NaN: its row stays blank
            matrix = _row_scaled(cells.set_axis(heads["task"].tolist()))
        outputs.append(_heatmap(matrix, f"{checkpoint_name(row, keys)}: main score, each task on its own range",
                                run_dir / f"heatmap_layer_task__{file_stem(row, keys)}.png",
                                "within the task's range (0 low, 1 high)"))
    return outputs


def _checkpoint_layer_heatmaps(scores, keys: list[str], run_dir: Path) -> list[Path]:
    scores = scores.assign(checkpoint=[checkpoint_name(dict(zip(keys, v)), keys)
                                       for v in scores[keys].itertuples(index=False, name=None)])
    outputs = []
    for task_type in ordered(scores["task_type"].unique()):
        heads, cells = _grid(scores[scores["task_type"] == task_type], ["checkpoint"], "layer", _mean)
        outputs.append(_heatmap(cells.set_axis(heads["checkpoint"].tolist()), f"{task_type}: mean main score",
                                run_dir / f"heatmap_checkpoint_layer__{_safe(task_type)}.png",
                                "mean main score"))
    return outputs


def _metric_curves(metrics, run_dir: Path) -> Path:
    """The four raw metrics against layer: a colour per checkpoint (in step order) and a line style per
    metrics dataset; the metrics of the tasks' own texts are drawn as one line, their mean over tasks."""
    import pandas as pd

    from .correlation import OWN_TEXTS

    plt = pyplot()
    keys = [k for k in table_keys(metrics) if k not in ("dataset", "source")]
    # A table written before ``source`` was kept holds metrics datasets only.
    own = metrics["source"].eq("task") if "source" in metrics else pd.Series(False, index=metrics.index)
    metrics = metrics.assign(_dataset=metrics["dataset"].where(~own, OWN_TEXTS))
    metrics = natural_sort(metrics, [*keys, "layer"])
    x, xlabel = _depth_axis(metrics)
    metrics = metrics.assign(_x=x)
    mean = metrics.groupby([*keys, "_dataset", "_x"], sort=False, dropna=False)[list(METRICS)].agg(_mean).reset_index()
    names = [checkpoint_name(dict(zip(keys, v)), keys) for v in
             metrics[keys].drop_duplicates().itertuples(index=False, name=None)]
    datasets = ordered(metrics["_dataset"].unique())
    styles = dict(zip(datasets, ["-", "--", ":", "-."] * len(datasets)))
    colours, cmap = _colours(len(names))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS) + (1.5 if cmap else 0), 3.8),
                             squeeze=False, layout="constrained")
    for ax, metric in zip(axes[0], METRICS):
        for values, group in mean.groupby([*keys, "_dataset"], sort=False, dropna=False):
            name = checkpoint_name(dict(zip(keys, values)), keys)
            group = group.sort_values("_x")
            label = name + (f" / {values[-1]}" if len(datasets) > 1 else "")
            ax.plot(group["_x"], finite(group[metric]), marker="o", markersize=3, label=label,
                    color=colours[names.index(name)], linestyle=styles[values[-1]])
        ax.set_title(metric.replace("_", " ") + ("" if len(datasets) > 1 else f" ({datasets[0]})"))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    _key(fig, axes[0], names, cmap, "checkpoint")
    if cmap is not None and len(datasets) > 1:  # the colour bar names the checkpoints; the styles, the datasets
        from matplotlib.lines import Line2D

        axes[0][0].legend([Line2D([], [], color="grey", linestyle=styles[d]) for d in datasets], datasets, fontsize=7)
    return _save(fig, run_dir / "representation_metrics.png")


def _scatter(joined, keys: list[str], run_dir: Path) -> Path:
    """Each metric against the mean main score over all tasks, one point per (checkpoint, state, layer),
    coloured by relative depth; a row of panels per metrics dataset, titled with Spearman's rho."""
    from ..intervals import spearman
    from .correlation import ALL_TYPES, groups, points

    plt = pyplot()
    values = [m for m in METRICS if m in joined]
    names = groups(joined)
    fig, axes = plt.subplots(len(names), len(values), figsize=(3.6 * len(values) + 1, 3.2 * len(names)),
                             squeeze=False, layout="constrained")
    image = None
    for row, group in zip(axes, names):
        pts = points(joined, keys, group, ALL_TYPES, values)
        depth = pts.groupby("model", dropna=False)["layer"].transform("max").astype(float)
        relative = pts["layer"] / (pts[LAST].astype(float).fillna(depth) if LAST in pts else depth)
        for ax, metric in zip(row, values):
            rho, _, n = spearman(pts[metric], pts["main_score"])
            image = ax.scatter(finite(pts[metric]), finite(pts["main_score"]), c=relative, cmap="viridis",
                               vmin=0, vmax=1, s=14)
            ax.set_title(f"{group}: rho = {rho:.2f} (n = {n})", fontsize=8)
            ax.set_xlabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
        row[0].set_ylabel("mean main score over the tasks")
    fig.colorbar(image, ax=list(axes.ravel()), fraction=0.03).set_label("relative depth (layer / last layer)")
    return _save(fig, run_dir / "metric_vs_score.png")

