"""The layer sweep's DataModule: one unit per MTEB task, one per representation-metrics dataset and,
with ``task_metrics``, one per task for the representation metrics of that task's own texts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.modules import TextBatch, WorkDataModule, load_datasets
from ..data.sources import TextDataset
from ..errors import LensbenchError
from ..work import Unit, content_digest

DEFAULT_TASKS = ("lensbench_topics", "lensbench_sts")


@dataclass(frozen=True)
class TaskUnit:
    name: str
    task_type: str
    ref: Any  # lensbench.layer_sweep.tasks resolved task (holds the mteb task)


def sample_texts(texts: list[str], limit: int | None, seed: int) -> list[str]:
    """Up to ``limit`` of ``texts`` (all when None), drawn without replacement with ``seed``, in the
    order drawn: the first ``limit`` of ``numpy.random.default_rng(seed).permutation(len(texts))``,
    which is what ``datasets.Dataset.shuffle(seed=seed)`` then the first ``limit`` rows pick (the
    draw information_flow makes, there with seed 42)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order[:limit]]


@dataclass(frozen=True)
class TaskTexts:
    """The representation metrics of one task: up to ``limit`` of the texts it hands the encoder
    (``tasks.encoder_texts``), drawn with ``seed`` when the item runs (an MTEB task's data is loaded
    then, not when the config is read)."""

    name: str
    ref: Any  # the resolved task
    limit: int | None
    seed: int

    def texts(self) -> list[str]:
        from .tasks import FIELD, encoder_texts, ensure_loaded

        ensure_loaded(self.ref, FIELD)  # an uncached MTEB dataset: one line naming the field
        return sample_texts(encoder_texts(self.ref), self.limit, self.seed)


def _count(value: Any, field: str, low: int, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LensbenchError(f"must be an integer of at least {low}{' or null' if allow_none else ''}, got {value!r}",
                             field)


class LayerSweepData(WorkDataModule):
    """MTEB tasks (one work item per (state, task)), text datasets for the representation metrics
    (one work item per (state, dataset)) and, with ``task_metrics``, the representation metrics of
    each task's own texts (one work item per (state, task))."""

    # Adding tasks or metric datasets, or turning task_metrics on, adds work items; a stored local
    # task whose files changed is refused by its digest. task_metric_texts and metric_seed must
    # match to resume (and are part of the digest of the task-metrics items).
    extendable = ("tasks", "metrics_datasets", "task_metrics")
    content_field = "data.init_args.tasks"

    def __init__(self, tasks: list[str] | None = None, metrics_datasets: list[str | TextDataset] | None = None,
                 max_metric_texts: int | None = 1000, task_metrics: bool = False,
                 task_metric_texts: int | None = 1000, metric_seed: int = 0) -> None:
        """
        Args:
            tasks: MTEB tasks: registered local task names (see ``lensbench plugins``), task folders
                (docs/layer_sweep.md#task-formats), MTEB task names, or the name of a task set
                (``skean2025_table1``: the 32 tasks of Skean et al. 2025, Table 1). Default: the two
                shipped local tasks, lensbench_topics and lensbench_sts.
            metrics_datasets: Text datasets (registered names or .txt/.jsonl files) over which the
                representation metrics (prompt entropy, dataset entropy, curvature, effective rank)
                of every layer are computed. Default: none.
            max_metric_texts: Use only the first N texts of each metrics dataset (information_flow
                uses 1000).
            task_metrics: Also compute the representation metrics of every layer on each task's own
                texts (information_flow computes them on the datasets of its MTEB tasks): one work
                item per (state, task); ``representation_metrics.csv`` names the task in ``dataset``
                with ``source`` = ``task``.
            task_metric_texts: Up to N texts of each task for ``task_metrics``, drawn from the
                distinct texts the task hands the encoder (information_flow: 1000); null: all.
            metric_seed: Seed of that draw (recorded in ``representation_metrics.csv``).
        """
        super().__init__()
        from ..plugins import active_registries
        from .tasks import ensure_loaded, resolve_tasks

        if max_metric_texts is not None and max_metric_texts < 1:
            raise LensbenchError(f"must be at least 1 or null, got {max_metric_texts}",
                                 "data.init_args.max_metric_texts")
        if not isinstance(task_metrics, bool):
            raise LensbenchError(f"must be true or false, got {task_metrics!r}", "data.init_args.task_metrics")
        _count(task_metric_texts, "data.init_args.task_metric_texts", 1, allow_none=True)
        _count(metric_seed, "data.init_args.metric_seed", 0, allow_none=False)
        self.task_metrics, self.task_metric_texts, self.metric_seed = task_metrics, task_metric_texts, metric_seed
        entries = list(DEFAULT_TASKS if tasks is None else tasks)
        resolved = resolve_tasks(entries, "data.init_args.tasks", registry=active_registries().mteb_tasks) \
            if entries else []
        self.tasks = [TaskUnit(t.name, t.task_type, t) for t in resolved]
        if any(not t.ref.local for t in self.tasks):
            from ..models.sources import hub_offline

            if hub_offline():  # a task whose dataset is not cached fails here, before any work
                for t in self.tasks:
                    if not t.ref.local:
                        ensure_loaded(t.ref, "data.init_args.tasks")
        self.metric_texts: dict[str, list[str]] = {}
        if metrics_datasets:
            rows, _ = load_datasets(metrics_datasets, "data.init_args.metrics_datasets", max_metric_texts)
            self.metric_texts = {name: [r["text"] for r in group] for name, group in rows.items()}
        if not self.tasks and not self.metric_texts:
            raise LensbenchError("names no task and no metrics dataset; give at least one", "data.init_args.tasks")

    def units(self) -> list[Unit]:
        units = [Unit(("task", t.name), t, t.ref.digest) for t in self.tasks]
        units += [Unit(("metrics", name), TextBatch(name, tuple(texts)), content_digest(texts))
                  for name, texts in self.metric_texts.items()]
        if self.task_metrics:  # keys of another length than a dataset's: a dataset may share a task's name
            units += [Unit(("metrics", "task", t.name), TaskTexts(t.name, t.ref, self.task_metric_texts, self.metric_seed),
                           content_digest("task texts", t.ref.digest, self.task_metric_texts, self.metric_seed))
                      for t in self.tasks]
        return units
