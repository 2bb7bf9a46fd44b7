"""The start of a DDP run (src/lensbench/distributed.py): a rendezvous bounded by
LENSBENCH_RENDEZVOUS_TIMEOUT and ended in one line naming MASTER_ADDR:MASTER_PORT, SIGTERM honoured
while a rank waits there, a malformed MASTER_PORT refused before anything starts, and the child
rank of Lightning's launcher stopping when the launching rank 0 is SIGKILLed.

The runs are the real console script. A rank waiting for a rank 0 that never comes is rank 1 of
2 started as an external launcher starts it (``LOCAL_RANK=1``, ``WORLD_SIZE=2``, ``NODE_RANK=0``),
with ``MASTER_ADDR=127.0.0.1`` and a port nothing listens on. Waits are bounded by polls of what the
run writes (its stderr, its shards, /proc), never by a wall-clock assertion.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import clean_env
from tiny import write_texts

from lensbench import distributed
from lensbench.errors import LensbenchError

NORMS = ("predict", "--model", "activation_norms", "--model.init_args.models", "[tiny]",
         "--data", "lensbench.data.modules.TextDataModule", "--data.init_args.datasets", "[texts.txt]",
         "--data.init_args.batch_size", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false")
DDP2 = ("--trainer.devices", "2", "--trainer.strategy", "ddp")


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def root(tmp_path: Path, tiny_model: Path) -> Path:
    (tmp_path / "tiny").symlink_to(tiny_model)
    write_texts(tmp_path / "texts.txt", 400, seed=7)
    return tmp_path


def rank1_alone(root: Path, experiment: str, **env: str) -> subprocess.Popen:
    """Rank 1 of a 2-rank run whose rank 0 never starts; stderr in ``root/<experiment>.err``."""
    err = open(root / f"{experiment}.err", "w")
    run_env = clean_env(LOCAL_RANK="1", NODE_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(free_port()), **env)
    proc = subprocess.Popen(["lensbench", *NORMS, *DDP2, "--model.init_args.experiment", experiment], cwd=root,
                            env=run_env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    err.close()
    proc.port = run_env["MASTER_PORT"]  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, limit: float = 600) -> int:
    """The exit status; a process still running after ``limit`` s (a hang: the bug) is killed."""
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"still running after {limit} s")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("lensbench: error:")]


def test_a_rendezvous_that_never_completes_ends_in_one_line(root):
    proc = rank1_alone(root, "alone", LENSBENCH_RENDEZVOUS_TIMEOUT="3")
    assert finish(proc) == 1
    err = (root / "alone.err").read_text()
    lines = error_lines(err)
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"lensbench: error: MASTER_ADDR: rank 1 of 2 waited 3 s (LENSBENCH_RENDEZVOUS_TIMEOUT) "
                               f"at 127.0.0.1:{proc.port} (MASTER_ADDR:MASTER_PORT) for rank 0, which never came"), lines
    assert not (root / "outputs" / "alone" / "run.json").exists()


def test_sigterm_stops_a_rank_waiting_for_the_others(root):
    """torch's store retries its connection through signals (for its 30-minute default): the
    rank stops at the SIGTERM, in one line, with the default rendezvous timeout of 300 s."""
    proc = rank1_alone(root, "waiting")
    err = root / "waiting.err"
    while proc.poll() is None and "waits for the others" not in err.read_text():
        time.sleep(0.2)
    assert proc.poll() is None, err.read_text()[-3000:]
    assert "(at most 300 s, LENSBENCH_RENDEZVOUS_TIMEOUT)" in err.read_text()
    time.sleep(1)  # inside torch's connect loop
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 128 + signal.SIGTERM
    lines = error_lines(err.read_text())
    assert lines == [f"lensbench: error: stopped by SIGTERM while waiting for the other ranks at 127.0.0.1:{proc.port}; "
                     "nothing was stored: run the same command again"], err.read_text()[-3000:]


def _gone(pid: int) -> bool:
    """Exited (a zombie left to a parent that is gone counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux (prctl, /proc)")
def test_sigkill_of_rank_0_stops_the_rank_it_launched(root):
    """Under Lightning's own launcher rank 0 starts rank 1; rank 0 SIGKILLed mid-run, rank 1 gets
    SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops in its one line, long before its share of
    the 4000 texts is done (without it, it ran on to the end)."""
    write_texts(root / "texts.txt", 4000, seed=7)
    err = open(root / "killed.err", "w")
    proc = subprocess.Popen(["lensbench", *NORMS, *DDP2, "--model.init_args.experiment", "killed"], cwd=root,
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    err.close()
    shard = root / "outputs" / "killed" / "shards" / "rank00001.jsonl"
    try:
        while proc.poll() is None and not (shard.exists() and shard.read_bytes().count(b"\n") >= 5):
            time.sleep(0.05)
        assert proc.poll() is None, (root / "killed.err").read_text()[-3000:]
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(children) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        polls = 0
        while not _gone(children[0]) and polls < 1200:  # 0.1 s apart: two minutes at the most
            time.sleep(0.1)
            polls += 1
        assert _gone(children[0]), "rank 1 is still running after rank 0 was SIGKILLed"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    text = (root / "killed.err").read_text()
    assert "lensbench: error: stopped by SIGTERM; the results stored so far are kept" in text, text[-3000:]
    assert shard.read_bytes().count(b"\n") < 2000  # stopped, not finished


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http", "29500x"])
def test_a_master_port_out_of_range_is_refused(monkeypatch, port):
    monkeypatch.setenv("MASTER_PORT", port)
    with pytest.raises(LensbenchError) as info:
        distributed.check_environment()
    assert info.value.field == "MASTER_PORT"
    assert f"must be a TCP port number in 1..65535, got {port!r}" in str(info.value)


@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf", "nan"])
def test_a_rendezvous_timeout_that_is_not_a_positive_number_is_refused(monkeypatch, value):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv(distributed.RENDEZVOUS_VAR, value)
    with pytest.raises(LensbenchError) as info:
        distributed.check_environment()
    assert info.value.field == "LENSBENCH_RENDEZVOUS_TIMEOUT" and f"got {value!r}" in str(info.value)


def test_the_rendezvous_timeout_defaults_to_five_minutes(monkeypatch):
    monkeypatch.delenv(distributed.RENDEZVOUS_VAR, raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    distributed.check_environment()
    assert distributed.rendezvous_timeout() == 300
    monkeypatch.setenv(distributed.RENDEZVOUS_VAR, "12.5")
    assert distributed.rendezvous_timeout() == 12.5


def test_a_process_not_started_by_the_launcher_ignores_its_mark(monkeypatch):
    """The mark names a live process that is not our parent (here: ourselves): nothing happens."""
    monkeypatch.setenv(distributed.LAUNCHER_VAR, str(os.getpid()))
    monkeypatch.setenv("LOCAL_RANK", "1")
    distributed.end_with_launcher()  # no signal raised, no exception
