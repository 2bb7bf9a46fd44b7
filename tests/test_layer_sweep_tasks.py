"""layer_sweep's MTEB tasks: shipped local tasks, local folders of every type, malformed folders,
task names and sets, offline hub tasks, text counts, and the mteb behaviours the encoder relies on.

Everything runs offline (HF_HUB_OFFLINE=1) and with a result cache under tmp_path."""

from __future__ import annotations

import json
import math
import pickle
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from lensbench.errors import LensbenchError
from lensbench.layer_sweep import tasks as T
from lensbench.registry import Registry

mteb = pytest.importorskip("mteb")

FIELD = "data.init_args.tasks"  # the default: the tasks live in the DataModule's init args
OTHER_FIELD = "custom.tasks"  # a field a caller gives instead


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def registry() -> Registry:
    """The built-in MTEB-task registry, filed from the hook as build_registries files it."""
    reg = Registry("MTEB task", T.TaskEntry, instances=True)
    for entry in T.lensbench_register_mteb_tasks():
        reg.add(entry, "lensbench (built-in)")
    return reg


# -- a tiny encoder -------------------------------------------------------------------------------

def meta(name: str = "lensbench-test/hashed-bow", **extra):
    from mteb.models import ModelMeta

    return ModelMeta(
        loader=None, name=name, revision="1", release_date=None, languages=["eng-Latn"], n_parameters=None,
        memory_usage_mb=None, max_tokens=None, embed_dim=HashedBow.dim, license=None, open_weights=None,
        public_training_code=None, public_training_data=None, framework=["NumPy"], similarity_fn_name="cosine",
        use_instructions=False, training_datasets=None, **extra,
    )


def _encoder_base():
    from mteb.models.abs_encoder import AbsEncoder

    return AbsEncoder


class HashedBow(_encoder_base()):
    """Hashed bag of words (``random=True``: a random vector per text). Records every encode call."""

    dim = 512

    def __init__(self, model_meta=None, random: bool = False) -> None:
        self.mteb_model_meta = model_meta or meta()
        self.random = random
        self.calls: list[dict] = []

    def vector(self, text: str) -> np.ndarray:
        if self.random:
            return np.random.default_rng(zlib.crc32(text.encode())).standard_normal(self.dim)
        v = np.zeros(self.dim)
        for word in re.findall(r"[a-z]+", text.lower()):
            v[zlib.crc32(word.encode()) % self.dim] += 1.0
        return v

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        texts, keys = [], set()
        for batch in inputs:
            keys |= set(batch)
            texts += list(batch["text"])
        self.calls.append({"task": task_metadata.name, "split": hf_split, "prompt_type": prompt_type,
                           "keys": sorted(keys), "n": len(texts)})
        return np.stack([self.vector(t) for t in texts])

    @property
    def n_encoded(self) -> int:
        return sum(c["n"] for c in self.calls)


def run(task, encoder, cache_dir: Path) -> float:
    result = mteb.evaluate(encoder, task, cache=mteb.ResultCache(cache_dir), show_progress_bar=False,
                           overwrite_strategy="always")
    assert not result.exceptions
    return float(result.task_results[0].get_score())


# -- shipped tasks --------------------------------------------------------------------------------

def test_shipped_tasks_are_registered_and_hold_what_they_say(registry):
    assert registry.names() == ["lensbench_sts", "lensbench_topics", "lensbench_topics_clustering"]
    sizes = {}
    for entry in registry:
        folder = Path(entry.obj.path)
        spec = json.loads((folder / "task.json").read_text())
        assert spec["license"] == "apache-2.0" and "Apache-2.0" in spec["source"], entry.name
        assert entry.obj.description
        sizes[entry.name] = {p.name: len(p.read_text().splitlines()) for p in sorted(folder.glob("*.jsonl"))}
    assert sizes == {"lensbench_topics": {"test.jsonl": 80, "train.jsonl": 200},
                     "lensbench_topics_clustering": {"test.jsonl": 80}, "lensbench_sts": {"test.jsonl": 120}}
    topics = [json.loads(line) for line in (Path(registry.get("lensbench_topics").path) / "train.jsonl").open()]
    assert {label: sum(r["label"] == label for r in topics) for label in {r["label"] for r in topics}} == {
        "cooking": 40, "sport": 40, "weather": 40, "computing": 40, "music": 40}
    sts = [json.loads(line)["score"] for line in (Path(registry.get("lensbench_sts").path) / "test.jsonl").open()]
    assert min(sts) == 0 and max(sts) == 5
    assert all(15 <= sum(lo <= s < lo + 1 for s in sts) <= 30 for lo in range(5))  # spread over the scale


