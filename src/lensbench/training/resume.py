"""What ``lensbench fit`` checks before it trains: that no other run is writing the run folder
(``FolderLock``: the ``.lock`` that ``lensbench predict`` takes), and, before it resumes from a
Lightning checkpoint (``lightning/last.ckpt`` of the run folder, or ``--ckpt_path``), that the file
reads as tensors and plain values only, that it was trained with the settings asked (the config is
never replaced by the checkpoint's), and whether any step is left to train."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Any

from ..errors import LensbenchError

#: Entries of a checkpoint's stored hyperparameters that are no settings of the run.
NOT_SETTINGS = ("_instantiator", "_class_path")


def read_checkpoint(path: Path, field: str, fix: str) -> dict[str, Any]:
    """The checkpoint at ``path``, read with ``torch.load(weights_only=True)`` (tensors memory-mapped:
    only its small entries are read now). A file that is missing, cut short or holds pickled code is
    one line naming ``field`` and ``fix``."""
    import pickle

    import torch

    path = Path(path)
    if path.is_dir():
        inside = " (it holds lightning/last.ckpt: give that)" if (path / "lightning" / "last.ckpt").is_file() else ""
        raise LensbenchError(f"{path} is a folder, not a checkpoint file{inside}; {fix}", field)
    if not path.is_file():
        raise LensbenchError(f"{path} does not exist; {fix}", field)
    try:
        try:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, OSError):  # mmap needs a whole zip file: read it again, for the real reason
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (None, errno.EINVAL):
            raise  # the machine (permissions, disk): lensbench's one line names the path and what to check
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise LensbenchError(f"{path} holds more than tensors (it names {found.group(1)}); lensbench reads "
                                 "checkpoints with torch.load(weights_only=True) and runs no code from them: "
                                 f"{fix}", field) from None
        reason = _reason(text)
        what = "the file is empty" if path.stat().st_size == 0 else \
            f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        raise LensbenchError(f"{path} is not a readable Lightning checkpoint ({what}; cut short by a stopped copy "
                             f"or a full disk, or not a checkpoint?); {fix}", field) from None
    missing = [k for k in ("state_dict", "global_step", "loops") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise LensbenchError(f"{path} is not a Lightning checkpoint of lensbench fit (it has no {', '.join(missing)}); "
                             f"{fix}", field)
    return checkpoint


def _reason(text: str) -> str:
    """The line of a torch.load error that says what is wrong (torch's advice around it left out)."""
    if text.startswith("Weights only load failed"):
        found = re.search(r"WeightsUnpickler error: \s*(\S[^\n]*)", text)
        return found.group(1).strip()[:120] if found else ""
    return (text.splitlines() or [""])[0].split(". This is")[0][:120]


def stored_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The ``model.*`` and ``data.*`` settings a checkpoint was trained with, flattened as in
    run.json (the data's only where the checkpoint holds them)."""
    from ..run_identity import flatten

    sections = {"model": checkpoint.get("hyper_parameters"), "data": checkpoint.get("datamodule_hyper_parameters")}
    out: dict[str, Any] = {}
    for name, values in sections.items():
        if isinstance(values, dict):
            out.update(flatten({name: {k: v for k, v in values.items() if k not in NOT_SETTINGS}}))
    return json.loads(json.dumps(out, default=str))


def changed_settings(checkpoint: dict[str, Any], identity: dict[str, Any], free: tuple[str, ...]) -> list[str]:
    """``key: <stored> there, <asked> here`` for each setting (outside ``free``) the checkpoint was
    trained with and the config asks otherwise; a section the checkpoint does not hold is not compared."""
    from ..run_identity import is_free

    stored = {k: v for k, v in stored_settings(checkpoint).items() if not is_free(k, free)}
    sections = {k.split(".", 1)[0] for k in stored}
    asked = {k: v for k, v in json.loads(json.dumps(identity, default=str)).items()
             if k.split(".", 1)[0] in sections and not is_free(k, free)}
    missing = object()
    return [f"{k}: {_show(stored.get(k, missing))} there, {_show(asked.get(k, missing))} here"
            for k in sorted(set(stored) | set(asked)) if stored.get(k, missing) != asked.get(k, missing)]


def _show(value: Any) -> str:
    return "unset" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else json.dumps(value)


def refuse_other_settings(path: Path, checkpoint: dict[str, Any], identity: dict[str, Any], free: tuple[str, ...],
                          field: str, fix: str) -> None:
    changed = changed_settings(checkpoint, identity, free)
    if changed:
        shown = "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")
        raise LensbenchError(f"{path} was trained with other settings ({shown}); {fix}", field)


def inexact(checkpoint: dict[str, Any]) -> bool:
    """Whether ``checkpoint`` was written when training ended (as an older lensbench let
    ModelCheckpoint do): Lightning had counted the epoch finished while its batch count was not yet
    reset, so a resume starts the next epoch at that count and trains other batches than an
    uninterrupted run. ``LastCheckpoint`` writes none such (only inside a batch or after its validation)."""
    loops = checkpoint.get("loops")
    fit = loops.get("fit_loop") if isinstance(loops, dict) else None
    if not isinstance(fit, dict):
        return False
    epochs = (fit.get("epoch_progress") or {}).get("total") or {}
    batches = fit.get("epoch_loop.batch_progress") or {}
    total, current = batches.get("total") or {}, batches.get("current") or {}
    return (bool(epochs) and epochs.get("ready") == epochs.get("completed")  # no epoch under way
            and total.get("processed") == total.get("completed")  # saved outside a batch
            and (current.get("completed") or 0) > 0)  # yet the batch count of the finished epoch kept


def reached(checkpoint: dict[str, Any], max_steps: int | None) -> int | None:
    """The checkpoint's step when it already reached ``max_steps`` (nothing left to train), else None."""
    step = checkpoint.get("global_step")
    if isinstance(step, int) and max_steps is not None and max_steps > 0 and step >= max_steps:
        return step
    return None


class FolderLock:
    """``<run_dir>/.lock``, held exclusively while a run lasts (``take``); ``release(undo=True)`` also
    removes the folders ``take`` made when they hold nothing else (a refused run leaves none)."""

    def __init__(self, run_dir: Path, field: str) -> None:
        self.run_dir, self.field = Path(run_dir), field
        self.handle: Any = None
        self.made: Path | None = None  # the topmost folder take made

    def take(self) -> None:
        from ..run_folders import FIT_MARKERS, LOCK_FILE, check_is_run_folder, try_lock

        check_is_run_folder(self.run_dir, self.field, FIT_MARKERS)  # a user's folder is not taken over
        for folder in (self.run_dir, *self.run_dir.parents):
            if folder.exists():
                break
            self.made = folder
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.handle = try_lock(self.run_dir / LOCK_FILE)
        if self.handle is None:
            self.made = None
            raise LensbenchError(f"another lensbench run is writing {self.run_dir}; wait for it to finish, or set "
                                 "another experiment name", self.field)

    def release(self, undo: bool = False) -> None:
        from ..run_folders import LOCK_FILE

        if self.handle is None:
            return
        if undo and self.made is not None:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
            folder = self.run_dir
            while True:
                try:
                    folder.rmdir()  # only an empty one
                except OSError:
                    break
                if folder == self.made:
                    break
                folder = folder.parent
        self.handle.close()  # closing releases the lock
        self.handle = None
