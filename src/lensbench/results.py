"""Result shards: one JSONL file per rank, appended one whole, fsync'ed line per work item.

A kill at any moment leaves at most one torn last line, which readers ignore and the next writer
cuts off before appending. Records carry their work item's key; reading all shards and keeping
the first record of each key gives the stored results, whatever number of ranks wrote them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import LensbenchError

SHARD_DIR = "shards"


class ResultStore:
    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / SHARD_DIR
        self._fh = None

    # -- writing ------------------------------------------------------------------------------
    def open_shard(self, rank: int, attempt: str = "") -> Path:
        """Open this rank's shard for appending, cutting off a torn last line first."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank{rank:05d}{attempt}.jsonl"
        if path.exists():
            _truncate_torn_tail(path)
        self._fh = open(path, "ab", buffering=0)  # unbuffered: nothing is left to flush when a write fails
        return path

    def write(self, key: str, record: dict[str, Any]) -> None:
        """Append one record (one line written whole, then fsync'ed). A write that fails midway (a
        full disk) leaves a torn last line, which readers ignore and the next writer cuts off."""
        line = memoryview((json.dumps({"key": key, **record}, ensure_ascii=False, allow_nan=True) + "\n")
                          .encode("utf-8"))
        try:
            while line:
                line = line[self._fh.write(line):]
            os.fsync(self._fh.fileno())
        except OSError as exc:  # name the shard in the one-line error
            raise OSError(exc.errno, exc.strerror, str(self._fh.name)) from None

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close()

    # -- reading ------------------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("*.jsonl")) if self.dir.exists() else []

    def records(self) -> Iterator[dict[str, Any]]:
        """Every complete record, first occurrence of each key only, ordered by key."""
        seen: dict[str, dict[str, Any]] = {}
        for path in self.shards():
            for record in _read_shard(path):
                seen.setdefault(record["key"], record)
        for key in sorted(seen):
            yield seen[key]

    def has_records(self) -> bool:
        """Whether any shard holds a complete line (a record, or a corrupt line that reading names):
        reads each shard only up to its first complete line."""
        for path in self.shards():
            with open(path, "rb") as fh:
                for line in fh:
                    if line.endswith(b"\n") and line.strip():
                        return True
        return False

    def keys(self) -> set[str]:
        return {r["key"] for path in self.shards() for r in _read_shard(path)}

    def digests(self) -> dict[str, str | None]:
        """Stored key -> the content digest of its unit (None for records stored without one)."""
        out: dict[str, str | None] = {}
        for path in self.shards():
            for record in _read_shard(path):
                out.setdefault(record["key"], record.get("digest"))
        return out


def _read_shard(path: Path) -> Iterator[dict[str, Any]]:
    lines = path.read_bytes().split(b"\n")
    # The part after the last newline is empty for a clean file, a torn record otherwise.
    for lineno, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LensbenchError(
                f"{path}:{lineno} is corrupt (not a torn last line); delete that line or the shard to recompute it"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            raise LensbenchError(
                f"{path}:{lineno} is corrupt (not a record with a key); delete that line or the shard to recompute it")
        yield record


def _truncate_torn_tail(path: Path) -> None:
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
            fh.flush()
            os.fsync(fh.fileno())
