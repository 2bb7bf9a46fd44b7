"""MTEB tasks for the layer sweep: registered tasks, task sets, MTEB task names, resolution and loading.

A config names tasks (``data.init_args.tasks`` or wherever the caller says) as strings; each is

- a task registered through ``lensbench_register_mteb_tasks`` (``lensbench plugins`` lists them;
  lensbench ships ``lensbench_topics``, ``lensbench_topics_clustering`` and ``lensbench_sts``),
- a folder holding ``task.json`` and JSONL files (docs/layer_sweep.md#task-formats),
- a task set (``skean2025_table1``), which expands to its tasks, or
- an MTEB task name (``mteb.get_task``); multilingual ones are cut to their English subsets.

A registered task or a folder may not take the name of a task MTEB knows (``mteb_task_names``,
case aside): its results would be cached under that name and read back as MTEB's task's.

``resolve_tasks`` turns the strings into ``ResolvedTask`` objects (name, type, the mteb task
instance, local or not). A local folder is read and checked completely when it is resolved
(``lensbench.layer_sweep.local_tasks``), so a malformed file is reported (file, line, field) before
any model is loaded; its task never fetches anything. ``ensure_loaded`` loads a task's data (an MTEB
task's dataset needs the Hugging Face Hub or its cache), ``task_texts`` counts the texts a task
hands the encoder and ``encoder_texts`` lists them (distinct). ``local_task``, ``TASK_TYPES``, ``FIELD``
and ``DOCS`` are re-exported from ``local_tasks``; ``_rebuild_local`` is found here too (by the
module's ``__getattr__``), for local tasks pickled before ``local_tasks`` was split out.

Nothing here imports ``mteb`` or ``datasets`` at module import time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import LensbenchError, did_you_mean
from ..hookspecs import hookimpl
from .local_tasks import DOCS, FIELD, TASK_TYPES, _fail, _show, local_task

__all__ = ["DOCS", "FIELD", "SCORED_TYPES", "TASK_SETS", "TASK_TYPES", "ResolvedTask", "TaskEntry", "encoder_texts",
           "ensure_loaded", "is_local", "lensbench_register_mteb_tasks", "local_task", "mteb_task_names", "resolve_tasks",
           "task_texts"]

#: MTEB task types the layer sweep scores (MTEB reranking tasks are retrieval tasks with candidates).
SCORED_TYPES = TASK_TYPES + ("Reranking",)

#: Named task sets a config may give instead of listing tasks.
TASK_SETS: dict[str, list[str]] = {
    # Skean et al. 2025 ("Layer by Layer: Uncovering Hidden Representations in Language Models"),
    # Table 1: MTEB(eng, v1) without retrieval and without the paragraph-level (P2P) tasks.
    "skean2025_table1": [
        # Classification
        "AmazonCounterfactualClassification", "AmazonReviewsClassification", "Banking77Classification",
        "EmotionClassification", "MassiveIntentClassification", "MassiveScenarioClassification",
        "MTOPDomainClassification", "MTOPIntentClassification", "ToxicConversationsClassification",
        "TweetSentimentExtractionClassification",
        # Clustering
        "ArxivClusteringS2S", "BiorxivClusteringS2S", "MedrxivClusteringS2S", "RedditClustering",
        "StackExchangeClustering", "TwentyNewsgroupsClustering",
        # Pair classification
        "SprintDuplicateQuestions", "TwitterSemEval2015", "TwitterURLCorpus",
        # Reranking
        "AskUbuntuDupQuestions", "MindSmallReranking", "SciDocsRR", "StackOverflowDupQuestions",
        # STS
        "BIOSSES", "SICK-R", "STS12", "STS13", "STS14", "STS15", "STS16", "STS17", "STSBenchmark",
    ],
}

#: English subsets chosen as MTEB(eng, v1) chooses them where ``languages=["eng"]`` would keep more
#: (AmazonCounterfactual also has "en-ext"; STS17 and STS22 have cross-lingual pairs with English).
_ENGLISH_SUBSETS = {"AmazonCounterfactualClassification": ["en"], "STS17": ["en-en"], "STS22": ["en"]}


@dataclass(frozen=True)
class TaskEntry:
    """A local MTEB task that a plugin registers: ``path`` is a task folder (``task.json`` and JSONL
    files, docs/layer_sweep.md#task-formats); a config names it by ``name``."""

    name: str
    path: Path
    description: str = ""


@dataclass
class ResolvedTask:
    """One task of a config, resolved: ``task`` is the mteb task instance (``task.metadata``)."""

    name: str
    task: Any
    local: bool
    entry: str
    """The config entry that named it (a task-set name for each task of the set)."""
    path: Path | None = None
    """The task folder of a local task, else None."""
    digest: str = ""
    """A short hash of what the task scores: a local task's files, an MTEB task's dataset revision,
    subsets and split."""

    @property
    def task_type(self) -> str:
        return self.task.metadata.type

    @property
    def main_score(self) -> str:
        return self.task.metadata.main_score

    @property
    def split(self) -> str:
        return list(self.task.eval_splits)[0]


def is_local(task: Any) -> bool:
    """Whether ``task`` (an mteb task or a ``ResolvedTask``) was read from a local folder."""
    if isinstance(task, ResolvedTask):
        return task.local
    return bool(getattr(task, "_lensbench_local", False))


def __getattr__(name: str) -> Any:
    """``_rebuild_local`` as this module's: local tasks pickled before ``local_tasks`` was split out
    of this module name it here (module-level ``__getattr__``, PEP 562, which pickle's lookup uses)."""
    if name == "_rebuild_local":
        from .local_tasks import _rebuild_local

        return _rebuild_local
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- MTEB tasks by name -----------------------------------------------------------------------------

def _mteb_registry() -> dict[str, type]:
    """MTEB's task classes by name (superseded ones included: MTEB(eng, v1) uses them)."""
    import importlib

    module = importlib.import_module("mteb.get_tasks")
    registry = getattr(module, "_TASKS_REGISTRY", None)
    if isinstance(registry, dict):
        return registry
    import mteb

    return {type(t).metadata.name: type(t) for t in mteb.get_tasks(exclude_superseded=False)}


@functools.lru_cache(maxsize=1)
def mteb_task_names() -> dict[str, str]:
    """Every task name this mteb knows, lower-cased, to the name as MTEB spells it: its tasks
    (superseded ones included) and the old names of renamed ones. Built once per process (about a
    millisecond once mteb is imported, which reading any task does anyway)."""
    import importlib

    renames = getattr(importlib.import_module("mteb.get_tasks"), "_TASK_RENAMES", None)
    names = [*_mteb_registry(), *(renames if isinstance(renames, dict) else ())]
    return {name.lower(): name for name in names}


def _mteb_name(name: str) -> str | None:
    """The MTEB task whose name ``name`` is (case aside), else None."""
    return mteb_task_names().get(name.lower())


def _taken_by_plugin(registry: Any, reg: TaskEntry, mteb_name: str) -> str:
    """Why the registered task ``reg`` is refused: it takes the name of the MTEB task ``mteb_name``."""
    entry = next((e for e in registry if e.name == reg.name), None) if hasattr(registry, "__iter__") else None
    plugin = repr(entry.plugin) if entry is not None else "a plugin"
    block = (f", or skip that plugin with LENSBENCH_BLOCK_PLUGINS={entry.entry_point} to score MTEB's task"
             if entry is not None and entry.entry_point else "")
    same = "" if mteb_name == reg.name else f" ({mteb_name!r})"
    return (f"task {reg.name!r} registered by plugin {plugin} (folder {reg.path}) takes the name of an MTEB task"
            f"{same}, so its scores would be cached and read as MTEB's; rename the task in that plugin's TaskEntry"
            f"{block}")


def _mteb_task(name: str) -> Any:
    """``mteb.get_task(name)`` with one eval split ("test" where there is one) and, for a
    multilingual task, its English subsets (as MTEB(eng, v1) selects them)."""
    import mteb

    metadata = _mteb_registry()[name].metadata
    splits = list(metadata.eval_splits)
    split = "test" if "test" in splits else splits[0]
    if name in _ENGLISH_SUBSETS:
        return mteb.get_task(name, eval_splits=[split], hf_subsets=_ENGLISH_SUBSETS[name])
    if metadata.is_multilingual:
        try:
            return mteb.get_task(name, languages=["eng"], eval_splits=[split], exclusive_language_filter=True)
        except ValueError:  # no English subset: score them all
            pass
    return mteb.get_task(name, eval_splits=[split])


def _scored(task: Any, entry: str, field: str) -> None:
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.abstasks.clustering_legacy import AbsTaskClusteringLegacy
    from mteb.abstasks.pair_classification import AbsTaskPairClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    bases = (AbsTaskClassification, AbsTaskClustering, AbsTaskClusteringLegacy, AbsTaskPairClassification,
             AbsTaskSTS, AbsTaskRetrieval)
    if (task.metadata.type not in SCORED_TYPES or not isinstance(task, bases)
            or task.metadata.modalities != ["text"]):
        via = "" if entry == task.metadata.name else f" (from {entry!r})"
        raise _fail(f"MTEB task {task.metadata.name!r}{via} is a {task.metadata.type} task on "
                    f"{'+'.join(task.metadata.modalities)}; layer_sweep scores text tasks of the types "
                    f"{', '.join(SCORED_TYPES)}", field)


def _hub_digest(task: Any) -> str:
    text = json.dumps([task.metadata.name, task.metadata.dataset.get("path"), task.metadata.dataset.get("revision"),
                       list(task.hf_subsets), list(task.eval_splits)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _looks_like_path(entry: str) -> bool:
    return any(sep in entry for sep in ("/", "\\", os.sep)) or entry.startswith(("~", ".")) or Path(entry).exists()


def resolve_tasks(entries: list[str], field: str = FIELD, *, registry: Any) -> list[ResolvedTask]:
    """The tasks ``entries`` name, in order (a task set expands in place).

    Each entry is a registered local task name (``registry``: ``Registries.mteb_tasks``), a task
    folder holding task.json, a task-set name (``TASK_SETS``) or an MTEB task name. An unknown
    entry, a malformed folder, or a task named twice after expansion is a one-line
    ``LensbenchError`` with ``field`` as its field.
    """
    if isinstance(entries, (str, bytes)) or not isinstance(entries, (list, tuple)):
        raise _fail(f"must be a list of task names, task folders or task sets, not {_show(entries)}", field)
    resolved: list[ResolvedTask] = []
    given_by: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, str) or not entry.strip():
            raise _fail(f"entry {i} is {_show(entry)}; give a task name, a task folder or a task set", field)
        for task in _resolve_entry(entry, field, registry):
            if task.name in given_by:
                earlier = given_by[task.name]
                how = "" if earlier == entry else f", already given by entry {earlier!r}"
                raise _fail(f"entry {entry!r} names task {task.name!r} a second time{how}; remove one", field)
            given_by[task.name] = entry
            resolved.append(task)
    return resolved


def _resolve_entry(entry: str, field: str, registry: Any) -> list[ResolvedTask]:
    if entry in registry:
        reg = registry.get(entry)
        mteb_name = _mteb_name(reg.name)
        if mteb_name is not None:
            raise _fail(_taken_by_plugin(registry, reg, mteb_name), field)
        task = local_task(reg.path, reg.name, field)
        return [ResolvedTask(reg.name, task, True, entry, Path(reg.path).resolve(), task._lensbench_digest)]
    if entry in TASK_SETS:
        registry_names = _mteb_registry()
        out = []
        for name in TASK_SETS[entry]:
            if name not in registry_names:
                raise _fail(f"task set {entry!r} names {name!r}, which this mteb version does not know; "
                            "install the mteb version lensbench requires", field)
            task = _mteb_task(name)
            out.append(ResolvedTask(name, task, False, entry, None, _hub_digest(task)))
        return out
    if _looks_like_path(entry):
        folder = Path(entry).expanduser()
        if folder.is_dir() or not folder.exists() or folder.name == "task.json":
            folder = folder.parent if folder.name == "task.json" and folder.is_file() else folder
            if not folder.exists():
                raise _fail(f"{entry!r} is not a registered task, a task set or an MTEB task, and no folder "
                            f"{folder} exists; give a task folder holding task.json ({DOCS})", field)
            mteb_name = _mteb_name(folder.resolve().name)
            if mteb_name is not None:
                same = "" if mteb_name == folder.resolve().name else f" ({mteb_name!r})"
                raise _fail(f"task folder {entry!r} is named like an MTEB task{same} and a folder's task takes its "
                            "folder's name, so its scores would be cached and read as MTEB's; rename the folder",
                            field)
            task = local_task(folder, None, field)
            return [ResolvedTask(task.metadata.name, task, True, entry, folder.resolve(), task._lensbench_digest)]
        raise _fail(f"{entry!r} is a file; give the task folder that holds task.json ({DOCS})", field)
    names = _mteb_registry()
    if entry in names:
        task = _mteb_task(entry)
        _scored(task, entry, field)
        return [ResolvedTask(entry, task, False, entry, None, _hub_digest(task))]
    hint = did_you_mean(entry, [*registry.names(), *TASK_SETS, *names])
    if not hint.startswith("did you mean"):
        hint = (f"registered: {', '.join(registry.names()) or 'none'}; task sets: {', '.join(TASK_SETS)}; "
                "MTEB tasks: see mteb.get_tasks()")
    raise _fail(f"unknown task {entry!r}: not a registered task, a task folder, a task set or an MTEB task; {hint}",
                field)


# -- loading and counting ---------------------------------------------------------------------------

_OFFLINE_ERRORS = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
                   "ReadTimeout", "ConnectTimeoutError", "NewConnectionError", "MaxRetryError", "gaierror"}


def _offline(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the Hub could not be reached."""
    env_offline = any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)) or type(current).__name__ in _OFFLINE_ERRORS:
            return True
        if env_offline and isinstance(current, FileNotFoundError):
            return True
        current = current.__cause__ or current.__context__
    return False


def _mteb_of(task: Any) -> Any:
    return task.task if isinstance(task, ResolvedTask) else task


def ensure_loaded(task: Any, field: str = FIELD) -> Any:
    """Load the data of ``task`` (an mteb task or a ``ResolvedTask``) unless it is loaded; returns the
    mteb task. An MTEB task whose dataset is neither cached nor reachable on the Hugging Face Hub
    gives one line saying how to get it there."""
    task = _mteb_of(task)
    if task.data_loaded:
        return task
    name, hf_path = task.metadata.name, task.metadata.dataset.get("path")
    try:
        task.load_data()
    except LensbenchError:
        raise
    except Exception as exc:
        if is_local(task):
            raise
        if _offline(exc):
            raise _fail(f"MTEB task {name} needs its dataset {hf_path} from the Hugging Face Hub, which is not "
                        "reachable; download it where the hub is reachable (it lands in HF_HOME/HF_DATASETS_CACHE) "
                        f"and copy that cache here, or use a local task folder ({DOCS})", field) from exc
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _fail(f"MTEB task {name} could not load its dataset {hf_path}: {type(exc).__name__}: {detail}",
                    field) from exc
    return task


def _subset_data(task: Any, hf_subset: str) -> Any:
    """The data of one subset as ``AbsTask.evaluate`` picks it."""
    dataset = task.dataset
    if hf_subset not in dataset and hf_subset == "default":
        return dataset
    return dataset[hf_subset]


def task_texts(task: Any) -> int:
    """The number of texts ``task`` (an mteb task or a ``ResolvedTask``) hands the encoder in one
    evaluation of its eval split(s), counted as MTEB 2.26 selects them: classification the training
    texts MTEB's undersampling draws (the union over its experiments) plus the eval texts;
    clustering the texts it embeds; pair classification and STS both sides of every pair;
    retrieval and reranking the whole corpus plus the queries that have relevant documents.
    Loads the task's data if needed."""
    task = ensure_loaded(_mteb_of(task))
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.abstasks.clustering_legacy import AbsTaskClusteringLegacy
    from mteb.abstasks.pair_classification import AbsTaskPairClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    if isinstance(task, AbsTaskRetrieval):
        task.convert_v1_dataset_format_to_v2(num_proc=None)  # what evaluate() does first; a no-op on v2 data
    total = 0
    for split in task.eval_splits:
        for hf_subset in task.hf_subsets:
            data = _subset_data(task, hf_subset)
            if isinstance(task, AbsTaskClassification):
                if task.is_cross_validation:
                    total += len(data[task.train_split])
                    continue
                train = data[task.train_split]
                union: set[int] = set()
                idxs = None
                for i in range(task.n_experiments):
                    _, idxs, selected = task._undersample_data(train, i, idxs)
                    union.update(selected)
                total += len(union) + len(data[split])
            elif isinstance(task, AbsTaskClusteringLegacy):
                for row in data[split]:
                    if len(set(row[task.label_column_name])) > 1:
                        total += len(row[task.input_column_name])
            elif isinstance(task, AbsTaskClustering):
                n = len(data[split])
                if task.max_fraction_of_documents_to_embed is not None:
                    n = min(n, int(task.max_fraction_of_documents_to_embed * n))
                elif task.max_document_to_embed is not None:
                    n = min(n, task.max_document_to_embed)
                total += n
            elif isinstance(task, (AbsTaskPairClassification, AbsTaskSTS)):
                rows = data[split]
                columns = ((task.input1_column_name, task.input2_column_name)
                           if isinstance(task, AbsTaskPairClassification) else task.column_names)
                if isinstance(task, AbsTaskPairClassification) and len(rows) == 1:  # v1 layout: one row of lists
                    total += sum(len(rows[0][c]) for c in columns)
                else:
                    total += len(columns) * len(rows)
            elif isinstance(task, AbsTaskRetrieval):
                split_data = data[split]
                relevant = split_data["relevant_docs"]
                with_docs = {q for q, docs in relevant.items() if len(docs) > 0}
                total += len(split_data["corpus"]) + sum(1 for q in split_data["queries"]["id"] if q in with_docs)
            else:
                raise LensbenchError(f"cannot count the texts of MTEB task {task.metadata.name} "
                                     f"({type(task).__name__}); layer_sweep scores {', '.join(SCORED_TYPES)} tasks")
    return total


def encoder_texts(task: Any) -> list[str]:
    """The distinct texts of ``task`` (an mteb task or a ``ResolvedTask``) that an evaluation of its
    eval split(s) may hand the encoder, in the order first met: classification the training texts
    MTEB's undersampling draws (as ``task_texts`` selects them) and the eval texts; clustering every
    text of the eval split (MTEB may embed a random part of them); pair classification and STS both
    sides of every pair; retrieval and reranking the corpus (title and text joined, as MTEB joins
    them) and the queries that have relevant documents (with their instruction, as MTEB appends it).
    The texts the representation metrics of a task draw from. Loads the task's data if needed."""
    task = ensure_loaded(_mteb_of(task))
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.abstasks.clustering_legacy import AbsTaskClusteringLegacy
    from mteb.abstasks.pair_classification import AbsTaskPairClassification
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    if isinstance(task, AbsTaskRetrieval):
        task.convert_v1_dataset_format_to_v2(num_proc=None)
    texts: dict[str, None] = {}  # insertion-ordered set
    for split in task.eval_splits:
        for hf_subset in task.hf_subsets:
            data = _subset_data(task, hf_subset)
            if isinstance(task, AbsTaskClassification):
                column = task.input_column_name
                train = data[task.train_split]
                if task.is_cross_validation:
                    texts.update(dict.fromkeys(train[column]))
                    continue
                union: set[int] = set()
                idxs = None
                for i in range(task.n_experiments):
                    _, idxs, selected = task._undersample_data(train, i, idxs)
                    union.update(selected)
                drawn = train[column]
                texts.update(dict.fromkeys(drawn[i] for i in sorted(union)))
                texts.update(dict.fromkeys(data[split][column]))
            elif isinstance(task, AbsTaskClusteringLegacy):
                for row in data[split]:
                    if len(set(row[task.label_column_name])) > 1:
                        texts.update(dict.fromkeys(row[task.input_column_name]))
            elif isinstance(task, AbsTaskClustering):
                texts.update(dict.fromkeys(data[split][task.input_column_name]))
            elif isinstance(task, (AbsTaskPairClassification, AbsTaskSTS)):
                rows = data[split]
                columns = ((task.input1_column_name, task.input2_column_name)
                           if isinstance(task, AbsTaskPairClassification) else task.column_names)
                if len(rows) == 1 and isinstance(rows[0][columns[0]], list):  # v1 layout: one row of lists
                    pairs = zip(*(rows[0][c] for c in columns))
                else:
                    pairs = zip(*(rows[c] for c in columns))
                for pair in pairs:
                    texts.update(dict.fromkeys(pair))
            elif isinstance(task, AbsTaskRetrieval):
                split_data = data[split]
                with_docs = {q for q, docs in split_data["relevant_docs"].items() if len(docs) > 0}
                for row in split_data["corpus"]:
                    title = row.get("title") or ""
                    texts[(title + " " + row["text"]).strip() if title else row["text"].strip()] = None
                for row in split_data["queries"]:
                    if row["id"] in with_docs:
                        instruction = row.get("instruction")
                        texts[row["text"] + " " + instruction if instruction else row["text"]] = None
            else:
                raise LensbenchError(f"cannot list the texts of MTEB task {task.metadata.name} "
                                     f"({type(task).__name__}); layer_sweep scores {', '.join(SCORED_TYPES)} tasks",
                                     FIELD)
    return [t for t in texts if isinstance(t, str)]


# -- the shipped tasks ------------------------------------------------------------------------------

def _shipped(name: str, description: str) -> TaskEntry:
    return TaskEntry(name=name, path=Path(str(resources.files("lensbench.data") / "mteb_tasks" / name)),
                     description=description)


@hookimpl
def lensbench_register_mteb_tasks() -> list[TaskEntry]:
    return [
        _shipped("lensbench_topics", "Classification: short English sentences in 5 topics (200 train, 80 test)"),
        _shipped("lensbench_topics_clustering", "Clustering: the 80 test sentences of lensbench_topics, 5 topics"),
        _shipped("lensbench_sts", "STS: 120 English sentence pairs graded 0..5"),
    ]
