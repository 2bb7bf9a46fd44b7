"""Local MTEB task folders for the layer sweep: reading, checking, and building mteb tasks from them.

A task folder holds ``task.json`` and JSONL files (docs/layer_sweep.md#task-formats). ``local_task``
reads and checks the whole folder at once, so a malformed file is a one-line ``LensbenchError``
naming the file, line and field before any model is loaded, and returns an instance of a subclass of
the type's mteb ``AbsTask*`` whose ``load_data`` builds MTEB's dataset from the checked rows (it
fetches nothing). Such a task pickles as its folder and name (``_rebuild_local`` reads it again).
Such a task is marked ``_lensbench_local`` (``tasks.is_local`` tells it from MTEB's own); in MTEB's
result files each score of such a task
carries ``local_mark`` (``"lensbench_local_task": true``, its folder and content digest).

``lensbench.layer_sweep.tasks`` resolves config entries (registered tasks, folders, task sets,
MTEB task names) and re-exports the public names here; this module imports nothing from it. Nothing here imports ``mteb`` or
``datasets`` at module import time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..data.textio import read_text, split_lines
from ..errors import LensbenchError, did_you_mean

FIELD = "data.init_args.tasks"
DOCS = "docs/layer_sweep.md#task-formats"

#: The key marking each score of a local task in MTEB's result files (``local_mark``).
LOCAL_MARK = "lensbench_local_task"

#: Task types a local folder may declare in task.json.
TASK_TYPES = ("Classification", "Clustering", "PairClassification", "STS", "Retrieval")
#: Task types the layer sweep scores for MTEB's own tasks, which a local folder cannot declare.
MTEB_ONLY_TYPES = ("Reranking",)

_DEFAULT_MAIN_SCORE = {"Classification": "accuracy", "Clustering": "v_measure", "PairClassification": "max_ap",
                       "STS": "cosine_spearman", "Retrieval": "ndcg_at_10"}
_K_VALUES = (1, 3, 5, 10, 20, 100, 1000)


def _main_scores(task_type: str) -> list[str]:
    """The scores MTEB reports for a local task of ``task_type`` (what ``main_score`` may name)."""
    if task_type == "Classification":
        return ["accuracy", "f1", "f1_weighted", "precision", "precision_weighted", "recall", "recall_weighted",
                "ap", "ap_weighted"]
    if task_type == "Clustering":
        return ["v_measure", "ami"]
    if task_type == "PairClassification":
        metrics = ("accuracy", "f1", "precision", "recall", "ap")
        return ([f"max_{m}" for m in metrics] + [f"{s}_{m}" for s in ("similarity", "cosine", "manhattan",
                                                                       "euclidean", "dot") for m in metrics])
    if task_type == "STS":
        return [f"{s}{c}" for s in ("", "cosine_", "manhattan_", "euclidean_") for c in ("pearson", "spearman")]
    return [f"{m}_at_{k}" for m in ("ndcg", "map", "recall", "precision", "mrr") for k in _K_VALUES]


# -- reading a task folder ------------------------------------------------------------------------

def _fail(message: str, field: str) -> LensbenchError:
    return LensbenchError(message, field)


def _read_text(path: Path, field: str, what: str) -> str:
    """The text of ``path`` as every user file is read (``lensbench.data.textio``: no byte-order
    mark); missing, a folder or unreadable is one line saying ``what`` is needed."""
    return read_text(path, field, f"{what} ({DOCS})")


def _loads(text: str, path: Path, field: str, lineno: int | None = None) -> Any:
    """``json.loads(text)``; invalid JSON is one line naming ``path`` and the line (``lineno``, that of
    ``text`` in a JSONL file, else the parser's)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(f"{path}:{lineno or exc.lineno} is not valid JSON ({exc.msg} at column {exc.colno}); "
                    "fix that line", field) from None