def test_topics_scores_above_chance_with_bag_of_words_and_near_chance_at_random(registry, tmp_path):
    [topics] = T.resolve_tasks(["lensbench_topics"], registry=registry)
    assert (topics.name, topics.task_type, topics.local, topics.main_score) == (
        "lensbench_topics", "Classification", True, "accuracy")
    T.ensure_loaded(topics)
    bow, rand = HashedBow(), HashedBow(meta("lensbench-test/random"), random=True)
    bow_score, rand_score = run(topics.task, bow, tmp_path), run(topics.task, rand, tmp_path)
    assert 0.3 <= bow_score <= 0.8, bow_score  # 5 topics: chance is 0.2
    assert rand_score <= 0.3 and rand_score < bow_score - 0.1, (rand_score, bow_score)
    assert T.task_texts(topics) == bow.n_encoded == 276  # 196 training texts drawn over 10 experiments + 80
    assert [(c["split"], c["keys"]) for c in bow.calls] == [("train", ["text"]), ("test", ["text"])]


def test_shipped_clustering_and_sts_run(registry, tmp_path):
    clustering, sts = T.resolve_tasks(["lensbench_topics_clustering", "lensbench_sts"], registry=registry)
    bow = HashedBow()
    v_measure = run(clustering.task, bow, tmp_path)
    assert 0.0 < v_measure < 1.0 and T.task_texts(clustering) == bow.n_encoded == 80
    again = HashedBow(meta("lensbench-test/again"))
    assert run(clustering.task, again, tmp_path) == v_measure  # the bootstrap is reseeded: same samples each run
    bow, rand = HashedBow(), HashedBow(meta("lensbench-test/random"), random=True)
    bow_score, rand_score = run(sts.task, bow, tmp_path), run(sts.task, rand, tmp_path)
    assert 0.3 <= bow_score <= 0.85 and abs(rand_score) < 0.25, (bow_score, rand_score)
    assert T.task_texts(sts) == bow.n_encoded == 240
    assert [c["n"] for c in bow.calls] == [120, 120]  # sentence1 then sentence2


# -- local folders of every type ------------------------------------------------------------------

def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


WORDS = {"food": ["bake bread in the oven", "stir the soup slowly", "chop onions finely", "roast the potatoes"],
         "code": ["compile the program", "fix the bug in the loop", "run the unit tests", "merge the branch"],
         "song": ["sing the chorus loudly", "tune the guitar strings", "play the piano softly", "beat the drum"]}


