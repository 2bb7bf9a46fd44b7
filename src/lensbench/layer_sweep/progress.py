"""progress.csv: one row per (checkpoint, layer, task) evaluation, appended as each one finishes.

Every rank appends whole lines with one ``write`` on a file opened with ``O_APPEND`` (on a local
file system the kernel keeps concurrent appends of one write each from interleaving), so a person
can ``tail -f`` a long sweep. A killed run may leave a row whose work item was not stored (it is
evaluated again on resume); the merge rewrites the file from the stored records, one row per
(checkpoint, layer, task).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

PROGRESS = "progress.csv"
COLUMNS = ("model", "revision", "state", "layer", "task", "status", "main_score", "duration_s", "time")


def _line(values: list[Any]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue().encode("utf-8")


def start(run_dir: Path) -> Path:
    """Create ``progress.csv`` with its header when missing (rank 0, before any rank appends)."""
    path = Path(run_dir) / PROGRESS
    if not path.exists() or path.stat().st_size == 0:
        append_line(path, _line(list(COLUMNS)))
    return path


def append_line(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def append(run_dir: Path, row: dict[str, Any]) -> None:
    append_line(Path(run_dir) / PROGRESS, _line([_fmt(row.get(c)) for c in COLUMNS]))


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.10g}"
    return "" if value is None else value
