"""Fixtures of the reliability tests: a fork server that runs ``lensbench`` commands without paying
for the imports each time (see forkserver.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


class ForkServer:
    """Runs batches of ``lensbench`` commands in forks of one process that imported everything."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "forkserver.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=HERE)
        ready = self.proc.stdout.readline()
        assert json.loads(ready) == {"ready": True}, ready

    def run(self, jobs: dict[str, dict], parallel: int = 2) -> dict[str, subprocess.CompletedProcess]:
        """``{id: {"args", "cwd", "env", "fault", "gang"}}`` -> ``{id: CompletedProcess}`` (with
        ``.fault``: whether the fault's signal was sent, ``.fired_at`` and ``.ended_at``: when it was
        sent and when the job ended, as ``time.time()``)."""
        batch = [{"id": cid, "args": list(job["args"]), "cwd": str(job["cwd"]), "env": job["env"],
                  "fault": job.get("fault"), "gang": job.get("gang")} for cid, job in jobs.items()]
        self.proc.stdin.write(json.dumps({"jobs": batch, "parallel": parallel}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        assert "results" in answer, answer.get("error")
        out = {}
        for cid, res in answer["results"].items():
            done = subprocess.CompletedProcess(["lensbench", *jobs[cid]["args"]], res["returncode"], res["stdout"],
                                               res["stderr"])
            done.fault = res["fault"]
            done.fired_at, done.ended_at = res.get("fired_at"), res.get("ended_at")
            out[cid] = done
        return out

    def one(self, args, cwd, env, fault=None) -> subprocess.CompletedProcess:
        return self.run({"job": {"args": args, "cwd": cwd, "env": env, "fault": fault}})["job"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def forks():
    from conftest import clean_env

    server = ForkServer(clean_env())
    yield server
    server.close()
