"""layer_sweep resumed after a SIGKILL that landed mid-task, once some layers' MTEB results were
cached under mteb/ but before the work item was stored: after the task folder was edited the cached
layers are recomputed (the table equals a fresh run's on the edited task, and the console says so);
unchanged, they are read back with their original duration. No spill/ folder is left behind. And a
local task folder of type Reranking is told which types a folder may declare."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import clean_env
from helpers_cli import run_many
from test_layer_sweep_runs import write_task


def sweep(experiment: str) -> tuple[str, ...]:
    # embedding_memory_mb: every run spills its embeddings to spill/ (which must not be left behind)
    return ("predict", "--model", "layer_sweep", "--model.init_args.models", "[tiny]", "--model.init_args.batch_size",
            "8", "--model.init_args.embedding_memory_mb", "0.001", "--data", "lensbench.layer_sweep.data.LayerSweepData",
            "--data.init_args.tasks", "[topics]", "--trainer.accelerator", "cpu",
            "--model.init_args.experiment", experiment)


def write_topics(folder: Path, seed: int) -> Path:
    """The classification task of test_layer_sweep_runs, with 2 experiments (not MTEB's 10) per layer."""
    write_task(folder, seed)
    spec = json.loads((folder / "task.json").read_text())
    (folder / "task.json").write_text(json.dumps({**spec, "n_experiments": 2}))
    return folder


def kill_mid_task(cwd: Path, env: dict) -> list[dict]:
    """Start the sweep, SIGKILL it once progress.csv holds a layer's row (its MTEB result cached) and
    before the work item is stored; return progress.csv's rows then."""
    run_dir = cwd / "outputs" / "run"
    progress = run_dir / "progress.csv"
    proc = subprocess.Popen(["lensbench", *sweep("run")], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            progress.exists() and progress.read_bytes().count(b"\n") >= 2):
        time.sleep(0.005)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended (exit {proc.returncode}) before the kill"
    shard = run_dir / "shards" / "rank00000.jsonl"
    assert not shard.exists() or not shard.read_text().strip(), "the kill must land before the item is stored"
    return pd.read_csv(progress).to_dict("records")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_model):
    """Two folders, each a sweep killed mid-task: ``edited`` then has its task folder rewritten, ``kept``
    not; both are resumed, beside a fresh run of each folder's (final) task."""
    root = tmp_path_factory.mktemp("stale")
    env = clean_env(HF_HUB_OFFLINE="1")
    killed = {}
    for name in ("edited", "kept"):
        (root / name).mkdir()
        (root / name / "tiny").symlink_to(tiny_model)
        write_topics(root / name / "topics", seed=0)
        killed[name] = kill_mid_task(root / name, env)
    write_topics(root / "edited" / "topics", seed=7)  # other texts and labels: another content digest
    cached = {p.parent.name: p.read_bytes() for p in (root / "kept" / "outputs" / "run" / "mteb").rglob("topics.json")}
    runs = run_many({f"{name}/{exp}": (sweep(exp), root / name, env) for name in ("edited", "kept")
                     for exp in ("run", "fresh")})
    for key, res in runs.items():
        assert res.returncode == 0, (key, res.stderr[-3000:])
    return root, killed, cached, runs


def _table(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "layer_sweep.csv").sort_values("layer").reset_index(drop=True)


@pytest.mark.requires("mteb")
def test_an_edited_task_is_recomputed_on_resume(resumed):
    root, killed, _, runs = resumed
    outputs = root / "edited" / "outputs"
    assert len(killed["edited"]) >= 1  # layers whose scores the edit made stale
    got, want = _table(outputs / "run"), _table(outputs / "fresh")
    assert list(got["layer"]) == [0, 1, 2]
    pd.testing.assert_frame_equal(got, want)
    old = {int(r["layer"]): r["main_score"] for r in killed["edited"]}  # scored on the old texts
    assert any(want.loc[want.layer == layer, "main_score"].item() != score for layer, score in old.items())
    layers = ", ".join(str(int(r["layer"])) for r in killed["edited"])
    text = runs["edited/run"].stdout + runs["edited/run"].stderr
    lines = [line for line in text.splitlines() if "removed the cached MTEB results" in line]
    assert len(lines) == 1, text[-3000:]
    assert f"tiny / topics: removed the cached MTEB results of layer{'s' if len(killed['edited']) > 1 else ''} " \
           f"{layers}" in lines[0] and "task content" in lines[0] and "recomputing" in lines[0], lines[0]
    assert "removed the cached MTEB results" in (outputs / "run" / "logs" / "rank0.log").read_text()
    for path in (outputs / "run" / "mteb").rglob("topics.json"):  # MTEB's own files hold the new revision
        assert json.loads(path.read_text())["dataset_revision"] == \
            json.loads(next((outputs / "fresh" / "mteb").rglob(path.name)).read_text())["dataset_revision"]


