"""layer_sweep on a model whose weights hold NaN, through the real console script: the texts whose pooled
embedding is not finite are counted per (layer, task or dataset) in both tables, the merge says so in one
console line, those layers score NaN (MTEB is not left to fail on them) and the figures are drawn; records
stored before the count was kept merge with the count left empty."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from conftest import clean_env, lensbench
from reliability.sweep_tasks import write_sts
from tiny import save_tiny_llama, write_texts
from transformers import AutoModelForCausalLM

NAN_MATRIX = "model.layers.1.mlp.down_proj.weight"  # hidden states 2 (block 1's output) and 3 are NaN
FIGURES = ["heatmap_checkpoint_layer__STS.png", "heatmap_layer_task__nanmodel.png", "layer_curve.png",
           "metric_vs_score.png", "representation_metrics.png"]


@pytest.fixture(scope="module")
def nan_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_nan")
    save_tiny_llama(root / "nanmodel", layers=3)
    model = AutoModelForCausalLM.from_pretrained(root / "nanmodel")
    with torch.no_grad():
        model.get_parameter(NAN_MATRIX).fill_(math.nan)
    model.save_pretrained(root / "nanmodel")
    write_sts(root / "pairs")
    write_texts(root / "texts.txt", 8, seed=4)
    env = clean_env(HF_HUB_OFFLINE="1")
    run = lensbench("predict", "--model", "layer_sweep", "--model.init_args.models", "[nanmodel]",
                    "--data", "lensbench.layer_sweep.data.LayerSweepData", "--data.init_args.tasks", "[pairs]",
                    "--data.init_args.metrics_datasets", "[texts.txt]", "--trainer.accelerator", "cpu",
                    "--model.init_args.experiment", "nan", cwd=root, env=env)
    run_dir = root / "outputs" / "nan"
    drawn = sorted(p.name for p in run_dir.glob("*.png"))
    for png in run_dir.glob("*.png"):
        png.unlink()
    plot = lensbench("plot", str(run_dir), cwd=root, env=env)
    rows = [json.loads(line) for line in (root / "pairs" / "test.jsonl").read_text().splitlines()]
    distinct = len({r[k] for r in rows for k in ("sentence1", "sentence2")})
    return run_dir, run, drawn, plot, distinct


@pytest.mark.requires("mteb")
def test_nan_layers_are_counted_said_and_drawn(nan_sweep):
    run_dir, run, drawn, plot, distinct = nan_sweep
    assert run.returncode == 0, run.stderr[-3000:]
    scores = pd.read_csv(run_dir / "layer_sweep.csv").set_index("layer")
    assert scores["n_nonfinite_texts"].tolist() == [0, 0, distinct, distinct]
    assert scores.loc[[0, 1], "main_score"].notna().all() and scores.loc[[2, 3], "main_score"].isna().all()
    metrics = pd.read_csv(run_dir / "representation_metrics.csv").set_index("layer")
    assert metrics["n_nonfinite_texts"].tolist() == [0, 0, 8, 8] and (metrics["n_prompts"] == 8).all()
    values = ["prompt_entropy", "dataset_entropy", "curvature", "effective_rank"]
    assert metrics.loc[[0, 1], values].notna().all().all() and metrics.loc[[2, 3], values].isna().all().all()
    best = pd.read_csv(run_dir / "best_layers.csv").set_index("task")
    assert best.loc["pairs", "best_layer"] in (0, 1) and math.isnan(best.loc["pairs", "last_score"])
    by_task = pd.read_csv(run_dir / "summary_layer_by_task.csv")
    assert list(by_task["layer"]) == [0, 1, 2, 3] and by_task["mean"].isna().tolist() == [False, False, True, True]

    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("layer_sweep: ")
             and "non-finite" in line]
    assert len(lines) == 1, (run.stdout + run.stderr)[-3000:]
    line = lines[0]
    assert f"layer_sweep: {2 * distinct + 2 * 8} non-finite (NaN or inf) pooled text embeddings (" in line, line
    places = [f"nanmodel / pairs layer 2: {distinct}", f"nanmodel / pairs layer 3: {distinct}",
              "nanmodel / texts layer 2: 8", "nanmodel / texts layer 3: 8"]
    assert sum(p in line for p in places) == 3 and "and 1 more" in line, line
    assert "counted in n_nonfinite_texts of" in line and "layer_sweep.csv" in line, line
    assert "representation_metrics.csv" in line and "Traceback" not in run.stderr, line

    assert drawn == FIGURES
    assert plot.returncode == 0, plot.stderr[-3000:]
    for png in FIGURES:
        assert (run_dir / png).stat().st_size > 1000, png


@pytest.mark.requires("mteb")
def test_records_without_the_count_merge_with_it_unknown(nan_sweep, tmp_path, monkeypatch):
    from lensbench.analyses.layer_sweep import LayerSweep
    from lensbench.layer_sweep.collect import draw_figures
    from lensbench.logs import console

    run_dir = nan_sweep[0]
    records = [json.loads(line) for shard in sorted((run_dir / "shards").glob("*.jsonl"))
               for line in shard.read_text().splitlines()]
    assert {r["kind"] for r in records} == {"task", "metrics"}
    for rec in records:  # as stored before the count was kept
        for row in rec.get("scores") or rec.get("layers"):
            del row["n_nonfinite_texts"]
    said: list[str] = []
    monkeypatch.setattr(console, "warning", said.append)
    LayerSweep.merge(records, tmp_path)
    assert said == []  # unknown is not counted
    for table in ("layer_sweep.csv", "representation_metrics.csv"):
        assert pd.read_csv(tmp_path / table)["n_nonfinite_texts"].isna().all(), table
    assert sorted(p.name for p in draw_figures(tmp_path)) == FIGURES
