"""What the benchmarks of bench/ share: the machine, timing sides alternately, the disturbance check,
medians and ratios as text, and rewriting one marked part of a docs file.

- machine: ``cpu_name()`` ("<model>, N cores"), ``machine()`` (versions, load average, commit);
- timing: ``rotated(names, rep)`` is the order of repetition ``rep`` (each side first in turn), and
  ``alternate(sides, reps)`` times every side once per repetition in that order, in one process, so
  the sides' ratios come from one run (docs/benchmarks.md: "measured side by side in one run");
- disturbance: ``busy_cpu_seconds`` (the whole machine, /proc/stat), ``process_cpu_seconds`` (one
  process), ``OthersCpu`` (what other processes took meanwhile), ``is_disturbed``, ``wait_quiet``
  and ``least_disturbed`` (run again while others took too much of a core; keep the least disturbed);
- text: ``median``, ``fmt_s``, ``fmt_ms``, ``verdict``, ``table``, ``report``;
- docs: ``replace_sections(path, {marker: lines})`` rewrites each marked part of ``path`` and leaves
  the rest byte for byte: a marker ``"## Heading"`` is that heading's section (up to the next ``## ``
  heading or the end), ``"findings:NAME"`` the lines between ``<!-- findings:NAME -->`` and
  ``<!-- /findings:NAME -->``. A marker not in the file stops the script with one line
  (``MissingMarker``) before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
# Variables that would make Lightning (or torch.distributed) believe an external launcher started a process.
LAUNCHER_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK",
                 "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS")


# -- the machine -----------------------------------------------------------------------------------
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} when it cannot be read)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model(detail: bool = False) -> str:
    """The CPU's model name; with ``detail`` its family, model and stepping too."""
    fields = _cpuinfo()
    cpu = fields.get("model name") or platform.processor() or "unknown CPU"
    if detail and "cpu family" in fields:
        cpu += f" (family {fields['cpu family']}, model {fields.get('model', '?')}, stepping {fields.get('stepping', '?')})"
    return cpu


def cpu_name() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores"


def load_average() -> list[str] | None:
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return None


def commit(dirty: str | None = None) -> str | None:
    """The short commit of HEAD (read-only git queries), with a note when ``dirty`` (a path) differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode != 0:
            return None
        changed = dirty and subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--", dirty], cwd=ROOT).returncode
        return head.stdout.strip() + (f" with uncommitted changes in {dirty}/" if changed else "")
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """CPU (detailed), cores this process may use, library versions, load average, commit, CUDA device."""
    import lightning
    import torch
    import transformers

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"commit": commit("src"), "cpu": cpu_model(detail=True), "cores": cores, "torch": torch.__version__,
            "transformers": transformers.__version__, "lightning": lightning.__version__,
            "python": platform.python_version(), "load": load_average(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# -- timing ----------------------------------------------------------------------------------------
def now() -> float:
    """CLOCK_MONOTONIC: comparable across the processes of one Linux machine."""
    return time.monotonic()


def rotated(names: list[str], rep: int) -> list[str]:
    """The order of repetition ``rep``: ``names`` rotated by ``rep`` (two sides: alternating)."""
    names = list(names)
    k = rep % len(names) if names else 0
    return names[k:] + names[:k]


def alternate(sides: dict[str, Callable[[], Any]], reps: int, warmup: int = 0,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each side's call: ``warmup`` untimed rounds, then ``reps`` rounds in ``rotated`` order."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for rep in range(reps):
        for name in rotated(list(sides), rep):
            t0 = clock()
            sides[name]()
            times[name].append(clock() - t0)
    return times


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment for a measured child: no launcher variables, offline, unbuffered."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra})
    return env


def run_json(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> dict:
    """Run ``argv`` in a fresh process; the last line of its output that is a JSON object."""
    proc = subprocess.run(argv, cwd=cwd, env=clean_env() if env is None else env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"failed (exit {proc.returncode}): {argv[3:] if argv[1:2] == ['-c'] else argv}\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# -- the disturbance check ---------------------------------------------------------------------------
def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all processes, steal included) since boot; nan
    when /proc/stat cannot be read."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int | None = None) -> float:
    """user+sys CPU seconds of this process (``pid`` None) or of a running one (0 when unreadable)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class OthersCpu:
    """The CPU other processes take from now on: the machine's busy time less the measured process's.

    ``busy`` and ``own`` are the two counters (``own``: this process unless told); ``seconds(own=...)``
    takes the measured process's CPU when it is known otherwise (a child's rusage)."""

    def __init__(self, busy: Callable[[], float] = busy_cpu_seconds,
                 own: Callable[[], float] = process_cpu_seconds, clock: Callable[[], float] = time.perf_counter):
        self.busy, self.own, self.clock = busy, own, clock
        self.busy0, self.own0, self.wall0 = busy(), own(), clock()

    def wall(self) -> float:
        return self.clock() - self.wall0

    def seconds(self, own: float | None = None) -> float:
        """CPU seconds others took so far (nan when the machine's counter cannot be read)."""
        own = self.own() - self.own0 if own is None else own
        others = self.busy() - self.busy0 - own
        return others if math.isnan(others) else max(others, 0.0)

    def share(self, own: float | None = None) -> float:
        """``seconds`` as a share of the wall time so far (1.0: one core taken)."""
        return self.seconds(own) / max(self.wall(), 1e-9)


def is_disturbed(others: float, wall: float, fraction: float, slack: float = 0.0) -> bool:
    """Others took more than ``fraction`` of ``wall`` (plus ``slack`` seconds) in CPU (nan, unknown: not)."""
    return others > fraction * wall + slack