def _no_duplicate_keys(text: str, path: Path, field: str) -> None:
    """Refuse a JSON object of ``text`` naming one key twice (``json.loads`` keeps the last silently)."""
    def check(pairs: list[tuple[str, Any]]) -> dict:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _fail(f"{path}: key {key!r} is given twice; keep one", field)
            seen.add(key)
        return dict(pairs)

    json.loads(text, object_pairs_hook=check)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind_of(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


# Field checks: name -> (test, what it must be). ``label`` is an integer or a string.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "text": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "title": (lambda v: isinstance(v, str), "a string"),
    "label": (lambda v: _is_int(v) or (isinstance(v, str) and bool(v.strip())), "an integer or a non-empty string"),
    "binary": (lambda v: _is_int(v) and v in (0, 1), "0 or 1"),
    "score": (_is_number, "a number"),
    "id": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "relevance": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
}


@dataclass(frozen=True)
class _Field:
    name: str
    check: str
    required: bool = True


def _files(task_type: str, split: str) -> dict[str, tuple[_Field, ...]]:
    """The JSONL files of a ``task_type`` folder and the fields of each line."""
    text, label = _Field("text", "text"), _Field("label", "label")
    pair = (_Field("sentence1", "text"), _Field("sentence2", "text"))
    if task_type == "Classification":
        return {"train.jsonl": (text, label), f"{split}.jsonl": (text, label)}
    if task_type == "Clustering":
        return {f"{split}.jsonl": (text, label)}
    if task_type == "PairClassification":
        return {f"{split}.jsonl": (*pair, _Field("label", "binary"))}
    if task_type == "STS":
        return {f"{split}.jsonl": (*pair, _Field("score", "score"))}
    return {"corpus.jsonl": (_Field("_id", "id"), text, _Field("title", "title", required=False)),
            "queries.jsonl": (_Field("_id", "id"), text),
            "qrels.jsonl": (_Field("query-id", "id"), _Field("corpus-id", "id"), _Field("score", "relevance"))}


_EXAMPLES = {
    ("Classification", "text"): '{"text": "Whisk the eggs.", "label": "cooking"}',
    ("Clustering", "text"): '{"text": "Whisk the eggs.", "label": "cooking"}',
    ("PairClassification", "sentence1"): '{"sentence1": "A cat sleeps.", "sentence2": "A cat naps.", "label": 1}',
    ("STS", "sentence1"): '{"sentence1": "A cat sleeps.", "sentence2": "A cat naps.", "score": 4.5}',
    ("Retrieval", "corpus.jsonl"): '{"_id": "d1", "title": "Bread", "text": "Knead the dough."}',
    ("Retrieval", "queries.jsonl"): '{"_id": "q1", "text": "how to knead dough"}',
    ("Retrieval", "qrels.jsonl"): '{"query-id": "q1", "corpus-id": "d1", "score": 1}',
}


def _example(task_type: str, fname: str, fields: tuple[_Field, ...]) -> str:
    return _EXAMPLES.get((task_type, fname)) or _EXAMPLES[(task_type, fields[0].name)]


