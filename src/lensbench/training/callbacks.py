"""Callbacks of ``lensbench fit``: Hugging Face folders every N steps, and memory slot usage."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ..logs import console


class WriteAtFitStart(pl.Callback):
    """Files rank 0 writes once the run has passed its set-up (data generated and read, every text
    encoded, the model built), so that a run stopped by bad input leaves no ``run.json`` claiming
    the folder for its settings."""

    def __init__(self) -> None:
        self.files: dict[Path, str] = {}

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        for path, text in self.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


class HuggingFaceCheckpoints(pl.Callback):
    """``<run>/checkpoint-<step>/``: ``save_pretrained`` of the model and its tokenizer every
    ``every`` optimizer steps and at the end, written to a temporary folder and renamed, so a
    folder that exists is complete."""

    def __init__(self, run_dir: Path, every: int) -> None:
        self.run_dir, self.every = Path(run_dir), every

    @property
    def last(self) -> Path:
        """The Lightning checkpoint a rerun resumes from."""
        return self.run_dir / "lightning" / "last.ckpt"

    def save(self, trainer: pl.Trainer, module: pl.LightningModule) -> Path | None:
        step = trainer.global_step
        dest = self.run_dir / f"checkpoint-{step}"
        if trainer.global_rank != 0 or dest.exists():
            return None
        tmp = self.run_dir / f".checkpoint-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            module.model.save_pretrained(tmp)
            module.tokenizer.save_pretrained(tmp)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        os.replace(tmp, dest)
        console.info(f"saved {dest}")
        return dest

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not step:
            return
        if final_batch(trainer):
            # inside the batch, as Lightning's own checkpoints: the data position it records is exact
            trainer.save_checkpoint(self.last, weights_only=False)  # every rank calls it; rank 0 writes
            self.save(trainer, module)
        elif step % self.every == 0:
            self.save(trainer, module)


def final_batch(trainer) -> bool:
    """Whether the batch just trained is the run's last (``max_steps`` or ``max_epochs`` reached)."""
    if trainer.max_steps and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    epochs = trainer.max_epochs
    return bool(epochs and epochs > 0 and trainer.current_epoch + 1 >= epochs and trainer.is_last_batch)


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, writing ``last.ckpt`` inside a training batch (every
    ``every_n_train_steps`` steps) or after the validation of that step, never when training ends:
    there, after a stop in the middle of an epoch, Lightning counts the epoch finished while the
    batches it trained say otherwise, and a resume from that state starts the next epoch at the
    cut epoch's batch count (skipping the rest of both). HuggingFaceCheckpoints writes the run's
    last batch's checkpoint inside that batch instead."""

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        pass


class MemoryUsage(pl.Callback):
    """Every ``every`` steps, the share of each memory layer's slots chosen by at least one token
    of the last ``every`` training batches, and its most used slots: logged (``memory_used/<layer>``)
    and appended to ``<run>/memory_usage.csv`` (``step, layer, slots, used, used_share, top_slots``).

    The reads counted since the last row are part of the Lightning checkpoint (``state_dict``): a
    run resumed from a step between two rows writes the rows an uninterrupted run writes."""

    def __init__(self, run_dir: Path, every: int, top: int = 10) -> None:
        self.run_dir, self.every, self.top = Path(run_dir), every, top
        self.counts: dict[int, torch.Tensor] = {}
        self.restored: dict[int, torch.Tensor] = {}
        self.trainer = None

    def setup(self, trainer, module, stage: str) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """The reads counted since the last row, summed over the ranks (every rank saves a
        checkpoint at the same step, so every rank calls this)."""
        counts = {}
        for i, count in sorted(self.counts.items()):
            if self.trainer is not None and self.trainer.world_size > 1:
                count = self.trainer.strategy.reduce(count.float(), reduce_op="sum").round().long()
            counts[i] = count.detach().cpu()
        return {"counts": counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored = {int(i): c.clone() for i, c in state.get("counts", {}).items()}

    def _layers(self, module) -> dict[int, Any]:
        get = getattr(module.model, "memory_layers", None)
        return get() if callable(get) else {}

    @property
    def path(self) -> Path:
        return self.run_dir / "memory_usage.csv"

    def on_train_start(self, trainer, module) -> None:
        """A resumed run starts at its checkpoint's step: the rows a killed run wrote after that step
        are written again, so they go first (as do a torn last line and rows of a run started over)."""
        if trainer.global_rank == 0:
            keep_rows_until(self.path, trainer.global_step)
            self.counts = dict(self.restored)  # the checkpoint's sum over ranks: counted once, on rank 0
        self.restored = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        for mem in self._layers(module).values():
            mem.record = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        layers = self._layers(module)
        if not layers:
            return
        mask = _token_mask(batch)
        for i, mem in layers.items():
            if mem.last_slots is None:
                continue
            slots = mem.last_slots if mask is None else mem.last_slots[mask.to(mem.last_slots.device)]
            count = torch.bincount(slots.reshape(-1), minlength=mem.n_slots)
            self.counts[i] = self.counts[i].to(count.device) + count if i in self.counts else count
            mem.last_slots = mem.last_weights = None
        step = trainer.global_step
        if step and step % self.every == 0 and self.counts:
            self.flush(trainer, module, step)

    def flush(self, trainer, module, step: int) -> None:
        rows = []
        for i, count in sorted(self.counts.items()):
            if trainer.world_size > 1:
                count = trainer.strategy.reduce(count.float(), reduce_op="sum")
            used = int((count > 0).sum())
            top = torch.topk(count.float(), min(self.top, count.numel()))
            rows.append({"step": step, "layer": i, "slots": count.numel(), "used": used,
                         "used_share": used / count.numel(),
                         "top_slots": " ".join(f"{s}:{int(c)}" for s, c in zip(top.indices.tolist(), top.values.tolist()) if c > 0)})
            module.log(f"memory_used/{i}", used / count.numel(), rank_zero_only=True, batch_size=1)
        self.counts.clear()
        if trainer.global_rank == 0:
            path = self.path
            new = not path.exists()
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                if new:
                    writer.writeheader()
                writer.writerows(rows)
            console.info("memory usage at step %d: %s", step,
                         ", ".join(f"layer {r['layer']} {r['used']}/{r['slots']} slots ({r['used_share']:.1%})" for r in rows))

    def on_train_end(self, trainer, module) -> None:
        for mem in self._layers(module).values():
            mem.record = False
            mem.last_slots = mem.last_weights = None


def keep_rows_until(path: Path, step: int) -> None:
    """Rewrite the CSV at ``path`` (a ``step`` column) atomically with only its whole rows of step
    ``step`` or before; nothing to do when it holds no other row."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        lines = fh.read().splitlines(keepends=True)
    if not lines:
        return
    fields = next(csv.reader(lines[:1]))
    kept = [lines[0] if lines[0].endswith("\n") else lines[0] + "\r\n"]  # csv's line end
    for line in lines[1:]:
        values = next(csv.reader([line]), [])
        whole = line.endswith("\n") and len(values) == len(fields)
        row = dict(zip(fields, values))
        if whole and str(row.get("step", "")).isdigit() and int(row["step"]) <= step:
            kept.append(line)
    if len(kept) == len(lines) and lines[-1].endswith("\n"):
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _token_mask(batch: dict) -> torch.Tensor | None:
    """Real tokens of a batch (padding excluded): ``token_mask`` of packed batches, else the 2-D
    ``attention_mask``."""
    if "token_mask" in batch:
        return batch["token_mask"]
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None and mask.dim() == 2 else None
