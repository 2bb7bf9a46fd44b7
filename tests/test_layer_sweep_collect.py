"""layer_sweep's tables and figures from hand-built records (no model): checkpoints in step order, the
model's last layer in best_layers.csv, layer_norm as a column, scores joined with metrics and their
Spearman correlation (checked against scipy), short figure file names, a colour bar beyond 10 lines,
relative depth, the score-by-step figure, and no Pandas4Warning."""

from __future__ import annotations

import math
import random
import warnings

import pandas as pd
import pytest

from lensbench.layer_sweep import columns, figures
from lensbench.layer_sweep.collect import draw_figures, write_tables

STEPS = ["step100000", "step94000", "step2000", "step0", "step143000"]
TASKS = {"a": "STS", "b": "Classification", "c": "STS"}


def task_record(model="m", revision="", task="a", layers=(0, 1, 2, 3, 4), score=None, labels=None, **extra):
    score = score or (lambda layer: 0.1 * layer)
    return {"kind": "task", "model": model, "revision": revision, "task": task, "task_type": TASKS[task],
            "n_texts": 10, "state": "s", "labels": labels or {}, **extra,
            "scores": [{"layer": layer, "main_score": score(layer), "duration_s": 1.0, "time": "t",
                        "n_nonfinite_texts": 0} for layer in layers]}


def metrics_record(model="m", revision="", dataset="wiki", layers=(0, 1, 2, 3, 4), value=None, labels=None, **extra):
    value = value or (lambda name, layer: float(layer))
    return {"kind": "metrics", "model": model, "revision": revision, "dataset": dataset, "alpha": 1.0,
            "labels": labels or {}, **extra,
            "layers": [{"layer": layer, **{m: value(m, layer) for m in columns.METRICS}, "n_prompts": 4,
                        "n_nonfinite_texts": 0} for layer in layers]}


@pytest.fixture
def drawn(monkeypatch):
    """The figures drawn, by file name (save_figure writes a stub; the Figure objects stay inspectable)."""
    figs = {}

    def save(fig, path, **kwargs):
        figs[path.name] = fig
        path.write_bytes(b"png")
        return path

    monkeypatch.setattr(figures, "save_figure", save)
    return figs


