"""DataModules: they yield the work items of a run, already filtered for resume and sharded.

``WorkDataModule`` is the shared mechanism: a subclass lists its *units* (a batch of texts, a
prompt, a matrix), the analysis lists its *states*, and ``predict_dataloader`` crosses them,
drops the keys already stored and hands each rank its state-grouped share.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from ..errors import LensbenchError
from ..logs import Progress, run_log
from ..work import Unit, WorkItem, content_digest, plan_items, shard_by_state
from .sources import TextDataset, read_records, resolve_dataset


def _identity(step):
    return step


def group_steps(items: list[WorkItem], size: int, group: Callable[[WorkItem], Any] | None = None) -> list:
    """Single items (size 1), or lists of up to ``size`` consecutive items of one state (and, with
    ``group``, of one group value: a step never mixes two groups)."""
    if size == 1:
        return list(items)

    def same(a: WorkItem, b: WorkItem) -> bool:
        return a.state.id == b.state.id and (group is None or group(a) == group(b))

    steps: list[list[WorkItem]] = []
    for item in items:
        if steps and len(steps[-1]) < size and same(steps[-1][-1], item):
            steps[-1].append(item)
        else:
            steps.append([item])
    return steps


class WorkDataModule(pl.LightningDataModule):
    """Base class: subclasses implement ``units`` (and may extend ``fingerprint``)."""

    #: Settings (paths under ``data.init_args``) that only choose which units exist: changing them
    #: extends a run folder rather than being refused (units carry content digests instead).
    extendable: tuple[str, ...] = ()
    #: The config field that holds the units' content (named when stored content changed).
    content_field: str = "data.init_args"

    def on_exception(self, exception: BaseException) -> None:
        """Lightning skips ``teardown`` when a run fails: release the run folder here."""
        analysis = self.trainer.lightning_module if self.trainer is not None else None
        if hasattr(analysis, "release_run"):
            analysis.release_run(exception)

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What besides the config must match to resume a run (e.g. hashes of data files)."""
        return {}

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # A rank may have nothing left to do (resume, or fewer items than ranks): its empty loader
        # skips the loop, and the rank still meets the others at teardown's barriers and merge.
        # Lightning's DataHooks.__init__ sets this on the instance (False), so a class attribute
        # would be hidden; it is read after this method returns.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        if trainer._accelerator_connector.use_distributed_sampler and trainer.world_size > 1:
            raise LensbenchError(
                "lensbench shards work items itself; set trainer.use_distributed_sampler: false",
                "trainer.use_distributed_sampler",
            )
        analysis = trainer.lightning_module
        items = analysis.plan if analysis.plan is not None else plan_items(analysis.states(), self.units())
        done = analysis.store.keys()
        todo = [item for item in items if item.key_str not in done]
        # An analysis whose items share work (the loop counts of one batch) keeps each group whole.
        group = getattr(analysis, "step_group", None)
        mine = shard_by_state(todo, trainer.global_rank, trainer.world_size, group)
        steps = group_steps(mine, max(1, int(getattr(analysis, "items_per_step", 1))), group)
        rank_zero_info(
            f"lensbench: {len(items)} work items, {len(items) - len(todo)} already stored in "
            f"{analysis.run_dir}, {len(todo)} to do on {trainer.world_size} rank(s)"
        )
        if trainer.global_rank == 0:
            _write_plan(analysis.run_dir, items)
        analysis.progress = Progress(len(mine), trainer.global_rank, analysis.device)
        return DataLoader(steps, batch_size=None, shuffle=False, collate_fn=_identity)


def _write_plan(run_dir: Path, items: list) -> None:
    """``logs/plan.json``: the keys of every work item this run plans, so that a report of the folder
    names the items not stored (an interrupted run). Atomic; a folder that refuses it is logged."""
    from ..report.runinfo import PLAN_FILE
    from ..run_folders import atomic_write

    path = Path(run_dir) / PLAN_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps([item.key_str for item in items]))
    except OSError as exc:
        run_log.warning(f"could not write {path} ({exc.strerror}): a report cannot name missing work items")


def load_datasets(entries: list, argument: str, limit: int | None) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Every dataset of a config list (names or files) as rows (``read_records``), and a hash of
    each one's texts; names must be unique. ``argument`` is the config path used in errors."""
    from ..plugins import active_registries

    registry = active_registries().datasets
    rows: dict[str, list[dict]] = {}
    hashes: dict[str, str] = {}
    if not entries:
        raise LensbenchError("is empty; name at least one dataset", argument)
    for i, entry in enumerate(entries):
        field = f"{argument}[{i}]"
        spec = TextDataset(entry) if isinstance(entry, str) else entry
        name, path, text_field = resolve_dataset(spec, registry, field)
        if name in rows:
            raise LensbenchError(f"dataset name {name!r} is used twice; give one a `name`", field)
        rows[name] = read_records(path, text_field, field)[:limit]
        hashes[name] = hashlib.sha256("\n".join(r["text"] for r in rows[name]).encode()).hexdigest()[:16]
    return rows, hashes