@pytest.mark.requires("mteb")
def test_an_unchanged_task_reads_the_cached_layers_back_with_their_duration(resumed):
    root, killed, cached, runs = resumed
    outputs = root / "kept" / "outputs"
    pd.testing.assert_frame_equal(_table(outputs / "run"), _table(outputs / "fresh"))
    assert "removed the cached MTEB results" not in runs["kept/run"].stderr + runs["kept/run"].stdout
    before = {int(r["layer"]): r["duration_s"] for r in killed["kept"]}
    after = {p.parent.name: p.read_bytes() for p in (outputs / "run" / "mteb").rglob("topics.json")}
    for layer in before:  # not evaluated again: MTEB's file (with its date) is the one the killed run wrote
        name = f"layer_{layer}__pooling_mean"
        assert after[name] == cached[name], layer
    progress = pd.read_csv(outputs / "run" / "progress.csv").set_index("layer")
    assert len(progress) == 3 and (progress["duration_s"] > 0).all()
    for layer, duration in before.items():  # the seconds it first took, not 0.0
        assert progress.loc[layer, "duration_s"] == pytest.approx(duration, rel=1e-6), layer
    log = (outputs / "run" / "logs" / "rank0.log").read_text()
    assert log.count("read back from MTEB's cache") == len(before), log[-3000:]
    record = json.loads((outputs / "run" / "shards" / "rank00000.jsonl").read_text().splitlines()[0])
    stored = {s["layer"]: s["duration_s"] for s in record["scores"]}
    assert {layer: stored[layer] for layer in before} == pytest.approx(before)


@pytest.mark.requires("mteb")
def test_no_spill_folder_is_left_behind(resumed):
    root = resumed[0]
    for name in ("edited", "kept"):
        for exp in ("run", "fresh"):
            run_dir = root / name / "outputs" / exp
            records = [json.loads(line) for line in (run_dir / "shards" / "rank00000.jsonl").read_text().splitlines()]
            assert sum(r["spilled_chunks"] for r in records) > 0  # the embeddings did go to spill/
            assert not (run_dir / "spill").exists(), run_dir


@pytest.mark.requires("mteb")
def test_a_local_reranking_task_is_told_the_supported_types(tmp_path):
    from lensbench.errors import LensbenchError
    from lensbench.layer_sweep.local_tasks import local_task

    folder = write_topics(tmp_path / "rerank", seed=0)
    (folder / "task.json").write_text(json.dumps({"type": "Reranking", "description": "candidates"}))
    with pytest.raises(LensbenchError) as err:
        local_task(folder)
    assert err.value.field == "data.init_args.tasks"
    assert err.value.message == (f"{folder / 'task.json'}: type 'Reranking' is not a local task type; use one of "
                                 "Classification, Clustering, PairClassification, STS, Retrieval (Reranking is scored "
                                 "only for MTEB's own tasks, named in data.init_args.tasks by their MTEB name, such "
                                 "as SciDocsRR)")
    assert "did you mean" not in err.value.message


def test_a_cached_result_is_kept_only_while_its_record_vouches_for_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lensbench.layer_sweep.result_cache import ResultRecord, embedding_settings
    from lensbench.logs import console

    said: list[str] = []
    monkeypatch.setattr(console, "warning", said.append)
    folder = tmp_path / "mteb" / "results" / "m" / "main" / "experiments"
    paths = {}
    for layer in (0, 1, 2):
        paths[layer] = folder / f"layer_{layer}__pooling_mean" / "t.json"
        paths[layer].parent.mkdir(parents=True)
        paths[layer].write_text(json.dumps({"dataset_revision": "r1", "layer": layer}))
    sweep = SimpleNamespace(pooling="mean", max_length=None, _context=lambda loaded: 64)  # no layer_norm yet
    loaded = SimpleNamespace(tokenizer=SimpleNamespace(padding_side="left"), model=None)
    settings = {"state": "m", "task_digest": "r1", **embedding_settings(sweep, loaded, SimpleNamespace(dtype="bf16"))}
    assert settings == {"state": "m", "task_digest": "r1", "pooling": "mean", "layer_norm": None, "max_length": None,
                        "context": 64, "dtype": "bf16", "padding_side": "left"}

    first = ResultRecord(tmp_path, "item", settings)  # files of a lensbench that kept no record: removed
    assert first.drop_stale(paths, "r1", "m / t") == {}
    assert not any(p.exists() for p in paths.values()) and "kept no record" in said.pop()
    for layer, path in paths.items():
        path.write_text(json.dumps({"dataset_revision": "r1", "layer": layer}))
        first.record(layer, path, 1.5 + layer)
    assert ResultRecord(tmp_path, "item", settings).drop_stale(paths, "r1", "m / t") == {0: 1.5, 1: 2.5, 2: 3.5}
    assert said == []

    paths[1].write_text(json.dumps({"dataset_revision": "r1", "layer": 1, "edited": True}))  # changed since
    assert ResultRecord(tmp_path, "item", settings).drop_stale(paths, "r1", "m / t") == {0: 1.5, 2: 3.5}
    assert said.pop() == ("layer_sweep: m / t: removed the cached MTEB results of layer 1 (written by a run stopped "
                          "before it recorded them, or changed since); recomputing")
    other = {**settings, "layer_norm": "final"}
    assert ResultRecord(tmp_path, "item", other).drop_stale(paths, "r1", "m / t") == {}
    assert said.pop() == ("layer_sweep: m / t: removed the cached MTEB results of layers 0, 2 (computed with another "
                          "layer_norm: None, now 'final'); recomputing")
    assert ResultRecord(tmp_path, "item", other).layers == {}  # the record no longer vouches for them