def _legend(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def _colour_bars(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_checkpoints_sort_by_step_in_tables_heatmaps_and_legends(tmp_path, drawn):
    records = [task_record(revision=rev, task=t) for rev in STEPS for t in ("b", "a")]
    write_tables(records, tmp_path)
    want = ["step0", "step2000", "step94000", "step100000", "step143000"]
    scores = pd.read_csv(tmp_path / "layer_sweep.csv")
    assert list(dict.fromkeys(scores["revision"])) == want
    assert list(scores["task"][:10]) == ["a"] * 5 + ["b"] * 5 and list(scores["layer"][:5]) == [0, 1, 2, 3, 4]
    for name in ("best_layers.csv", "summary_layer_by_task.csv", "summary_task_type.csv", "progress.csv"):
        assert list(dict.fromkeys(pd.read_csv(tmp_path / name)["revision"])) == want, name
    draw_figures(tmp_path)
    rows = [t.get_text() for t in drawn["heatmap_checkpoint_layer__STS.png"].axes[0].get_yticklabels()]
    assert rows == [f"m@{rev}" for rev in want]
    assert _legend(drawn["layer_curve.png"]) == [f"m@{rev}" for rev in want]


def test_natural_key_orders_digits_as_numbers():
    values = ["step100000", "step94000", "main", "", "step9", "step10"]
    assert sorted(values, key=columns.natural_key) == ["", "main", "step9", "step10", "step94000", "step100000"]
    frame = pd.DataFrame({"level_value": pd.Series([0.1, None, 0.05], dtype=object), "revision": ["b", "a", "c"]})
    assert columns.natural_sort(frame, ["level_value"])["revision"].tolist() == ["c", "b", "a"]  # 0.05 < 0.1


def test_best_layers_compare_with_the_models_last_layer(tmp_path):
    peak = {0: 0.1, 1: 0.5, 2: 0.9, 4: 0.3}  # layer 3 not asked: the sweep scored 0..2 and the model's last, 4
    records = [task_record(revision="new", task="a", layers=(0, 1, 2, 4), score=peak.get, model_last_layer=4),
               task_record(revision="old", task="a", layers=(0, 1, 2), score=peak.get)]  # stored before it was kept
    write_tables(records, tmp_path)
    best = pd.read_csv(tmp_path / "best_layers.csv").set_index(["revision", "task"])
    new = best.loc[("new", "a")]
    assert (new["best_layer"], new["last_layer"], new["last_layer_source"]) == (2, 4, "model")
    assert new["last_score"] == 0.3 and new["gain_over_last"] == pytest.approx(0.6) and new["n_layers"] == 4
    assert best.loc[("new", columns.ALL_TASKS), "last_layer"] == 4
    old = best.loc[("old", "a")]
    assert (old["last_layer"], old["last_layer_source"], old["last_score"]) == (2, "last swept", 0.9)
    assert old["gain_over_last"] == 0


def test_layer_norm_is_a_column_not_a_key_unless_it_varies(tmp_path, drawn):
    records = [task_record(task="a", layer_norm="final", model_last_layer=4),
               task_record(task="b", layer_norm="final", model_last_layer=4),
               metrics_record(layer_norm="final", model_last_layer=4)]
    write_tables(records, tmp_path)
    scores = pd.read_csv(tmp_path / "layer_sweep.csv")
    assert list(scores.columns) == ["model", "revision", "layer", "task", "task_type", "main_score", "n_texts",
                                    "n_nonfinite_texts", "layer_norm", "model_last_layer"]
    assert set(scores["layer_norm"]) == {"final"} and set(scores["model_last_layer"]) == {4}
    metrics = pd.read_csv(tmp_path / "representation_metrics.csv")
    assert list(metrics.columns[-2:]) == ["layer_norm", "model_last_layer"] and set(metrics["layer_norm"]) == {"final"}
    assert "layer_norm" not in pd.read_csv(tmp_path / "best_layers.csv")
    draw_figures(tmp_path)
    assert _legend(drawn["layer_curve.png"]) == ["m"] and "heatmap_layer_task__m.png" in drawn

    drawn.clear()
    older = tmp_path / "older"  # two embeddings of one model in one table: two checkpoints, both named
    older.mkdir()
    write_tables([*records, task_record(task="a", layer_norm="none", model_last_layer=4)], older)
    best = pd.read_csv(older / "best_layers.csv")
    assert sorted(best.loc[best.task == "a", "layer_norm"]) == ["final", "none"]
    draw_figures(older)
    assert _legend(drawn["layer_curve.png"]) == ["m layer_norm=final", "m layer_norm=none"]
    heatmaps = sorted(n for n in drawn if n.startswith("heatmap_layer_task__"))
    assert len(heatmaps) == 2 and all(n.startswith("heatmap_layer_task__m__") and "=" not in n for n in heatmaps)

    legacy = tmp_path / "legacy"  # records stored before either field was kept: empty cells
    legacy.mkdir()
    write_tables([task_record(task="a")], legacy)
    scores = pd.read_csv(legacy / "layer_sweep.csv")
    assert scores["layer_norm"].isna().all() and scores["model_last_layer"].isna().all()


def test_short_file_names_keep_the_model(tmp_path, drawn):
    state = {"degradation_method": "gaussian_noise", "param_group_name": "attention_and_mlp_weights",
             "level_value": 0.05, "repeat_index": 0, "seed": 1234, "is_baseline": False}
    commit = "a" * 40
    records = [task_record(model="pythia-410m", revision="step1000", task="a", labels=state),
               task_record(model="pythia-410m", revision=commit, task="a"),
               task_record(model="pythia-410m", revision="step1000", task="a")]
    write_tables(records, tmp_path)
    draw_figures(tmp_path)
    heatmaps = sorted(n for n in drawn if n.startswith("heatmap_layer_task__"))
    assert "heatmap_layer_task__pythia-410m@step1000.png" in heatmaps and len(heatmaps) == 3
    others = [n for n in heatmaps if n != "heatmap_layer_task__pythia-410m@step1000.png"]
    for name in others:
        assert name.startswith("heatmap_layer_task__pythia-410m") and len(name) <= 60, name
        assert "gaussian" not in name and commit not in name and "=" not in name
    assert any(n.startswith("heatmap_layer_task__pythia-410m@step1000__") for n in others)
    titles = [drawn[n].axes[0].get_title() for n in heatmaps]
    assert any("degradation_method=gaussian_noise" in t for t in titles)  # the title names it in full


def test_many_checkpoints_get_a_colour_map_and_bar(tmp_path, drawn):
    revisions = [f"step{1000 * i}" for i in range(13)]
    write_tables([task_record(revision=rev, task="a") for rev in revisions], tmp_path)
    draw_figures(tmp_path)
    curve = drawn["layer_curve.png"]
    assert _legend(curve) == [] and _colour_bars(curve) == ["checkpoint"]
    colours = [line.get_color() for line in curve.axes[0].get_lines()]
    assert len(set(map(str, colours))) == 13  # one colour each, not 10 repeated
    bar = next(ax for ax in curve.axes if ax.get_label() == "<colorbar>")
    assert bar.get_yticklabels()[0].get_text() == "m@step0" and bar.get_yticklabels()[-1].get_text() == "m@step12000"

    drawn.clear()
    few = tmp_path / "few"
    few.mkdir()
    write_tables([task_record(revision=rev, task="a") for rev in revisions[:3]], few)
    draw_figures(few)
    assert _legend(drawn["layer_curve.png"]) == ["m@step0", "m@step1000", "m@step2000"]
    assert _colour_bars(drawn["layer_curve.png"]) == []


def test_score_by_step_has_a_line_per_layer(tmp_path, drawn):
    records = [task_record(revision=rev, task=t, score=lambda layer, r=rev: layer + int(r[4:]) / 1e6)
               for rev in STEPS for t in ("a", "b")]
    write_tables(records, tmp_path)
    draw_figures(tmp_path)
    fig = drawn["score_by_step__m.png"]
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["all tasks (mean main score)", "Classification", "STS"]
    lines = panels[0].get_lines()
    assert [line.get_label() for line in lines] == [f"layer {layer}" for layer in range(5)]
    assert list(lines[2].get_xdata()) == [0, 2000, 94000, 100000, 143000]
    assert list(lines[2].get_ydata()) == pytest.approx([2 + s / 1e6 for s in (0, 2000, 94000, 100000, 143000)])
    assert panels[0].get_xlabel() == "training step"
    one = tmp_path / "one"
    one.mkdir()
    write_tables([task_record(task="a")], one)
    assert not [p for p in draw_figures(one) if p.name.startswith("score_by_step")]


def test_models_of_different_depth_share_a_relative_depth_axis(tmp_path, drawn):
    records = [task_record(model="small", task="a", layers=range(5), model_last_layer=4),
               task_record(model="big", task="a", layers=range(9), model_last_layer=8)]
    write_tables(records, tmp_path)
    draw_figures(tmp_path)
    ax = drawn["layer_curve.png"].axes[0]
    assert ax.get_xlabel().startswith("relative depth")
    assert [max(line.get_xdata()) for line in ax.get_lines()] == [1.0, 1.0]
    assert list(ax.get_lines()[1].get_xdata()) == [i / 4 for i in range(5)]  # small, after big


def test_task_rows_of_the_heatmap_are_scaled_to_their_own_range(tmp_path, drawn):
    records = [task_record(task="a", score=lambda layer: 0.50 + 0.01 * layer),
               task_record(task="b", score=lambda layer: 0.9 - 0.2 * layer)]
    write_tables(records, tmp_path)
    draw_figures(tmp_path)
    ax = drawn["heatmap_layer_task__m.png"].axes[0]
    cells = ax.get_images()[0].get_array()
    assert cells[0].tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])  # a: 0.50..0.54
    assert cells[1].tolist() == pytest.approx([1, 0.75, 0.5, 0.25, 0])  # b: 0.9..0.1
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a [0.5, 0.54]", "b [0.1, 0.9]"]