def folder_of(kind: str, root: Path) -> Path:
    folder = root / f"my_{kind.lower()}"
    folder.mkdir()
    labelled = [{"text": f"{text} {i}", "label": label} for label, texts in WORDS.items()
                for i, text in enumerate(texts)]
    spec: dict = {"type": kind, "description": f"a tiny {kind} task"}
    if kind == "Classification":
        spec["n_experiments"] = 2
        (folder / "train.jsonl").write_text(_lines(labelled))
        (folder / "test.jsonl").write_text(_lines([{"text": t.split()[0] + " again", "label": r["label"]}
                                                   for r in labelled[::2] for t in [r["text"]]]))
    elif kind == "Clustering":
        (folder / "test.jsonl").write_text(_lines(labelled))
    elif kind == "PairClassification":
        pairs = [{"sentence1": a, "sentence2": b, "label": 1} for a, b in
                 [("bake bread", "bread is baked"), ("fix the bug", "the bug is fixed"),
                  ("tune guitar", "guitar tuned")]]
        pairs += [{"sentence1": a, "sentence2": b, "label": 0} for a, b in
                  [("bake bread", "merge branch"), ("fix the bug", "sing loudly")]]
        (folder / "test.jsonl").write_text(_lines(pairs))
    elif kind == "STS":
        spec.update(min_score=0, max_score=1)
        pairs = [("bake bread", "bake bread", 1.0), ("bake bread", "bread baking", 0.7),
                 ("fix bug", "bug in loop", 0.4), ("tune guitar", "merge branch", 0.0)]
        (folder / "test.jsonl").write_text(_lines([{"sentence1": a, "sentence2": b, "score": s} for a, b, s in pairs]))
    else:
        (folder / "corpus.jsonl").write_text(_lines(
            [{"_id": "d0", "title": "food", "text": "bake bread in the oven"},
             {"_id": "d1", "title": "code", "text": "fix the bug in the loop"},
             {"_id": "d2", "text": "tune the guitar strings"},
             {"_id": "extra", "text": "an unrelated note about trains"}]))
        (folder / "queries.jsonl").write_text(_lines([{"_id": "q0", "text": "how long to bake bread"},
                                                      {"_id": "q1", "text": "a bug in my loop"}]))
        (folder / "qrels.jsonl").write_text(_lines([{"query-id": "q0", "corpus-id": "d0", "score": 1},
                                                    {"query-id": "q1", "corpus-id": "d1", "score": 2},
                                                    {"query-id": "q1", "corpus-id": "extra", "score": 0}]))
    (folder / "task.json").write_text(json.dumps(spec))
    return folder


EXPECTED = {  # main score, texts encoded, batch keys of each encode call
    "Classification": ("accuracy", 12 + 6, [["text"], ["text"]]),
    "Clustering": ("v_measure", 12, [["text"]]),
    "PairClassification": ("max_ap", 10, [["text"], ["text"]]),
    "STS": ("cosine_spearman", 8, [["text"], ["text"]]),
    "Retrieval": ("ndcg_at_10", 4 + 2, [["id", "query", "text"], ["body", "id", "text", "title"]]),
}


@pytest.mark.parametrize("kind", T.TASK_TYPES)
def test_a_local_folder_of_each_type_loads_and_evaluates(kind, tmp_path):
    folder = folder_of(kind, tmp_path)
    [resolved] = T.resolve_tasks([str(folder)], registry=Registry("MTEB task"))
    main_score, n_texts, keys = EXPECTED[kind]
    assert (resolved.name, resolved.task_type, resolved.local, resolved.path, resolved.split) == (
        f"my_{kind.lower()}", kind, True, folder.resolve(), "test")
    assert resolved.main_score == main_score and T.is_local(resolved)
    assert isinstance(resolved.task, mteb.AbsTask) and resolved.task.metadata.dataset["revision"] == resolved.digest
    T.ensure_loaded(resolved)
    bow = HashedBow()
    score = run(resolved.task, bow, tmp_path / "cache")
    assert math.isfinite(score) and -1 <= score <= 1
    assert T.task_texts(resolved) == bow.n_encoded == n_texts
    assert [c["keys"] for c in bow.calls] == keys
    if kind == "Retrieval":
        assert [str(c["prompt_type"]) for c in bow.calls] == ["query", "document"]
        assert score > 0.5  # each query shares words with its document
    cached = mteb.ResultCache(tmp_path / "cache").load_task_result(resolved.name, bow.mteb_model_meta)
    assert cached is not None and cached.get_score() == pytest.approx(score, abs=1e-6)  # the cache rounds
    assert pickle.loads(pickle.dumps(resolved.task)).metadata == resolved.task.metadata


def test_a_changed_folder_gets_another_digest(tmp_path):
    folder = folder_of("STS", tmp_path)
    before = T.resolve_tasks([str(folder)], registry=Registry("MTEB task"))[0].digest
    with (folder / "test.jsonl").open("a") as f:
        f.write(json.dumps({"sentence1": "a", "sentence2": "b", "score": 0.5}) + "\n")
    assert T.resolve_tasks([str(folder)], registry=Registry("MTEB task"))[0].digest != before


