"""layer_sweep's representation metrics on each task's own texts (``task_metrics``): the texts are
the task's, drawn as ``datasets.Dataset.shuffle(seed)`` draws them and capped at
``task_metric_texts``; the same seed gives the same rows in two runs; turning the option on extends
a run folder, changing the cap or the seed on one is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import clean_env, lensbench
from helpers_cli import last_line, snapshot

from lensbench.plugins import active_registries

pytestmark = pytest.mark.requires("mteb")

FIELDS = ("prompt_entropy", "dataset_entropy", "curvature", "effective_rank", "prompt_entropy_maxEntropy",
          "prompt_entropy_logN", "prompt_entropy_logD", "prompt_entropy_logNlogD", "dataset_entropy_maxEntropy",
          "dataset_entropy_logN", "dataset_entropy_logD", "dataset_entropy_logNlogD", "curvature_logD")


def write_pairs(folder: Path) -> list[str]:
    """A local STS task of 30 pairs (some repeat a sentence); returns the texts MTEB embeds, distinct,
    in the order first met (sentence1, sentence2 of each pair)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"type": "STS", "description": "tiny pairs"}))
    words = "cat dog tree house river garden mat day the a of and".split()
    rows = []
    for i in range(30):
        a = " ".join(words[(i * k) % len(words)] for k in (1, 3, 5, 7))
        b = a if i % 4 == 0 else " ".join(words[(i + k) % len(words)] for k in (2, 4, 6))
        rows.append({"sentence1": a, "sentence2": b, "score": float(i % 6)})
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return list(dict.fromkeys(t for r in rows for t in (r["sentence1"], r["sentence2"])))


def write_topics(folder: Path) -> tuple[list[str], list[str]]:
    """A local classification task; returns (train texts, test texts)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"type": "Classification", "description": "tiny topics"}))
    topics = {"animals": ["cat", "dog"], "places": ["house", "river", "garden"]}
    texts = {}
    for split, n in (("train", 10), ("test", 4)):
        rows = [{"text": f"{t} {words[i % len(words)]} the {i} {split}", "label": t}
                for t, words in topics.items() for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        texts[split] = [r["text"] for r in rows]
    return texts["train"], texts["test"]


def independent_draw(texts: list[str], n: int, seed: int) -> list[str]:
    """What ``Dataset.shuffle(seed)`` then the first ``n`` rows pick (information_flow's draw)."""
    from datasets import Dataset

    return Dataset.from_dict({"text": texts}).shuffle(seed=seed)["text"][:n]


def test_task_texts_are_what_the_task_hands_the_encoder(tmp_path):
    from lensbench.layer_sweep.data import TaskTexts, sample_texts
    from lensbench.layer_sweep.tasks import encoder_texts, resolve_tasks, task_texts

    pairs = write_pairs(tmp_path / "pairs")
    train, test = write_topics(tmp_path / "topics")
    sts, topics = resolve_tasks([str(tmp_path / "pairs"), str(tmp_path / "topics")],
                                registry=active_registries().mteb_tasks)
    assert encoder_texts(sts) == pairs and len(pairs) < task_texts(sts) == 60  # distinct; MTEB embeds 60
    pool = encoder_texts(topics)
    assert set(test) <= set(pool) <= set(train) | set(test) and pool[-len(test):] == test
    for n, seed in ((10, 3), (5, 0), (1000, 7)):
        drawn = TaskTexts(sts.name, sts, n, seed).texts()
        assert drawn == independent_draw(pairs, n, seed) == sample_texts(pairs, n, seed)
        assert len(drawn) == min(n, len(pairs)) and len(set(drawn)) == len(drawn)
    assert sorted(TaskTexts(sts.name, sts, None, 0).texts()) == sorted(pairs)
    assert TaskTexts(sts.name, sts, 10, 3).texts() != TaskTexts(sts.name, sts, 10, 4).texts()


def test_retrieval_texts_join_title_and_keep_queries_with_relevant_documents(tmp_path):
    from lensbench.layer_sweep.tasks import encoder_texts, resolve_tasks

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "task.json").write_text(json.dumps({"type": "Retrieval", "description": "tiny retrieval"}))
    corpus = [{"_id": "d1", "title": "Cats", "text": "cats purr"}, {"_id": "d2", "text": "dogs bark"}]
    queries = [{"_id": "q1", "text": "what purrs"}, {"_id": "q2", "text": "what barks"}]
    qrels = [{"query-id": "q1", "corpus-id": "d1", "score": 1}, {"query-id": "q2", "corpus-id": "d2", "score": 1}]
    for name, rows in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task,) = resolve_tasks([str(folder)], registry=active_registries().mteb_tasks)
    assert encoder_texts(task) == ["Cats cats purr", "dogs bark", "what purrs", "what barks"]


