"""Shared by the benchmarks: the machine's name and writing one section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"


def write_section(heading: str, lines: list[str]) -> Path:
    """Replace the section starting with ``heading`` (or append it) in docs/benchmarks.md."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    block = "\n".join([heading, "", *lines]).rstrip("\n") + "\n"
    pattern = re.compile(rf"{re.escape(heading)}\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    DOC.write_text(text.rstrip("\n") + "\n")
    return DOC


def report(heading: str, intro: str, machine: str, rows: dict[str, str], footer: str) -> Path:
    """Write a benchmark's section: intro, machine and date, the figures as a table, a footer."""
    import time

    lines = [intro, "", f"- machine: {machine}", f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "", "| figure | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows.items()], "", footer]
    return write_section(heading, lines)