# -- malformed folders ----------------------------------------------------------------------------

STS_OK = _lines([{"sentence1": "a b", "sentence2": "a c", "score": 3},
                 {"sentence1": "x", "sentence2": "y", "score": 0}])
CLS_TRAIN = _lines([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
CORPUS = _lines([{"_id": "d1", "text": "one"}, {"_id": "d2", "text": "two"}])
QUERIES = _lines([{"_id": "q1", "text": "first"}])
RETRIEVAL = {"task.json": json.dumps({"type": "Retrieval", "description": "r"}), "corpus.jsonl": CORPUS,
             "queries.jsonl": QUERIES}


def sts(test: str | bytes = STS_OK, **spec) -> dict:
    return {"task.json": json.dumps({"type": "STS", "description": "d", **spec}), "test.jsonl": test}


def cls(train: str = CLS_TRAIN, test: str = CLS_TRAIN, **spec) -> dict:
    return {"task.json": json.dumps({"type": "Classification", "description": "d", **spec}),
            "train.jsonl": train, "test.jsonl": test}


MALFORMED = {
    "no task.json": ({"test.jsonl": STS_OK}, ["task.json is missing", '"type" and "description"']),
    "task.json bad JSON": ({"task.json": '{\n  "type": "STS",\n  "description": oops\n}', "test.jsonl": STS_OK},
                           ["task.json:3 is not valid JSON", "fix that line"]),
    "task.json not an object": ({"task.json": "[]", "test.jsonl": STS_OK}, ["task.json holds a list"]),
    "unknown type": ({**sts(), "task.json": json.dumps({"type": "Clasification", "description": "d"})},
                     ["type 'Clasification'", "did you mean 'Classification'"]),
    "unsupported type": ({**sts(), "task.json": json.dumps({"type": "BitextMining", "description": "d"})},
                         ["type 'BitextMining'", "Classification, Clustering, PairClassification, STS, Retrieval"]),
    "no description": ({**sts(), "task.json": json.dumps({"type": "STS"})}, ["task.json has no 'description'"]),
    "unknown key": (sts(eval_splits=["test"]), ["unknown key 'eval_splits'", "did you mean 'eval_split'"]),
    "bad main score": (sts(main_score="spearmann"), ["main_score 'spearmann' is not a STS score",
                                                     "did you mean 'spearman'"]),
    "min above max": (sts(min_score=5, max_score=1), ["min_score 5 must be below max_score 1"]),
    "missing data file": ({"task.json": sts()["task.json"]}, ["test.jsonl is missing", "a STS task folder needs",
                                                              '"score": 4.5']),
    "bad JSON line": (sts(STS_OK + '{"sentence1": "a", "sentence2": "b", "score": 1,}\n'),
                      ["test.jsonl:3 is not valid JSON", "fix that line"]),
    "missing field": (sts(STS_OK + json.dumps({"sentence1": "a", "sentence2": "b"}) + "\n"),
                      ["test.jsonl:3 has no 'score' field", "needs sentence1, sentence2, score"]),
    "wrong type": (cls(train=CLS_TRAIN + json.dumps({"text": 7, "label": "x"}) + "\n"),
                   ["train.jsonl:3: 'text' must be a non-empty string, not a number 7"]),
    "empty text": (cls(test=json.dumps({"text": "  ", "label": "x"}) + "\n"),
                   ["test.jsonl:1: 'text' must be a non-empty string"]),
    "line not an object": (sts("\n" + json.dumps([1, 2]) + "\n"), ["test.jsonl:2 is a list, not a JSON object"]),
    "empty split": (sts("\n\n"), ["test.jsonl holds no examples", "add at least one line"]),
    "score out of range": (sts(STS_OK + json.dumps({"sentence1": "a", "sentence2": "b", "score": 7}) + "\n"),
                           ["test.jsonl:3: 'score' 7 lies outside 0..5"]),
    "score not a number": (sts(json.dumps({"sentence1": "a", "sentence2": "b", "score": "high"}) + "\n"),
                           ["test.jsonl:1: 'score' must be a number, not a string \"high\""]),
    "one score": (sts(_lines([{"sentence1": "a", "sentence2": "b", "score": 2}] * 2)), ["the same score"]),
    "pair label not binary": ({"task.json": json.dumps({"type": "PairClassification", "description": "d"}),
                               "test.jsonl": json.dumps({"sentence1": "a", "sentence2": "b", "label": 2}) + "\n"},
                              ["test.jsonl:1: 'label' must be 0 or 1, not a number 2"]),
    "pair one label": ({"task.json": json.dumps({"type": "PairClassification", "description": "d"}),
                        "test.jsonl": json.dumps({"sentence1": "a", "sentence2": "b", "label": 1}) + "\n"},
                       ["has only label 1"]),
    "label unseen in train": (cls(test=json.dumps({"text": "c", "label": "z"}) + "\n"),
                              ["test.jsonl:1: label \"z\" does not occur in train.jsonl"]),
    "one label": (cls(train=_lines([{"text": "a", "label": "x"}])), ["train.jsonl has only the label \"x\""]),
    "mixed label kinds": (cls(train=CLS_TRAIN + json.dumps({"text": "c", "label": 3}) + "\n"),
                          ["train.jsonl:3: 'label' mixes numbers and strings"]),
    "bool label": (cls(train=CLS_TRAIN + json.dumps({"text": "c", "label": True}) + "\n"),
                   ["train.jsonl:3: 'label' must be an integer or a non-empty string, not a boolean"]),
    "not UTF-8": (sts(b'{"sentence1": "caf\xe9", "sentence2": "b", "score": 1}\n'),
                  ["test.jsonl is not UTF-8", "byte 18"]),
    "qrels unknown corpus id": ({**RETRIEVAL, "qrels.jsonl": _lines([
                                    {"query-id": "q1", "corpus-id": "d1", "score": 1},
                                    {"query-id": "q1", "corpus-id": "d3", "score": 1}])},
                                ["qrels.jsonl:2: corpus-id \"d3\" is not an '_id' in corpus.jsonl", "did you mean"]),
    "qrels unknown query id": ({**RETRIEVAL,
                                "qrels.jsonl": _lines([{"query-id": "q7", "corpus-id": "d1", "score": 1}])},
                               ["qrels.jsonl:1: query-id \"q7\" is not an '_id' in queries.jsonl"]),
    "qrels id not a string": ({**RETRIEVAL, "qrels.jsonl": _lines([{"query-id": "q1", "corpus-id": 1, "score": 1}])},
                              ["qrels.jsonl:1: 'corpus-id' must be a non-empty string, not a number 1"]),
    "duplicate corpus id": ({**RETRIEVAL, "corpus.jsonl": CORPUS + json.dumps({"_id": "d1", "text": "again"}) + "\n",
                             "qrels.jsonl": _lines([{"query-id": "q1", "corpus-id": "d1", "score": 1}])},
                            ["corpus.jsonl:3: '_id' \"d1\" repeats line 1"]),
    "query without qrels": ({**RETRIEVAL, "queries.jsonl": QUERIES + json.dumps({"_id": "q2", "text": "x"}) + "\n",
                             "qrels.jsonl": _lines([{"query-id": "q1", "corpus-id": "d1", "score": 1}])},
                            ["queries.jsonl:2: query \"q2\" has no line in qrels.jsonl"]),
    "missing qrels": (RETRIEVAL, ["qrels.jsonl is missing", "a Retrieval task folder needs qrels.jsonl"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_folder_is_one_line_naming_file_line_and_field(case, tmp_path):
    files, fragments = MALFORMED[case]
    folder = tmp_path / "bad_task"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LensbenchError) as err:
        T.resolve_tasks([str(folder)], OTHER_FIELD, registry=Registry("MTEB task"))
    message = str(err.value)
    assert err.value.field == OTHER_FIELD and message.startswith(f"{OTHER_FIELD}: ")
    assert "\n" not in message
    assert str(folder) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_local_task_checks_before_any_work_and_uses_the_default_field(tmp_path):
    with pytest.raises(LensbenchError) as err:
        T.local_task(tmp_path / "nowhere")
    assert err.value.field == FIELD and "does not exist" in str(err.value)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(LensbenchError, match="is a file; give the task folder"):
        T.resolve_tasks([str(tmp_path / "file.txt")], registry=Registry("MTEB task"))


# -- names, sets, duplicates ----------------------------------------------------------------------

@pytest.mark.parametrize("entry, hint", [
    ("lensbench_topic", "did you mean 'lensbench_topics'"),
    ("Banking77Clasification", "'Banking77Classification'"),
    ("skean2025_tabel1", "'skean2025_table1'"),
    ("qqqqzzzzxx", "registered: lensbench_sts, lensbench_topics, lensbench_topics_clustering; task sets: "
                   "skean2025_table1"),
])
def test_an_unknown_name_lists_close_matches(entry, hint, registry):
    with pytest.raises(LensbenchError) as err:
        T.resolve_tasks(["lensbench_sts", entry], registry=registry)
    message = str(err.value)
    assert err.value.field == FIELD and "\n" not in message
    assert f"unknown task {entry!r}" in message and hint in message, message


def test_a_missing_folder_is_named(registry):
    with pytest.raises(LensbenchError, match=r"no folder .*nope exists; give a task folder holding task.json"):
        T.resolve_tasks(["./nope"], registry=registry)


@pytest.mark.parametrize("entries, fragment", [
    (["lensbench_sts", "lensbench_sts"], "entry 'lensbench_sts' names task 'lensbench_sts' a second time; remove one"),
    (["STS12", "skean2025_table1"], "entry 'skean2025_table1' names task 'STS12' a second time, already given by "
                                    "entry 'STS12'"),
])
def test_a_task_named_twice_is_an_error(entries, fragment, registry):
    with pytest.raises(LensbenchError) as err:
        T.resolve_tasks(entries, registry=registry)
    assert fragment in str(err.value)


def test_skean_set_expands_to_32_known_english_test_tasks(registry):
    names = T.TASK_SETS["skean2025_table1"]
    assert len(names) == len(set(names)) == 32
    for name in names:
        assert mteb.get_task(name).metadata.name == name
    resolved = T.resolve_tasks(["lensbench_topics", "skean2025_table1"], registry=registry)
    assert [t.name for t in resolved] == ["lensbench_topics", *names]
    hub = resolved[1:]
    assert {t.entry for t in hub} == {"skean2025_table1"} and not any(t.local for t in hub)
    counts = {kind: sum(t.task_type == kind for t in hub) for kind in {t.task_type for t in hub}}
    assert counts == {"Classification": 10, "Clustering": 6, "PairClassification": 3, "Reranking": 4, "STS": 9}
    by_name = {t.name: t.task for t in hub}
    assert all(list(task.eval_splits) == ["test"] for task in by_name.values())
    assert by_name["AmazonCounterfactualClassification"].hf_subsets == ["en"]
    assert by_name["STS17"].hf_subsets == ["en-en"]
    for name in ("AmazonReviewsClassification", "MassiveIntentClassification", "MassiveScenarioClassification",
                 "MTOPDomainClassification", "MTOPIntentClassification"):
        assert by_name[name].hf_subsets == ["en"], name
    assert all(not task.data_loaded for task in by_name.values())  # resolving fetches nothing
    assert len({t.digest for t in hub}) == 32


def test_an_mteb_name_resolves_to_its_english_test_split(registry):
    [task] = T.resolve_tasks(["MassiveIntentClassification"], registry=registry)
    assert (task.name, task.task_type, task.local, task.split, task.task.hf_subsets) == (
        "MassiveIntentClassification", "Classification", False, "test", ["en"])


def test_an_mteb_task_of_another_type_is_refused(registry):
    with pytest.raises(LensbenchError,
                       match="MTEB task 'BUCC' is a BitextMining task on text; layer_sweep scores text tasks"):
        T.resolve_tasks(["BUCC"], registry=registry)


def test_offline_hub_task_fails_with_one_line():
    task = mteb.get_task("Banking77Classification")
    with pytest.raises(LensbenchError) as err:
        T.ensure_loaded(task)
    assert str(err.value) == (
        "data.init_args.tasks: MTEB task Banking77Classification needs its dataset mteb/banking77 from the Hugging "
        "Face Hub, which is not reachable; download it where the hub is reachable (it lands in "
        "HF_HOME/HF_DATASETS_CACHE) and copy that cache here, or use a local task folder "
        "(docs/layer_sweep.md#task-formats)")
    with pytest.raises(LensbenchError, match=r"^custom\.tasks: MTEB task SciDocsRR needs its dataset "
                                             r"mteb/SciDocsRR from"):
        T.ensure_loaded(T.resolve_tasks(["SciDocsRR"], registry=Registry("MTEB task"))[0], OTHER_FIELD)


# -- counts on mteb's own mock tasks (other dataset layouts) --------------------------------------

@pytest.mark.parametrize("mock", ["MockClassificationTask", "MockClusteringTask", "LegacyMockClusteringFastTask",
                                  "MockPairClassificationTask", "MockSTSTask", "MockRetrievalTask",
                                  "MockRerankingTask", "MockMultilingualSTSTask"])
def test_task_texts_counts_what_mteb_encodes(mock, tmp_path):
    import importlib

    modules = [importlib.import_module(f"mteb.mocks.mock_tasks.{m}")
               for m in ("classification", "clustering", "pair_classification", "sts", "retrieval", "reranking")]
    task = next(getattr(m, mock) for m in modules if hasattr(m, mock))()
    task.load_data()
    expected = T.task_texts(task)
    bow = HashedBow()
    run(task, bow, tmp_path)
    assert expected == bow.n_encoded > 0


# -- mteb behaviours the layer sweep relies on ----------------------------------------------------

def test_the_result_cache_tells_runs_apart_by_experiment_kwargs_only(registry, tmp_path):
    """A second encoder under the same ModelMeta name and revision is not even called (the cached
    score comes back); another ``experiment_kwargs`` (one per layer) is a separate entry."""
    [sts] = T.resolve_tasks(["lensbench_sts"], registry=registry)
    T.ensure_loaded(sts)
    cache = mteb.ResultCache(tmp_path)

    def evaluate(encoder):
        return mteb.evaluate(encoder, sts.task, cache=cache, show_progress_bar=False).task_results[0].get_score()

    first = evaluate(HashedBow(meta(experiment_kwargs={"layer": 0})))
    same_meta = HashedBow(meta(experiment_kwargs={"layer": 0}), random=True)
    assert evaluate(same_meta) == pytest.approx(first, abs=1e-6) and same_meta.calls == []  # rounded cache copy
    other_layer = HashedBow(meta(experiment_kwargs={"layer": 1}), random=True)
    assert evaluate(other_layer) != first and other_layer.n_encoded == 240
    assert sts.task.data_loaded  # evaluate leaves preloaded data loaded


def test_importing_the_tasks_module_stays_light():
    code = ("import sys, lensbench, lensbench.layer_sweep.tasks, lensbench.layer_sweep.local_tasks; "
            "heavy = [m for m in ('mteb', 'datasets') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_local_task_names_stay_importable_from_the_tasks_module(tmp_path):
    from lensbench.layer_sweep import local_tasks as LT

    for name in ("local_task", "TASK_TYPES", "FIELD", "DOCS", "_rebuild_local"):
        assert getattr(T, name) is getattr(LT, name), name
    task = T.local_task(folder_of("STS", tmp_path))
    assert task.__reduce__()[0] is LT._rebuild_local  # a pickle names the function where it lives
    assert T.is_local(pickle.loads(pickle.dumps(task)))
    # a task pickled before the split names ``tasks._rebuild_local``: it still loads
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LT._rebuild_local, "__module__", T.__name__)
        old = pickle.dumps(task)
    assert b"local_tasks" not in old and b"lensbench.layer_sweep.tasks" in old
    assert T.is_local(pickle.loads(old))
    with pytest.raises(AttributeError, match="no attribute '_nothing'"):
        T._nothing  # noqa: B018