def _joint_records(n_checkpoints=4, seed=0):
    rng = random.Random(seed)
    records = []
    for i in range(n_checkpoints):
        rev = f"step{1000 * i}"
        for task in ("a", "b", "c"):
            noise = {layer: rng.random() for layer in range(5)}
            records.append(task_record(revision=rev, task=task, score=noise.get, model_last_layer=4,
                                       layer_norm="final"))
        for dataset in ("wiki", "a", "c"):  # wiki: named; a and c: the tasks' own texts
            noise = {(m, layer): rng.random() for m in columns.METRICS for layer in range(5)}
            records.append(metrics_record(revision=rev, dataset=dataset, value=lambda m, layer, n=noise: n[m, layer],
                                          model_last_layer=4, layer_norm="none",
                                          source="dataset" if dataset == "wiki" else "task"))
    return records


def test_joined_table_rows(tmp_path):
    from lensbench.layer_sweep.correlation import join

    records = _joint_records()
    write_tables(records, tmp_path)
    joined = pd.read_csv(tmp_path / "layer_metrics_scores.csv")
    assert [c for c in joined.columns if c != "source"] == [  # source: "task" for a task's own texts
        "model", "revision", "layer", "task", "task_type", "main_score", "dataset", *columns.METRICS,
        "metrics_layer_norm", "model_last_layer"]
    assert set(joined["metrics_layer_norm"]) == {"none"}  # the metrics' own setting; the scores' is final
    # per (checkpoint, layer): a with wiki and its own texts, b with wiki, c with wiki and its own texts
    assert len(joined) == 4 * 5 * 5
    pairs = joined.groupby("task")["dataset"].agg(lambda d: sorted(set(d))).to_dict()
    assert pairs == {"a": ["a", "wiki"], "b": ["wiki"], "c": ["c", "wiki"]}
    scores = pd.read_csv(tmp_path / "layer_sweep.csv")
    metrics = pd.read_csv(tmp_path / "representation_metrics.csv")
    for row in joined.sample(15, random_state=1).itertuples():
        score = scores[(scores.revision == row.revision) & (scores.layer == row.layer) & (scores.task == row.task)]
        metric = metrics[(metrics.revision == row.revision) & (metrics.layer == row.layer)
                         & (metrics.dataset == row.dataset)]
        assert row.main_score == score["main_score"].item()
        assert row.curvature == metric["curvature"].item() and row.prompt_entropy == metric["prompt_entropy"].item()
    legacy = join(scores, metrics.drop(columns="source", errors="ignore"), ["model", "revision"])  # own texts: named after the task
    assert len(legacy) == len(joined) and legacy.groupby("task")["dataset"].agg(lambda d: sorted(set(d))).to_dict() \
        == pairs
    only_scores = tmp_path / "only_scores"
    only_scores.mkdir()
    write_tables([r for r in records if r["kind"] == "task"], only_scores)
    assert not (only_scores / "layer_metrics_scores.csv").exists()
    assert not (only_scores / "metric_score_correlation.csv").exists()


