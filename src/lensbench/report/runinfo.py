"""What a run folder says about its run, for a report's header: the config, run.json, the logs
(devices and ranks, wall time, peak memory, warnings) and whether every planned work item is stored."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ..logs import LOG_DIR
from ..results import ResultStore
from ..run_folders import CONFIG_FILE, IDENTITY_FILE

#: The planned work items' keys (a JSON list), written by rank 0 when the run's work is planned; in
#: logs/, beside the run's logs, because it records what the last run set out to do, not a result.
PLAN_FILE = f"{LOG_DIR}/plan.json"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) ")
_PLANNED = re.compile(r"lensbench: (\d+) work items, (\d+) already stored")
_RANK = re.compile(r"rank (\d+)/(\d+) on (\S+): results to")
_GIB = re.compile(r"(rss|cuda allocated|reserved) (\d+(?:\.\d+)?) GiB")
#: Shown missing keys at most (the rest counted).
SHOWN_MISSING = 20


@dataclass
class RunInfo:
    run_dir: Path
    config_text: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    ranks: dict[int, str] = field(default_factory=dict)  # rank -> device
    world_size: int | None = None
    wall_s: float | None = None
    sessions: int = 0
    peak_gib: dict[str, float] = field(default_factory=dict)  # rss, cuda allocated, reserved
    warnings: list[str] = field(default_factory=list)
    planned: int | None = None
    stored: int = 0
    missing: list[str] = field(default_factory=list)
    stopped: str | None = None  # the last session's "run stopped" line

    @property
    def class_path(self) -> str:
        model = self.config.get("model")
        return str(model.get("class_path", "")) if isinstance(model, dict) else ""

    @property
    def complete(self) -> bool:
        return self.planned is not None and not self.missing and self.stored >= self.planned and not self.stopped

    def state(self) -> str:
        """One line: complete, or partial and what is missing."""
        if self.planned is None:
            return f"unknown (no plan recorded; {self.stored} work items stored)"
        if self.complete:
            return f"complete: all {self.planned} planned work items stored"
        line = f"partial: {self.stored} of {self.planned} planned work items stored"
        n = len(self.missing) or max(self.planned - self.stored, 0)
        line += f", {n} missing"
        if self.stopped:
            line += f"; {self.stopped}"
        return line


def read_run(run_dir: Path) -> RunInfo:
    """Everything the header shows, from ``run_dir``'s files; a missing file leaves its part empty."""
    run_dir = Path(run_dir)
    info = RunInfo(run_dir)
    path = run_dir / CONFIG_FILE
    if path.is_file():
        info.config_text = path.read_text(encoding="utf-8", errors="replace")
        try:
            loaded = yaml.safe_load(info.config_text)
            info.config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            pass
    try:
        loaded = json.loads((run_dir / IDENTITY_FILE).read_text(encoding="utf-8"))
        info.identity = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass
    _read_logs(info, sorted((run_dir / LOG_DIR).glob("rank*.log")))
    try:
        keys = ResultStore(run_dir).keys()
    except Exception:  # noqa: BLE001 - a corrupt shard: the report still shows the rest
        keys = set()
    info.stored = len(keys)
    try:
        plan = json.loads((run_dir / PLAN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        plan = None
    if isinstance(plan, list):
        info.planned = len(plan)
        info.missing = [k for k in plan if k not in keys]
        info.stored = len(plan) - len(info.missing)
    return info


def _read_logs(info: RunInfo, logs: list[Path]) -> None:
    seen: set[str] = set()
    for log in logs:
        first = last = None
        total = 0.0
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            stamp = _STAMP.match(line)
            if stamp is None:
                continue
            when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(stamp.group(2)) / 1000
            level, message = stamp.group(3), line[stamp.end():].split(": ", 1)[-1]
            planned = _PLANNED.search(line)
            if planned:  # a session starts
                if first is not None:
                    total += last - first
                first = when
                info.sessions += log.name == "rank0.log"
                if log.name == "rank0.log":
                    info.planned = int(planned.group(1))
                    info.stopped = None
            first = when if first is None else first
            last = when
            rank = _RANK.search(line)
            if rank:
                info.ranks[int(rank.group(1))] = rank.group(3)
                info.world_size = int(rank.group(2))
            for kind, gib in _GIB.findall(line):
                info.peak_gib[kind] = max(info.peak_gib.get(kind, 0.0), float(gib))
            if level in ("WARNING", "ERROR", "CRITICAL"):
                text = f"{log.stem}: {level} {message}"
                if text not in seen:
                    seen.add(text)
                    info.warnings.append(text)
                if "run stopped" in message and log.name == "rank0.log":
                    info.stopped = message
        if first is not None:
            total += last - first
            info.wall_s = max(info.wall_s or 0.0, total)
