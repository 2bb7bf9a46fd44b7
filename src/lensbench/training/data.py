"""The LightningDataModule of ``lensbench fit``: a synthetic dataset (generated once from a seed,
or read from a folder of JSONL splits), tokenized with answer masks, in padded or packed batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from ..errors import LensbenchError
from ..synthetic.datasets import group_of

FIELD = "data"


class SyntheticTextData(pl.LightningDataModule):
    """Train on a registered synthetic dataset (``lensbench plugins`` lists them) or a folder of splits."""

    def __init__(
        self,
        dataset: str | None = "synthetic_qa",
        options: dict[str, Any] | None = None,
        seed: int = 0,
        path: str | None = None,
        data_dir: str | None = None,
        mask: str | None = None,
        max_length: int = 64,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        pack: bool = False,
        append_eos: bool = False,
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str | None = "test",
        shuffle_seed: int = 0,
    ) -> None:
        """
        Args:
            dataset: A registered synthetic dataset (synthetic_qa, digit_lookup, two_hop, hashhop).
            options: Its options (e.g. ``{num_pairs: 2000, format: pair}``; see docs/memory.md).
            seed: Seed of the generated dataset.
            path: Instead of ``dataset``: a folder of ``<split>.jsonl`` files (rows with ``text``).
            data_dir: Where a generated dataset is written (default
                ``outputs/datasets/<dataset>-seed<seed>-<hash of options, generator version and
                class>``); reused when it matches.
            mask: Answer mask (qa, digit_lookup, hashhop, none); default: the dataset's own. A
                registered dataset's ``answer_spans`` gets it and picks the trained characters.
            max_length: Longest tokenized example (a longer one is an error) and, packed, the row length.
            batch_size: Training examples per batch (per process); packed, they share fewer rows.
            val_batch_size: Validation rows per batch (default: batch_size).
            pack: Pack several examples per row (positions restart at each example).
            append_eos: End every example with the tokenizer's end-of-sequence token (trained).
            train_split: Split to train on.
            val_split: Split to validate on (exact match per bucket and split); null: none.
            test_split: Split whose exact match per group is written to ``exact_match.csv`` when
                training ends (skipped when the dataset has no such split); null: none.
            shuffle_seed: Seed of the order of training examples (and of packing).
        """
        super().__init__()
        if (dataset is None) == (path is None):  # before anything is generated
            raise LensbenchError("give either dataset (a registered name) or path (a folder of JSONL splits), not "
                                 + ("both; dataset defaults to synthetic_qa: set it to null beside path" if dataset
                                    else "neither"), f"{FIELD}.dataset")
        for name, value, low in (("max_length", max_length, 2), ("batch_size", batch_size, 1)):
            if value < low:
                raise LensbenchError(f"{name}={value} is out of range; use {low} or more", f"{FIELD}.{name}")
        if val_batch_size is not None and val_batch_size < 1:
            raise LensbenchError(f"val_batch_size={val_batch_size} is out of range; use 1 or more", f"{FIELD}.val_batch_size")
        self.save_hyperparameters()  # stored in the checkpoint: a resume from it compares them with the config's
        self.dataset, self.options, self.seed, self.path = dataset, dict(options or {}), seed, path
        self.data_dir = data_dir
        self.max_length, self.batch_size = max_length, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.pack, self.append_eos = pack, append_eos
        self.train_split, self.val_split, self.shuffle_seed = train_split, val_split, shuffle_seed
        self.test_split = test_split
        self.mask = mask or self._default_mask()
        from ..synthetic.masks import DatasetMask, get_mask

        get_mask(self.mask, f"{FIELD}.mask")
        if dataset is not None:  # the generator's answer_spans picks the trained characters
            self.mask = DatasetMask(self.mask, self._generator())
        self.splits: dict[str, list[dict]] | None = None
        self.val_groups: set[str] = set()

    @staticmethod
    def _registry() -> Any:
        """The synthetic-dataset registry in use (a DataModule reads the registries; the dataset
        functions below it take the registry as an argument)."""
        from ..plugins import active_registries

        return active_registries().synthetic_datasets

    def _generator(self) -> Any:
        return self._registry().get(self.dataset, f"{FIELD}.dataset")

    def _default_mask(self) -> str:
        if self.dataset is not None:
            return self._generator().mask
        from ..synthetic.datasets import read_manifest

        return (read_manifest(Path(self.path), f"{FIELD}.path") or {}).get("mask", "none")

    def prepare_data(self) -> None:
        """Generate and write the dataset once (rank 0 of each node)."""
        self.load_splits()

    def load_splits(self) -> dict[str, list[dict]]:
        if self.splits is None:
            from ..synthetic.datasets import load_dataset

            self.splits, _ = load_dataset(self.dataset, self.options, self.seed, self.path, self.data_dir, FIELD,
                                          registry=self._registry())
            for split in (self.train_split, self.val_split):
                if split is not None and split not in self.splits:
                    raise LensbenchError(f"the dataset has no split {split!r}; its splits: {', '.join(sorted(self.splits))}",
                                         f"{FIELD}.{'train_split' if split == self.train_split else 'val_split'}")
            if not self.splits[self.train_split]:
                raise LensbenchError(f"split {self.train_split!r} is empty; give a dataset with training examples",
                                     f"{FIELD}.train_split")
        return self.splits

    def setup(self, stage: str) -> None:
        from ..synthetic.collate import PackedCollator, PaddedCollator

        splits = self.load_splits()
        tokenizer = self.trainer.lightning_module.tokenizer
        self.tokenizer = tokenizer
        cls = PackedCollator if self.pack else PaddedCollator
        self.train_collate = cls(tokenizer, self.mask, self.max_length, append_eos=self.append_eos, field=FIELD)
        self.val_collate = PaddedCollator(tokenizer, self.mask, self.max_length, append_eos=self.append_eos, field=FIELD)
        self.train_rows = splits[self.train_split]
        self.val_rows = splits[self.val_split] if self.val_split else []
        self.val_groups = {group_of(r) for r in self.val_rows}
        # Every text must fit and train something: check it all now, not at step 10,000.
        for rows in (self.train_rows, self.val_rows):
            for row in rows:
                self.val_collate.encode_row(row)

    def rows_digest(self) -> str:
        """A digest of the rows this run trains, validates and tests on (read now if not yet)."""
        from ..work import content_digest

        splits = self.load_splits()
        names = sorted({n for n in (self.train_split, self.val_split, self.test_split) if n is not None and n in splits})
        return content_digest(*[[name, splits[name]] for name in names])

    def test_rows(self) -> list[dict]:
        """The rows of ``test_split`` (none when unset or absent)."""
        if self.test_split is None:
            return []
        return self.load_splits().get(self.test_split, [])

    def train_dataloader(self) -> "ResumableBatches":
        """Shuffled ``batch_size`` examples per step (packed, they share fewer rows), sharded over
        the processes, resumable in the middle of an epoch."""
        trainer = self.trainer
        return ResumableBatches(self.train_rows, self.batch_size, self.train_collate, self.shuffle_seed,
                                trainer.global_rank, trainer.world_size,
                                epoch=lambda: trainer.current_epoch,
                                consumed=lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def val_dataloader(self) -> Any:
        if not self.val_rows:
            return []
        return DataLoader(self.val_rows, batch_size=self.val_batch_size, shuffle=False, collate_fn=self._val_batch)

    def _val_batch(self, rows: list[dict]) -> dict[str, Any]:
        batch = self.val_collate(rows)
        batch["groups"] = [group_of(r) for r in rows]
        return batch


class ResumableBatches:
    """Batches of one epoch: a permutation of the rows drawn from ``seed + epoch``, padded (by
    repeating its start) to a multiple of ``world`` and dealt ``rank::world``, in batches.

    Lightning saves ``state_dict()`` with its checkpoints: the epoch and how many batches of it
    were trained (``consumed``, read from the trainer, since Lightning fetches one batch ahead).
    After ``load_state_dict`` the first iteration of that epoch skips those batches, so a resumed
    run trains on exactly the examples an uninterrupted one would. ``len`` stays the whole epoch's:
    Lightning counts the restored batches as fetched. The state is exact where lensbench writes
    ``last.ckpt`` (inside a batch, or after its validation: ``LastCheckpoint``), not when training
    has ended (Lightning has then counted a cut epoch finished; ``resume.inexact``)."""

    def __init__(self, rows: list[dict], batch_size: int, collate: Any, seed: int, rank: int, world: int,
                 epoch: Any, consumed: Any) -> None:
        self.rows, self.batch_size, self.collate, self.seed = rows, batch_size, collate, seed
        self.rank, self.world = rank, world
        self._epoch, self._consumed = epoch, consumed
        self._skip: tuple[int, int] | None = None

    def indices(self, epoch: int) -> list[int]:
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        total = -(-len(order) // self.world) * self.world
        order = (order * (total // max(1, len(order)) + 1))[:total]
        return order[self.rank::self.world]

    def __len__(self) -> int:
        per_rank = -(-len(self.rows) // self.world)
        return -(-per_rank // self.batch_size)

    def __iter__(self):
        epoch = int(self._epoch())
        mine = self.indices(epoch)
        start = 0
        if self._skip is not None and self._skip[0] == epoch:
            start = self._skip[1]
        self._skip = None
        for b in range(start, len(self)):
            yield self.collate([self.rows[i] for i in mine[b * self.batch_size:(b + 1) * self.batch_size]])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self._epoch()), "consumed": int(self._consumed())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = (int(state["epoch"]), int(state["consumed"]))