def test_correlation_equals_scipy_spearman(tmp_path, drawn):
    from scipy.stats import spearmanr

    write_tables(_joint_records(), tmp_path)
    table = pd.read_csv(tmp_path / "metric_score_correlation.csv")
    scores = pd.read_csv(tmp_path / "layer_sweep.csv")
    metrics = pd.read_csv(tmp_path / "representation_metrics.csv")
    assert len(table) == 3 * 4 + 2 * 4  # wiki: all, Classification, STS; own texts: all, STS (a and c)

    def check(row, x, y):
        result = spearmanr(x, y)
        assert row["n"] == len(x) == 20
        assert row["spearman_rho"] == pytest.approx(result.statistic, abs=1e-9)
        assert row["p_value"] == pytest.approx(result.pvalue, rel=1e-6)
        z, se = math.atanh(result.statistic), math.sqrt((1 + result.statistic ** 2 / 2) / 17)
        assert row["ci95_low"] == pytest.approx(math.tanh(z - 1.959964 * se), abs=1e-6)
        assert row["ci95_high"] == pytest.approx(math.tanh(z + 1.959964 * se), abs=1e-6)

    on = ["revision", "layer"]
    wiki = metrics[metrics.dataset == "wiki"].set_index(on)
    for task_type, tasks in (("(all tasks)", "abc"), ("STS", "ac"), ("Classification", "b")):
        mean = scores[scores.task.isin(list(tasks))].groupby(on)["main_score"].mean()
        for metric in columns.METRICS:
            row = table[(table.dataset == "wiki") & (table.metric == metric) & (table.task_type == task_type)]
            check(row.iloc[0], wiki.loc[mean.index, metric].to_numpy(), mean.to_numpy())
    own = metrics[metrics.dataset.isin(["a", "c"])].groupby(on)["effective_rank"].mean()
    mean = scores[scores.task.isin(["a", "c"])].groupby(on)["main_score"].mean()
    row = table[(table.dataset == "(each task's texts)") & (table.metric == "effective_rank")
                & (table.task_type == "STS")]
    check(row.iloc[0], own.loc[mean.index].to_numpy(), mean.to_numpy())
    assert set(table.loc[table.dataset == "(each task's texts)", "n_tasks"]) == {2}

    draw_figures(tmp_path)
    scatter = drawn["metric_vs_score.png"]
    titles = [ax.get_title() for ax in scatter.axes if ax.get_label() != "<colorbar>"]
    wiki_rank = table[(table.dataset == "wiki") & (table.metric == "effective_rank")
                      & (table.task_type == "(all tasks)")]["spearman_rho"].item()
    assert f"wiki: rho = {wiki_rank:.2f} (n = 20)" in titles
    lines = drawn["representation_metrics.png"].axes[0].get_lines()  # 4 checkpoints x (wiki, the tasks' texts)
    assert sorted(line.get_label() for line in lines[:2]) == ["m@step0 / (each task's texts)", "m@step0 / wiki"]
    assert len(lines) == 8 and lines[0].get_color() == lines[1].get_color() != lines[2].get_color()