@dataclass(frozen=True)
class TextBatch:
    dataset: str
    texts: tuple[str, ...]


class TextDataModule(WorkDataModule):
    """Text datasets cut into fixed batches of examples: one work item per (state, dataset, first
    example, end): ``batch_size`` consecutive examples, the last batch of a dataset maybe fewer."""

    # Adding datasets or examples adds batches; a stored batch whose texts changed is refused by
    # its digest. batch_size is not here: it re-cuts every batch.
    extendable = ("datasets", "max_examples")
    content_field = "data.init_args.datasets"

    def __init__(
        self,
        datasets: list[str | TextDataset] | None = None,
        batch_size: int = 8,
        max_examples: int | None = None,
    ) -> None:
        """
        Args:
            datasets: Registered dataset names or .txt/.jsonl files (a string or
                ``{source, name, text_field}``). Default: the shipped ``forget`` and ``retain``.
            batch_size: Examples per work item (and per forward pass).
            max_examples: Use only the first N examples of each dataset.
        """
        super().__init__()
        if batch_size < 1:
            raise LensbenchError(f"must be at least 1, got {batch_size}", "data.init_args.batch_size")
        if max_examples is not None and max_examples < 1:
            raise LensbenchError(f"must be at least 1 or null, got {max_examples}", "data.init_args.max_examples")
        self.batch_size = batch_size
        rows, self.hashes = load_datasets(["forget", "retain"] if datasets is None else datasets, "data.init_args.datasets", max_examples)
        self.texts: dict[str, list[str]] = {name: [r["text"] for r in group] for name, group in rows.items()}

    def units(self) -> list[Unit]:
        units = []
        for name, texts in self.texts.items():
            for start in range(0, len(texts), self.batch_size):
                batch = TextBatch(name, tuple(texts[start : start + self.batch_size]))
                # Keyed by the examples it holds: a batch that grows (more examples) is a new item.
                units.append(Unit((name, start, start + len(batch.texts)), batch, content_digest(batch.texts)))
        return units


@dataclass(frozen=True)
class Prompt:
    group: str
    prompt_id: int
    text: str
    category: str
    answer: str | None = None
    image: str | None = None  # absolute path of the picture shown with the prompt


class PromptDataModule(WorkDataModule):
    """Prompt sets: one work item per (state, prompt_group, prompt_id)."""

    # Adding prompt sets or prompts adds units; a stored prompt whose text, category, answer or
    # picture changed is refused by its digest.
    extendable = ("prompts", "max_prompts")
    content_field = "data.init_args.prompts"

    def __init__(self, prompts: list[str | TextDataset] | None = None, max_prompts: int | None = None,
                 image: str | None = None) -> None:
        """
        Args:
            prompts: Registered prompt sets (dreams, iq, cookie_theft) or .txt/.jsonl files (one
                prompt per line; JSONL may carry prompt_id, category, answer and image, a picture
                file relative to the JSONL file). A set's name is its prompt_group. Default: dreams.
            max_prompts: Use only the first N prompts of each set.
            image: A picture (PNG/JPEG) shown with every prompt that names none of its own.
        """
        super().__init__()
        from .images import file_sha256, load_image, resolve_image

        if max_prompts is not None and max_prompts < 1:
            raise LensbenchError(f"must be at least 1 or null, got {max_prompts}", "data.init_args.max_prompts")
        if image is not None:
            image = resolve_image(image, Path.cwd(), "data.init_args.image", "image")
        rows, self.hashes = load_datasets(["dreams"] if prompts is None else prompts, "data.init_args.prompts", max_prompts)
        self.prompts: list[Prompt] = []
        for name, group in rows.items():
            ids = [int(r.get("prompt_id", r["index"] + 1)) for r in group]  # 1-based, as the seed's records
            if len(set(ids)) != len(ids):
                raise LensbenchError(f"prompt set {name!r} repeats a prompt_id; make them unique", "data.init_args.prompts")
            self.prompts += [Prompt(name, pid, r["text"], str(r.get("category", name)), r.get("answer"),
                                    r.get("image") or image) for pid, r in zip(ids, group)]
        pictures = sorted({p.image for p in self.prompts if p.image})
        for path in pictures:  # every picture decodes, before any work
            load_image(path, "data.init_args.image" if path == image else "data.init_args.prompts")
        self.image_hashes = {path: file_sha256(path) for path in pictures}  # content, not location

    def units(self) -> list[Unit]:
        return [Unit((p.group, p.prompt_id), p,
                     content_digest(p.text, p.category, p.answer, self.image_hashes.get(p.image)))
                for p in self.prompts]
