"""A fork server for the reliability tests: imports torch, Lightning, transformers and lensbench
once, then runs each job as ``sys.exit(lensbench.cli.main())`` in a forked child, which is what
the ``lensbench`` console script does, minus the ~7 s of imports each subprocess would pay.

Protocol (one JSON line each way): a batch ``{"jobs": [...], "parallel": n}`` on stdin; the
answer ``{"results": {id: {"returncode", "stdout", "stderr", "fault"}}}`` on stdout. A job:
``{"id", "args", "cwd", "env", "fault"}``; ``fault`` (optional) injects one fault into the child:

- ``{"signal": "SIGKILL"|"SIGTERM"|"SIGINT", "glob": pattern, "lines": n}``: send the signal
  once the files matching ``glob`` (relative to cwd) hold at least ``n`` lines in all;
  (any signal: SIGSTOP makes a rank that hangs without dying); with ``"then_kill": true`` the
  child is SIGKILLed once every other job of its gang has ended (a stopped rank, cleaned up);
- ``{"fsize": bytes}``: RLIMIT_FSIZE of the child, with SIGXFSZ ignored (a write past the limit
  then fails with EFBIG, as on a full disk).

A job may name a ``"gang"``: the ranks of one DDP run (each with ``LOCAL_RANK``, ``MASTER_PORT``
... in its env, as an external launcher such as srun or torchrun starts them). A gang's jobs are
started together, even beyond ``parallel``, so no rank waits for a slot its peers hold. Each
result also carries ``fired_at`` (when the fault's signal was sent, else null) and ``ended_at``
(when the child was reaped), as ``time.time()``.

A returncode is negative (-signal) when the child died of a signal, as with ``subprocess``.
Children never run torch code in this process before the fork, so forking is safe.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback

import jsonargparse  # noqa: F401
import lightning.pytorch  # noqa: F401
import lightning.pytorch.cli  # noqa: F401
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402,F401
import pandas  # noqa: E402,F401
import transformers  # noqa: E402,F401

import lensbench.analysis  # noqa: E402,F401
import lensbench.cli  # noqa: E402
import lensbench.data.modules  # noqa: E402,F401
from lensbench.plugins import BUILTIN  # noqa: E402

try:  # layer_sweep imports mteb lazily; importing it here spares each of its jobs ~3 s
    import mteb  # noqa: F401
except ImportError:
    pass

for _name in BUILTIN:  # the analyses and what they import; the registries are built per job
    importlib.import_module(_name)
importlib.import_module("lensbench.training.cli")


def _child(job: dict, out: str, err: str) -> None:
    os.setsid()
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    fault = job.get("fault") or {}
    if "fsize" in fault:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fault["fsize"], fault["fsize"]))
    sys.argv = ["lensbench", *job["args"]]
    code = 1
    try:
        code = lensbench.cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:  # what the interpreter does with an uncaught KeyboardInterrupt
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - an uncaught exception: a traceback and exit status 1
        traceback.print_exc()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code if isinstance(code, int) else 1)


def _lines(cwd: str, pattern: str) -> int:
    total = 0
    for path in glob.glob(os.path.join(cwd, pattern)):
        try:
            with open(path, "rb") as fh:
                total += fh.read().count(b"\n")
        except OSError:
            pass
    return total


def run_batch(jobs: list[dict], parallel: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="lensbench-forks-")
    pending = list(jobs)
    running: dict[int, tuple[dict, str, str]] = {}
    results: dict[str, dict] = {}
    fired: dict[str, float] = {}
    killed_after: set[str] = set()
    while pending or running:
        while pending and len(running) < parallel:
            gang = pending[0].get("gang")
            start = [j for j in pending if gang is not None and j.get("gang") == gang] if gang is not None \
                else [pending[0]]
            for job in start:
                pending.remove(job)
                out, err = (os.path.join(tmp, f"{len(results) + len(running)}-{job['id']}.{s}") for s in ("out", "err"))
                for path in (out, err):  # made here: a fault may kill the child before it opens them
                    open(path, "w").close()
                pid = os.fork()
                if pid == 0:
                    _child(job, out, err)
                running[pid] = (job, out, err)
        for pid, (job, _, _) in list(running.items()):
            fault = job.get("fault") or {}
            if "signal" in fault and job["id"] not in fired and _lines(job["cwd"], fault["glob"]) >= fault["lines"]:
                os.kill(pid, getattr(signal, fault["signal"]))
                fired[job["id"]] = time.time()
            if fault.get("then_kill") and job["id"] in fired and job["id"] not in killed_after and not any(
                    other.get("gang") == job.get("gang") and other["id"] != job["id"]
                    for other, _, _ in running.values()) and not any(
                    other.get("gang") == job.get("gang") for other in pending):
                os.kill(pid, signal.SIGKILL)
                killed_after.add(job["id"])
        time.sleep(0.002)
        for pid, (job, out, err) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            ended = time.time()
            del running[pid]
            with open(out, errors="replace") as fo, open(err, errors="replace") as fe:
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                results[job["id"]] = {"returncode": code, "stdout": fo.read(), "stderr": fe.read(),
                                      "fault": job["id"] in fired, "fired_at": fired.get(job["id"]),
                                      "ended_at": ended}
            try:  # a DDP child or a stray grandchild of the job's session
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
    return results


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        batch = json.loads(line)
        try:
            answer = {"results": run_batch(batch["jobs"], int(batch.get("parallel", 2)))}
        except Exception:  # noqa: BLE001
            answer = {"error": traceback.format_exc()}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
