"""``AnswerDataModule``: question-answer rows (a synthetic dataset's evaluation splits, or your own
JSONL with ``text``, ``prompt`` and ``answer``) in fixed batches: one work item per (state, split,
first row, end)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import LensbenchError
from ..work import Unit, content_digest
from .modules import WorkDataModule

FIELD = "data.init_args"


@dataclass(frozen=True)
class AnswerBatch:
    split: str
    start: int
    rows: tuple[dict, ...]


class AnswerDataModule(WorkDataModule):
    """Rows with an answer to score, from a registered synthetic dataset or a folder of splits."""

    extendable = ("splits", "max_examples")
    content_field = "data.init_args"

    def __init__(
        self,
        dataset: str | None = "synthetic_qa",
        options: dict[str, Any] | None = None,
        seed: int = 0,
        path: str | None = None,
        facts: str | None = None,
        data_dir: str | None = None,
        splits: list[str] | None = None,
        mask: str | None = None,
        batch_size: int = 32,
        max_examples: int | None = None,
    ) -> None:
        """
        Args:
            dataset: A registered synthetic dataset (the one the model was trained on: same name,
                seed and options give the same rows). null: use ``path``.
            options: Its options.
            seed: Its seed.
            path: Instead: a folder of ``<split>.jsonl`` files whose rows have ``text``, ``prompt``
                and ``answer`` (``text`` starting with ``prompt``).
            facts: Instead: a text dataset (a registered name such as the example plugin's
                ``capitals``, or a .txt/.jsonl file) of sentences whose last word is the answer
                (``"The capital of France is Paris."``): split ``facts``, mask ``last_word``.
            data_dir: Where a generated dataset is written (default
                ``outputs/datasets/<dataset>-seed<seed>-<hash>``, as ``lensbench fit``).
            splits: Splits to evaluate. Default: every split but ``train`` and ``val``.
            mask: Answer mask (qa, digit_lookup, hashhop, none) picking the scored tokens;
                default: the dataset's own. A registered dataset's ``answer_spans`` gets it and
                picks the scored characters (as in ``lensbench fit``).
            batch_size: Rows per work item (and per forward pass).
            max_examples: Use only the first N rows of each split.
        """
        super().__init__()
        from ..synthetic.datasets import load_dataset

        #: Where the rows come from, as configured (an analysis compares it with a model's training data).
        self.source = {"dataset": dataset, "options": options, "seed": seed, "path": path, "facts": facts}
        from ..synthetic.masks import get_mask

        given = [name for name, value in (("dataset", dataset), ("path", path), ("facts", facts)) if value is not None]
        if len(given) != 1:
            raise LensbenchError("give one of dataset (a registered synthetic dataset), path (a folder of JSONL "
                                 f"splits) and facts (a text dataset), not {' and '.join(given) or 'none'}; set the "
                                 "others to null", f"{FIELD}.dataset")
        if batch_size < 1:
            raise LensbenchError(f"must be at least 1, got {batch_size}", f"{FIELD}.batch_size")
        if max_examples is not None and max_examples < 1:
            raise LensbenchError(f"must be at least 1 or null, got {max_examples}", f"{FIELD}.max_examples")
        if facts is not None:
            all_splits, self.mask = {"facts": fact_rows(facts, f"{FIELD}.facts")}, mask or "last_word"
        else:  # mask, else the dataset's; bound to a registered dataset's answer_spans
            from ..plugins import active_registries

            all_splits, self.mask = load_dataset(dataset, options, seed, path, data_dir, FIELD, mask,
                                                 registry=active_registries().synthetic_datasets)
        get_mask(self.mask, f"{FIELD}.mask")
        names = splits or [s for s in all_splits if s not in ("train", "val")]
        missing = [s for s in names if s not in all_splits]
        if missing:
            raise LensbenchError(f"the dataset has no split {missing[0]!r}; its splits: {', '.join(sorted(all_splits))}",
                                 f"{FIELD}.splits")
        self.rows: dict[str, list[dict]] = {}
        for name in names:
            rows = all_splits[name][:max_examples]
            if not rows:
                raise LensbenchError(f"split {name!r} is empty; give a split with examples", f"{FIELD}.splits")
            for i, row in enumerate(rows):
                if not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str):
                    raise LensbenchError(f"row {i} of split {name!r} has no prompt and answer; memory_ablation "
                                         "scores answers: give rows with text, prompt and answer", f"{FIELD}.splits")
            self.rows[name] = rows
        self.batch_size = batch_size

    def units(self) -> list[Unit]:
        units = []
        for split, rows in self.rows.items():
            for start in range(0, len(rows), self.batch_size):
                chunk = tuple(rows[start:start + self.batch_size])
                units.append(Unit((split, start, start + len(chunk)), AnswerBatch(split, start, chunk),
                                  content_digest([(r["text"], r["prompt"], r["answer"]) for r in chunk])))
        return units


def fact_rows(source: str, field: str) -> list[dict]:
    """Rows of a text dataset whose last word is the answer: ``prompt`` the text before it."""
    from ..plugins import active_registries
    from ..synthetic.masks import last_word_spans
    from .sources import TextDataset, read_records, resolve_dataset

    _, file, text_field = resolve_dataset(TextDataset(source), active_registries().datasets, field)
    rows = []
    for row in read_records(file, text_field, field):
        text = row["text"]
        spans = last_word_spans(text)
        if not spans:
            raise LensbenchError(f"{source}: {text!r} has no word to take as the answer", field)
        start, end = spans[0]
        rows.append({**{k: v for k, v in row.items() if k != "index"}, "text": text, "prompt": text[:start],
                     "answer": text[start:end]})
    return rows
