"""Helpers for the CLI tests: a shared work folder and running several console-script calls at once.

Each ``lensbench`` subprocess spends ~5 s importing torch/Lightning/transformers, almost all of it on
one core; running independent calls concurrently keeps every core busy and the test set fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import clean_env, lensbench
from tiny import write_texts

RUN_YAML = (
    "model:\n  class_path: activation_norms\n  init_args:\n    models: [tiny]\n"
    "data:\n  class_path: lensbench.data.modules.TextDataModule\n  init_args:\n"
    "    datasets: [alpha.txt, beta.txt]\n    batch_size: 4\n"
    "trainer:\n  accelerator: cpu\n  devices: 1\n"
)


def make_workdir(folder: Path, tiny_model: Path) -> Path:
    """The same layout as conftest's ``workdir`` fixture, in a folder of the caller's choosing."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny").symlink_to(tiny_model)
    write_texts(folder / "alpha.txt", 23, seed=1)
    write_texts(folder / "beta.txt", 9, seed=2)
    (folder / "run.yaml").write_text(RUN_YAML)
    return folder


def run_many(calls: dict[str, tuple[tuple[str, ...], Path, dict | None]]) -> dict[str, subprocess.CompletedProcess]:
    """Run ``{id: (args, cwd, env)}`` concurrently through the real console script."""
    workers = max(2, min(len(calls), 2 * (os.cpu_count() or 1), 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {cid: pool.submit(lensbench, *args, cwd=cwd, env=env or clean_env())
                   for cid, (args, cwd, env) in calls.items()}
        return {cid: fut.result() for cid, fut in futures.items()}


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sigkill_when_stored(args: list[str], cwd: Path, shard: Path, lines: int, env: dict | None = None) -> int:
    """Start ``lensbench *args``, SIGKILL it once ``shard`` holds ``lines`` lines (or after 900 s, a guard against a hang),
    and return the lines the shard holds then. Fails when the run ended before the kill."""
    proc = subprocess.Popen(["lensbench", *args], cwd=cwd, env=env or clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and not (
            shard.exists() and shard.read_bytes().count(b"\n") >= lines):
        time.sleep(0.005)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended (exit {proc.returncode}) before the kill"
    return shard.read_bytes().count(b"\n")