def _read_jsonl(path: Path, task_type: str, fields: tuple[_Field, ...], field: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of ``path``, each checked against ``fields``."""
    names = ", ".join(f.name for f in fields if f.required)
    example = _example(task_type, path.name, fields)
    raw = _read_text(path, field, f"a {task_type} task folder needs {path.name} with lines like {example}")
    rows: list[tuple[int, dict]] = []
    for lineno, line in enumerate(split_lines(raw), 1):
        if not line.strip():
            continue
        obj = _loads(line, path, field, lineno)
        if not isinstance(obj, dict):
            raise _fail(f"{path}:{lineno} is {_kind_of(obj)}, not a JSON object; write one object per line, "
                        f"e.g. {example}", field)
        for spec in fields:
            if spec.name not in obj:
                if spec.required:
                    raise _fail(f"{path}:{lineno} has no {spec.name!r} field; each line of a {task_type} "
                                f"{path.name} needs {names} ({DOCS})", field)
                continue
            test, what = _CHECKS[spec.check]
            value = obj[spec.name]
            if not test(value):
                raise _fail(f"{path}:{lineno}: {spec.name!r} must be {what}, not {_kind_of(value)} {_show(value)}; "
                            f"fix that line", field)
        rows.append((lineno, obj))
    if not rows:
        raise _fail(f"{path} holds no examples; add at least one line like {example}", field)
    return rows


_TASK_JSON_KEYS = ("type", "description", "main_score", "eval_split", "license", "source", "languages",
                   "min_score", "max_score", "samples_per_label", "n_experiments")


def _read_task_json(folder: Path, field: str) -> dict[str, Any]:
    path = folder / "task.json"
    need = 'task.json with "type" and "description"'
    raw = _read_text(path, field, f"a task folder needs {need}")
    spec = _loads(raw, path, field)
    _no_duplicate_keys(raw, path, field)
    if not isinstance(spec, dict):
        raise _fail(f"{path} holds {_kind_of(spec)}, not a JSON object; write {{\"type\": ..., "
                    f"\"description\": ...}} ({DOCS})", field)
    for key in spec:
        if key not in _TASK_JSON_KEYS:
            raise _fail(f"{path}: unknown key {key!r}; {did_you_mean(key, list(_TASK_JSON_KEYS))}", field)
    for key in ("type", "description"):
        if key not in spec:
            raise _fail(f"{path} has no {key!r}; a task folder needs {need} ({DOCS})", field)
    for key in ("type", "description", "main_score", "eval_split", "license", "source"):
        if key in spec and not (isinstance(spec[key], str) and spec[key].strip()):
            raise _fail(f"{path}: {key!r} must be a non-empty string, not {_kind_of(spec[key])} "
                        f"{_show(spec[key])}", field)
    task_type = spec["type"]
    if task_type not in TASK_TYPES:
        # Every supported type, not a close name: "Reranking" is not a misspelt "Clustering".
        import difflib

        close = difflib.get_close_matches(str(task_type), list(TASK_TYPES), n=1, cutoff=0.8)  # a misspelling
        note = (f" ({task_type} is scored only for MTEB's own tasks, named in data.init_args.tasks by their "
                "MTEB name, such as SciDocsRR)" if task_type in MTEB_ONLY_TYPES else
                f" (did you mean {close[0]!r}?)" if close else "")
        raise _fail(f"{path}: type {task_type!r} is not a local task type; use one of {', '.join(TASK_TYPES)}"
                    f"{note}", field)
    for key in ("min_score", "max_score"):
        if key in spec and (task_type != "STS" or not _is_number(spec[key])):
            what = "a number" if task_type == "STS" else "only for STS tasks"
            raise _fail(f"{path}: {key!r} is {what}; got {_show(spec[key])}", field)
    for key in ("samples_per_label", "n_experiments"):
        if key in spec and (task_type != "Classification" or not _is_int(spec[key]) or spec[key] < 1):
            what = "a positive integer" if task_type == "Classification" else "only for Classification tasks"
            raise _fail(f"{path}: {key!r} is {what}; got {_show(spec[key])}", field)
    spec.setdefault("min_score", 0)
    spec.setdefault("max_score", 5)
    if spec["min_score"] >= spec["max_score"]:
        raise _fail(f"{path}: min_score {spec['min_score']} must be below max_score {spec['max_score']}", field)
    spec.setdefault("eval_split", "test")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", spec["eval_split"]) or spec["eval_split"] == "train":
        raise _fail(f"{path}: eval_split {spec['eval_split']!r} must be a plain split name other than 'train' "
                    "(its file is <eval_split>.jsonl)", field)
    scores = _main_scores(task_type)
    spec.setdefault("main_score", _DEFAULT_MAIN_SCORE[task_type])
    if spec["main_score"] not in scores:
        raise _fail(f"{path}: main_score {spec['main_score']!r} is not a {task_type} score; "
                    f"{did_you_mean(spec['main_score'], scores)}", field)
    languages = spec.setdefault("languages", ["eng-Latn"])
    if (not isinstance(languages, list) or not languages
            or not all(isinstance(x, str) and re.fullmatch(r"[a-z]{3}-[A-Z][a-z]{3}", x) for x in languages)):
        raise _fail(f"{path}: 'languages' must be a list of language-script codes such as [\"eng-Latn\"], "
                    f"not {_show(languages)}", field)
    return spec


def _labels(rows: list[tuple[int, dict]], path: Path, field: str) -> list[Any]:
    labels = [obj["label"] for _, obj in rows]
    kinds = {type(x) for x in labels}
    if len(kinds) > 1:
        first = next(n for n, obj in rows if type(obj["label"]) is not type(labels[0]))
        raise _fail(f"{path}:{first}: 'label' mixes numbers and strings across the file; give every label "
                    "the same kind", field)
    return labels


@dataclass
class _LocalData:
    """A checked task folder: what ``load_data`` turns into MTEB's dataset."""

    spec: dict[str, Any]
    splits: dict[str, dict[str, list]]  # split -> column -> values (non-retrieval)
    corpus: dict[str, list] | None = None
    queries: dict[str, list] | None = None
    qrels: dict[str, dict[str, int]] | None = None
    label_names: list[Any] | None = None


def _check_folder(folder: Path, field: str) -> tuple[dict[str, Any], _LocalData, str]:
    """Read and check a task folder; (task.json, data, digest of its files)."""
    if not folder.exists():
        raise _fail(f"{folder} does not exist; give a task folder holding task.json ({DOCS})", field)
    if not folder.is_dir():
        raise _fail(f"{folder} is not a folder; give a task folder holding task.json ({DOCS})", field)
    spec = _read_task_json(folder, field)
    task_type, split = spec["type"], spec["eval_split"]
    files = _files(task_type, split)
    read = {name: _read_jsonl(folder / name, task_type, fields, field) for name, fields in files.items()}
    hasher = hashlib.sha256()
    for name in ["task.json", *sorted(files)]:
        hasher.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    digest = hasher.hexdigest()[:16]

    if task_type == "Retrieval":
        data = _check_retrieval(folder, read, split, field)
    elif task_type in ("Classification", "Clustering"):
        data = _check_labelled(folder, task_type, read, split, field)
    elif task_type == "PairClassification":
        rows = read[f"{split}.jsonl"]
        labels = {obj["label"] for _, obj in rows}
        if labels != {0, 1}:
            raise _fail(f"{folder / f'{split}.jsonl'} has only label {labels.pop()}; a pair-classification task "
                        "needs pairs labelled 1 (similar) and pairs labelled 0 (not)", field)
        data = _LocalData(spec, {split: {"sentence1": [o["sentence1"] for _, o in rows],
                                         "sentence2": [o["sentence2"] for _, o in rows],
                                         "labels": [o["label"] for _, o in rows]}})
    else:  # STS
        path = folder / f"{split}.jsonl"
        rows = read[f"{split}.jsonl"]
        low, high = spec["min_score"], spec["max_score"]
        for lineno, obj in rows:
            if not low <= obj["score"] <= high:
                raise _fail(f"{path}:{lineno}: 'score' {obj['score']} lies outside {low}..{high}; fix it or set "
                            "min_score/max_score in task.json", field)
        if len({obj["score"] for _, obj in rows}) < 2:
            raise _fail(f"{path}: every pair has the same score; an STS task needs pairs of different "
                        "similarity (a correlation needs at least two values)", field)
        data = _LocalData(spec, {split: {"sentence1": [o["sentence1"] for _, o in rows],
                                         "sentence2": [o["sentence2"] for _, o in rows],
                                         "score": [float(o["score"]) for _, o in rows]}})
    data.spec = spec
    return spec, data, digest


def _check_labelled(folder: Path, task_type: str, read: dict, split: str, field: str) -> _LocalData:
    columns = {}
    names: list[Any] = []
    splits = ["train", split] if task_type == "Classification" else [split]
    labels = {s: _labels(read[f"{s}.jsonl"], folder / f"{s}.jsonl", field) for s in splits}
    if task_type == "Classification" and type(labels["train"][0]) is not type(labels[split][0]):
        raise _fail(f"{folder / f'{split}.jsonl'}: labels are {_kind_of(labels[split][0])}s but those of "
                    f"train.jsonl are {_kind_of(labels['train'][0])}s; give both files the same labels", field)
    first = splits[0]
    names = sorted(set(labels[first]), key=lambda x: (str(type(x)), x))
    if len(names) < 2:
        raise _fail(f"{folder / f'{first}.jsonl'} has only the label {_show(names[0])}; a {task_type} task "
                    "needs at least two labels", field)
    index = {name: i for i, name in enumerate(names)}
    for s in splits:
        rows = read[f"{s}.jsonl"]
        for (lineno, obj), label in zip(rows, labels[s]):
            if label not in index:
                raise _fail(f"{folder / f'{s}.jsonl'}:{lineno}: label {_show(label)} does not occur in "
                            f"train.jsonl; the classifier is trained on train.jsonl only, so add examples of it "
                            "there or fix the label", field)
        text_col, label_col = ("text", "label") if task_type == "Classification" else ("sentences", "labels")
        columns[s] = {text_col: [obj["text"] for _, obj in rows], label_col: [index[x] for x in labels[s]]}
    return _LocalData({}, columns, label_names=names)


def _check_retrieval(folder: Path, read: dict, split: str, field: str) -> _LocalData:
    def unique(name: str) -> dict[str, dict]:
        seen: dict[str, int] = {}
        for lineno, obj in read[name]:
            if obj["_id"] in seen:
                raise _fail(f"{folder / name}:{lineno}: '_id' {_show(obj['_id'])} repeats line {seen[obj['_id']]}; "
                            "give every line its own id", field)
            seen[obj["_id"]] = lineno
        return {obj["_id"]: obj for _, obj in read[name]}

    corpus, queries = unique("corpus.jsonl"), unique("queries.jsonl")
    qrels: dict[str, dict[str, int]] = {}
    for lineno, obj in read["qrels.jsonl"]:
        for key, known, where in (("query-id", queries, "queries.jsonl"), ("corpus-id", corpus, "corpus.jsonl")):
            if obj[key] not in known:
                hint = did_you_mean(obj[key], list(known))
                hint = f" ({hint})" if hint.startswith("did") else ""
                raise _fail(f"{folder / 'qrels.jsonl'}:{lineno}: {key} {_show(obj[key])} is not an '_id' in "
                            f"{where}{hint}; fix the id or add that line to {where}", field)
        qrels.setdefault(obj["query-id"], {})[obj["corpus-id"]] = obj["score"]
    for lineno, obj in read["queries.jsonl"]:
        if obj["_id"] not in qrels:
            raise _fail(f"{folder / 'queries.jsonl'}:{lineno}: query {_show(obj['_id'])} has no line in qrels.jsonl; "
                        "add its relevant documents there or remove the query", field)
    if not any(score > 0 for docs in qrels.values() for score in docs.values()):
        raise _fail(f"{folder / 'qrels.jsonl'}: every score is 0; mark the relevant documents of each query with "
                    "a score above 0", field)
    return _LocalData(
        {}, {},
        corpus={"id": list(corpus), "text": [o["text"] for o in corpus.values()],
                "title": [o.get("title", "") for o in corpus.values()]},
        queries={"id": list(queries), "text": [o["text"] for o in queries.values()]},
        qrels=qrels,
    )


# -- local tasks as mteb tasks --------------------------------------------------------------------

def _license(value: str | None) -> str | None:
    """``value`` when MTEB's TaskMetadata accepts it as a license, else None (the text stays in task.json)."""
    from typing import get_args

    from mteb.abstasks import task_metadata

    if value and value.lower() in get_args(task_metadata.Licenses):
        return value.lower()
    return None


def _base_class(task_type: str) -> type:
    if task_type == "Classification":
        from mteb.abstasks.classification import AbsTaskClassification as base
    elif task_type == "Clustering":
        from mteb.abstasks.clustering import AbsTaskClustering as base
    elif task_type == "PairClassification":
        from mteb.abstasks.pair_classification import AbsTaskPairClassification as base
    elif task_type == "STS":
        from mteb.abstasks.sts import AbsTaskSTS as base
    else:
        from mteb.abstasks.retrieval import AbsTaskRetrieval as base
    return base


def _load_local(self, num_proc: int | None = None, **kwargs: Any) -> None:
    """``load_data`` of a local task: builds MTEB's dataset from the checked folder (no fetching)."""
    if self.data_loaded:
        return
    from datasets import Dataset, DatasetDict

    data: _LocalData = self._lensbench_data
    if data.corpus is not None:
        split = self.metadata.eval_splits[0]
        self.dataset = {"default": {split: {
            "corpus": Dataset.from_dict(data.corpus),
            "queries": Dataset.from_dict(data.queries),
            "relevant_docs": {q: dict(docs) for q, docs in data.qrels.items()},
            "top_ranked": None,
        }}}
    else:
        self.dataset = DatasetDict({s: Dataset.from_dict(cols) for s, cols in data.splits.items()})
        if self.metadata.type == "Clustering":
            # Embed every text and cluster bootstrap samples of the whole set (MTEB's default embeds 4%).
            self.max_fraction_of_documents_to_embed = None
            self.max_document_to_embed = None
            self.max_documents_per_cluster = len(self.dataset[self.metadata.eval_splits[0]])
    self.data_loaded = True


def _evaluate_subset_reseeded(self, *args: Any, **kwargs: Any):
    """Clustering draws its bootstrap samples from the task's random state; reseed it so that every
    evaluation of the task (every layer) clusters the same samples."""
    import random

    self.rng_state = random.Random(self.seed)
    return type(self).__mro__[1]._evaluate_subset(self, *args, **kwargs)


def local_mark(task: Any) -> dict[str, Any]:
    """What every score of the local task ``task`` carries in MTEB's result files (beside
    ``main_score``), so that nothing reading them takes it for an MTEB task: ``LOCAL_MARK`` (true),
    the task folder and the digest of its files."""
    return {LOCAL_MARK: True, "lensbench_task_folder": str(task._lensbench_path),
            "lensbench_task_digest": task._lensbench_digest}


def _evaluate_marked(self, *args: Any, **kwargs: Any):
    """``evaluate`` of a local task: the base class's, each subset's scores marked (``local_mark``);
    MTEB writes them into its result file as they are."""
    scores = type(self).__mro__[1].evaluate(self, *args, **kwargs)
    for subset_scores in scores.values():
        subset_scores.update(local_mark(self))
    return scores


def _reduce_local(self):
    return (_rebuild_local, (str(self._lensbench_path), self.metadata.name))


def _rebuild_local(path: str, name: str):
    return local_task(path, name)


def local_task(path: str | Path, name: str | None = None, field: str = FIELD) -> Any:
    """The mteb task (an instance of a subclass of the type's ``AbsTask*``) of the task folder ``path``,
    named ``name`` (default: the folder's name). The folder is read and checked now; a problem is a
    one-line ``LensbenchError`` naming the file, line and field. Its ``load_data`` fetches nothing."""
    folder = Path(path).expanduser()
    spec, data, digest = _check_folder(folder, field)
    name = name or folder.resolve().name
    from mteb.abstasks.task_metadata import TaskMetadata

    try:
        metadata = TaskMetadata(
            name=name, description=spec["description"], type=spec["type"], category="t2t", modalities=["text"],
            dataset={"path": f"lensbench-local/{name}", "revision": digest}, reference=None,
            eval_splits=[spec["eval_split"]], eval_langs=spec["languages"], main_score=spec["main_score"],
            date=None, domains=None, task_subtypes=None, license=_license(spec.get("license")),
            annotations_creators=None, dialect=[], sample_creation=None, bibtex_citation="",
        )
    except Exception as exc:  # pydantic's ValidationError: an unknown language code and the like
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else (first[0] if first else "")
        raise _fail(f"{folder / 'task.json'}: MTEB refuses its metadata ({detail})", field) from None
    base = _base_class(spec["type"])
    attrs: dict[str, Any] = {
        "metadata": metadata, "load_data": _load_local, "evaluate": _evaluate_marked, "__reduce__": _reduce_local,
        "_lensbench_local": True, "__module__": __name__,
        "__doc__": f"Local {spec['type']} task {name!r} read from {folder}.",
    }
    if spec["type"] == "STS":
        attrs.update(min_score=spec["min_score"], max_score=spec["max_score"])
    if spec["type"] == "Clustering":
        attrs["_evaluate_subset"] = _evaluate_subset_reseeded
    if spec["type"] == "Classification":
        for key in ("samples_per_label", "n_experiments"):
            if key in spec:
                attrs[key] = spec[key]
    cls = type(f"LocalTask_{re.sub(r'[^0-9A-Za-z_]', '_', name)}", (base,), attrs)
    task = cls()
    task._lensbench_data = data
    task._lensbench_path = folder.resolve()
    task._lensbench_digest = digest
    task.label_names = data.label_names
    return task
