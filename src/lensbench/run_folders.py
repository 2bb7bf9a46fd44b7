"""Run folders: the one place a run writes, and the checks that keep it there.

A run folder is ``<output_dir>/<experiment>``. The experiment is a relative name inside
``output_dir`` (slashes make sub-folders; ``..`` and absolute paths are refused), so a run never
writes outside ``output_dir``. A folder is a run folder when lensbench made it: every run makes
``.lock`` in it before anything else. An existing folder that holds other files and no ``.lock``
is refused, so a run never takes over (and overwrites) a user's files, even one holding a
``run.json`` of another tool; an empty folder is taken. (Fit folders of older versions, which
made no ``.lock``, are known by their ``run.json`` or run log: see ``FIT_MARKERS``.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import LensbenchError

LOCK_FILE = ".lock"
IDENTITY_FILE = "run.json"
CONFIG_FILE = "config.yaml"  # the resolved config a run was started with
#: Files that only a lensbench run makes in its folder.
MARKERS = (LOCK_FILE,)
#: ... and in a fit folder, whose older versions made no ``.lock`` (refused further on when its
#: ``run.json`` records other settings).
FIT_MARKERS = (LOCK_FILE, IDENTITY_FILE, "logs/rank0.log")
EXPERIMENT_FIELD = "model.init_args.experiment"


def run_folder(output_dir: str | os.PathLike, experiment: Any, field: str = EXPERIMENT_FIELD) -> Path:
    """``output_dir / experiment`` once ``experiment`` is known to name a folder inside ``output_dir``."""
    if not isinstance(experiment, str) or not experiment.strip():
        raise LensbenchError(f"must name the run, got {experiment!r}; use a relative name such as my_run or "
                             "study/run1", field)
    path = Path(experiment)
    if path.is_absolute():
        raise LensbenchError(f"{experiment!r} is an absolute path; the experiment is a name inside output_dir: "
                             "set output_dir to the parent folder and experiment to the run's name", field)
    if ".." in path.parts:
        raise LensbenchError(f"{experiment!r} climbs out of output_dir with '..'; use a name inside output_dir "
                             "(slashes make sub-folders), or set output_dir", field)
    if not [part for part in path.parts if part != "."]:
        raise LensbenchError(f"{experiment!r} names output_dir itself; use a name inside it, such as my_run", field)
    return Path(output_dir) / path


def check_is_run_folder(path: Path, field: str = EXPERIMENT_FIELD, markers: tuple[str, ...] = MARKERS) -> None:
    """Refuse an existing ``path`` that lensbench did not make: a file, or a folder holding files but
    none of ``markers`` (paths relative to it; by default ``.lock``). A missing or empty folder
    passes."""
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise LensbenchError(f"{path} exists and is not a folder; set another experiment name", field)
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return  # unreadable: making the lock there names the problem
    if names and not any(os.path.lexists(path / marker) for marker in markers):
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise LensbenchError(f"{path} is not a lensbench run folder (it holds {shown}); lensbench writes only into "
                             "a folder it made or an empty one: set another experiment name", field)


class DamagedRunFile(LensbenchError):
    """A file of a run folder that lensbench wrote but cannot read back (cut short, edited)."""


def read_identity(path: Path, field: str = EXPERIMENT_FIELD) -> dict[str, Any]:
    """The settings ``run.json`` records (a JSON object); a damaged file is one line."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        cut = isinstance(exc, json.JSONDecodeError) and (exc.msg.startswith("Unterminated")
                                                          or exc.pos >= len(exc.doc.rstrip()))
        why = ("cut short" if cut else f"not JSON: {exc.msg} at line {exc.lineno}"
               if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text")
        raise DamagedRunFile(f"{path} is damaged ({why}); it records what a resume must match: restore it, or set "
                             "another experiment name", field) from None
    if not isinstance(value, dict):
        raise DamagedRunFile(f"{path} is damaged (a JSON {type(value).__name__}, not an object); it records what a "
                             "resume must match: restore it, or set another experiment name", field)
    return value


def try_lock(path: Path) -> Any:
    """The open, exclusively locked ``path``; None when another process holds it. The file stays
    empty (a failed run changes nothing); where fcntl is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return open(path, "a", encoding="utf-8")
    handle = open(path, "a", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a temporary file beside it, flushed and
    synced, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