def test_no_pandas4_warning_and_plot_redraws_everything(tmp_path):
    from lensbench.analyses.layer_sweep import LayerSweep

    records = [*_joint_records(2), task_record(task="a", revision="", model="local")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.Pandas4Warning)
        write_tables(records, tmp_path)
        first = sorted(p.name for p in draw_figures(tmp_path))
        empty = tmp_path / "empty_revisions"  # an all-empty revision column reads back as NaN
        empty.mkdir()
        write_tables([task_record(task="a"), metrics_record()], empty)
        draw_figures(empty)
    for png in tmp_path.glob("*.png"):
        png.unlink()
    assert sorted(p.name for p in LayerSweep.plot(tmp_path)) == first
    assert {"layer_curve.png", "score_by_step__m.png", "metric_vs_score.png", "representation_metrics.png",
            "heatmap_layer_task__local.png", "heatmap_layer_task__m@step0.png"} <= set(first)
    for name in first:
        assert (tmp_path / name).stat().st_size > 1000, name


def test_plot_redraws_a_metrics_table_written_before_source_was_kept(tmp_path, drawn):
    """A representation_metrics.csv without the ``source`` column (an older run folder) holds metrics
    datasets only: ``lensbench plot`` still draws its curves."""
    write_tables([task_record(task="a"), metrics_record()], tmp_path)
    table = pd.read_csv(tmp_path / columns.METRICS_TABLE)
    table.drop(columns=["source"]).to_csv(tmp_path / columns.METRICS_TABLE, index=False)
    names = {p.name for p in draw_figures(tmp_path)}
    assert "representation_metrics.png" in names
    lines = [line for ax in drawn["representation_metrics.png"].axes for line in ax.get_lines()]
    assert lines and all(list(line.get_xdata()) == [0, 1, 2, 3, 4] for line in lines[:1])