def wait_quiet(limit: float, max_wait: float, sample: float = 1.0, sleep: Callable[[float], None] = time.sleep,
               watch: Callable[[], OthersCpu] = OthersCpu) -> float:
    """Wait, at most ``max_wait`` s, until other processes take at most ``limit`` of a core over
    ``sample`` s; returns the seconds waited (0 when ``max_wait`` is 0)."""
    waited = 0.0
    while waited < max_wait:
        probe = watch()
        sleep(sample)
        share = probe.share()
        waited += probe.wall()
        if not share > limit:  # nan (no /proc/stat): nothing to wait for
            break
    return waited


def least_disturbed(attempt: Callable[[], tuple[Any, float]], retries: int, limit: float, max_wait: float,
                    sample: float = 3.0, label: str = "attempt", wait: Callable[..., float] = wait_quiet):
    """``attempt()`` -> (result, others' share of a core) once the machine is quiet, again (up to
    ``retries`` times) while the share is above ``limit``. Returns the least disturbed result, its
    share and the attempts made."""
    best = None
    for n in range(1, retries + 2):
        waited = wait(limit, max_wait, sample)
        if waited > sample + 0.5:
            print(f"  (waited {waited:.0f} s for a quiet machine)")
        result, share = attempt()
        if best is None or share < best[1]:
            best = (result, share)
        if not share > limit:
            break
        print(f"  ({label} {n} disturbed: other processes took {share:.0%} of a core meanwhile)")
    return best[0], best[1], n


# -- figures as text ---------------------------------------------------------------------------------
def median(values) -> float:
    return statistics.median(values)


def fmt_s(x: float) -> str:
    """Seconds: "1.23 s", or "45.6 ms" under 0.1 s."""
    return f"{x:.2f} s" if x >= 0.1 else f"{x * 1000:.1f} ms"


def fmt_ms(x: float, digits: int = 2, small: int | None = None) -> str:
    """Seconds in milliseconds with ``digits`` decimals (``small`` decimals under 10 ms)."""
    return f"{x * 1e3:.{small if small is not None and x < 0.01 else digits}f} ms"


def verdict(value: float, goal: float, goal_text: str | None = None, strict: bool = False) -> str:
    """'within the goal G' when ``value`` <= ``goal`` (< with ``strict``), else 'ABOVE the goal G'."""
    met = value < goal if strict else value <= goal
    return f"{'within' if met else 'ABOVE'} the goal {goal if goal_text is None else goal_text}"


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    """A markdown table; ``align`` one separator per column (default ``---``)."""
    return ["| " + " | ".join(map(str, header)) + " |", "| " + " | ".join(align or ["---"] * len(header)) + " |",
            *["| " + " | ".join(map(str, row)) + " |" for row in rows]]


def date_utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def report(heading: str, intro: str, machine: str, rows: dict[str, str], footer: str,
           path: Path = BENCHMARKS) -> Path:
    """Write a benchmark's section of ``path``: intro, machine and date, the figures as a table, a footer."""
    lines = [intro, "", f"- machine: {machine}", f"- date: {date_utc()}", "",
             *table(["figure", "value"], [[k, v] for k, v in rows.items()]), "", footer]
    return replace_sections(path, {heading: lines})


# -- docs ----------------------------------------------------------------------------------------------
class MissingMarker(SystemExit):
    """A marker to rewrite is not in the docs file: the script stops with this one line."""


def _span(text: str, marker: str) -> tuple[int, int, str] | None:
    """Where the rewritable part of ``marker`` lies in ``text``: (start, end, what to put before the lines)."""
    if marker.startswith("#"):
        heading = re.search(rf"^{re.escape(marker)}[ \t]*\n", text, re.M)
        if not heading:
            return None
        nxt = re.compile(r"\n## ").search(text, heading.end() - 1)
        return heading.end() - 1, nxt.start() if nxt else len(text), "\n\n"
    start = re.search(rf"^<!-- {re.escape(marker)} -->", text, re.M)  # a comment that begins a line
    end = re.compile(rf"^<!-- /{re.escape(marker)} -->", re.M).search(text, start.end()) if start else None
    return (start.end(), end.start(), "\n") if end else None


def _describe(marker: str) -> str:
    return f"section '{marker}'" if marker.startswith("#") else f"block <!-- {marker} --> ... <!-- /{marker} -->"


def read_section(path: Path, marker: str) -> str:
    """The current text of ``marker``'s part of ``path`` (what ``replace_sections`` would replace)."""
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    span = _span(text, marker)
    if span is None:
        raise MissingMarker(f"{path}: no {_describe(marker)} to rewrite; add it by hand first")
    return text[span[0]:span[1]]


def replace_sections(path: Path, blocks: dict[str, list[str]]) -> Path:
    """Rewrite each marked part of ``path`` with its lines; everything else stays byte for byte.

    A marker starting with '#' is a heading: its section becomes the heading, a blank line and the
    lines, up to the next '## ' heading (kept after one blank line) or the end of the file. Any other
    marker NAME is the block between ``<!-- NAME -->`` and ``<!-- /NAME -->``, whose lines go between
    the two comments. Every marker is looked up before anything is written."""
    path = Path(path)
    for marker in blocks:
        read_section(path, marker)
    text = path.read_text(encoding="utf-8")
    for marker, lines in blocks.items():
        start, end, before = _span(text, marker)
        body = "\n".join(lines).strip("\n") if before == "\n" else "\n".join(lines).rstrip("\n")
        text = text[:start] + before + body + "\n" + text[end:]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path