def test_options_are_checked():
    from lensbench.errors import LensbenchError
    from lensbench.layer_sweep.data import LayerSweepData

    for kwargs, field in (({"task_metric_texts": 0}, "task_metric_texts"), ({"metric_seed": -1}, "metric_seed"),
                          ({"metric_seed": 1.5}, "metric_seed"), ({"task_metrics": "yes"}, "task_metrics")):
        with pytest.raises(LensbenchError) as info:
            LayerSweepData(tasks=["lensbench_sts"], **kwargs)
        assert info.value.field == f"data.init_args.{field}"
    units = LayerSweepData(tasks=["lensbench_sts"], task_metrics=True).units()
    assert [u.key for u in units] == [("task", "lensbench_sts"), ("metrics", "task", "lensbench_sts")]
    digests = {LayerSweepData(tasks=["lensbench_sts"], task_metrics=True, **kw).units()[1].digest
               for kw in ({}, {"task_metric_texts": 5}, {"metric_seed": 1})}
    assert len(digests) == 3  # the cap and the seed are part of what a task-metrics item holds


RUN_YAML = """model:
  class_path: layer_sweep
  init_args:
    models: [tiny]
    batch_size: 4
    experiment: {experiment}
data:
  class_path: lensbench.layer_sweep.data.LayerSweepData
  init_args:
    tasks: [pairs]
    metrics_datasets: [drawn.txt]
    max_metric_texts: null
    task_metrics: {on}
    task_metric_texts: 10
    metric_seed: 3
trainer:
  accelerator: cpu
  devices: 1
"""


def _rows(run_dir: Path, source: str) -> pd.DataFrame:
    table = pd.read_csv(run_dir / "representation_metrics.csv", keep_default_na=False, na_values=[""])
    return table[table["source"] == source].sort_values("layer").reset_index(drop=True)


def test_task_metrics_run_extend_resume_and_refuse_changes(tmp_path, tiny_model):
    folder = tmp_path
    (folder / "tiny").symlink_to(tiny_model)
    pairs = write_pairs(folder / "pairs")
    drawn = independent_draw(pairs, 10, 3)
    (folder / "drawn.txt").write_text("".join(t + "\n" for t in drawn))  # the same texts as a metrics dataset
    env = clean_env(HF_HUB_OFFLINE="1")
    for name, experiment, on in (("off.yaml", "extended", "false"), ("on.yaml", "extended", "true"),
                                 ("fresh.yaml", "fresh", "true")):
        (folder / name).write_text(RUN_YAML.format(experiment=experiment, on=on))

    first = lensbench("predict", "--config", "off.yaml", cwd=folder, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = folder / "outputs" / "extended"
    assert set(pd.read_csv(run_dir / "representation_metrics.csv")["source"]) == {"dataset"}
    extended = lensbench("predict", "--config", "on.yaml", cwd=folder, env=env)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "3 work items, 2 already stored" in extended.stdout + extended.stderr

    task, dataset = _rows(run_dir, "task"), _rows(run_dir, "dataset")
    assert list(task["dataset"].unique()) == ["pairs"] and list(dataset["dataset"].unique()) == ["drawn"]
    assert (task["n_texts"] == 10).all() and (task["n_prompts"] == 10).all() and (task["sample_seed"] == 3).all()
    assert dataset["sample_seed"].isna().all() and (dataset["n_texts"] == 10).all()
    # the task's rows are those of its independently drawn texts, measured as a metrics dataset
    for field in FIELDS:
        assert task[field].tolist() == pytest.approx(dataset[field].tolist(), rel=1e-9, abs=1e-12), field
    assert (task["prompt_entropy_maxEntropy"] <= 1).all() and (task["prompt_entropy_maxEntropy"] > 0).all()

    fresh = lensbench("predict", "--config", "fresh.yaml", cwd=folder, env=env)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    again = _rows(folder / "outputs" / "fresh", "task")
    pd.testing.assert_frame_equal(again.drop(columns=["duration_s"], errors="ignore"),
                                  task.drop(columns=["duration_s"], errors="ignore"))

    before = snapshot(run_dir)
    for option, value in (("metric_seed", "4"), ("task_metric_texts", "11")):
        refused = lensbench("predict", "--config", "on.yaml", f"--data.init_args.{option}", value, cwd=folder, env=env)
        line = last_line(refused.stderr)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert line.startswith("lensbench: error: model.init_args.experiment: ") and \
            f"changed: data.init_args.{option}" in line, line
        assert snapshot(run_dir) == before
