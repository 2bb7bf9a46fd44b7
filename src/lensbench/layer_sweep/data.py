"""The layer sweep's DataModule: one unit per MTEB task and one per representation-metrics dataset."""

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


class LayerSweepData(WorkDataModule):
    """MTEB tasks (one work item per (state, task)) and text datasets for the representation metrics
    (one work item per (state, dataset))."""

    # Adding tasks or metric datasets adds work items; a stored local task whose files changed is
    # refused by its digest.
    extendable = ("tasks", "metrics_datasets")
    content_field = "data.init_args.tasks"

    def __init__(self, tasks: list[str] | None = None, metrics_datasets: list[str | TextDataset] | None = None,
                 max_metric_texts: int | None = 1000) -> None:
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
        """
        super().__init__()
        from .tasks import ensure_loaded, resolve_tasks

        if max_metric_texts is not None and max_metric_texts < 1:
            raise LensbenchError(f"must be at least 1 or null, got {max_metric_texts}",
                                 "data.init_args.max_metric_texts")
        entries = list(DEFAULT_TASKS if tasks is None else tasks)
        self.tasks = [TaskUnit(t.name, t.task_type, t) for t in resolve_tasks(entries, "data.init_args.tasks")] \
            if entries else []
        if any(not t.ref.local for t in self.tasks):
            from ..models.loading import hub_offline

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
        return units
