"""What lensbench adds to the start of a Lightning DDP run: ``MASTER_PORT`` checked before anything
is built, a rendezvous bounded by ``LENSBENCH_RENDEZVOUS_TIMEOUT`` (its expiry one line naming
``MASTER_ADDR:MASTER_PORT``), SIGTERM and SIGINT honoured while a rank waits for the others, and
child ranks that stop when the process that launched them dies.

torch's rendezvous (``init_process_group``) waits for the other ranks as long as the collective
timeout (``trainer.strategy.init_args.timeout``, 30 minutes by default), inside a C++ call that
retries through signals, so a Python signal handler never runs there. lensbench meets the ranks
first on its own ``TCPStore`` (rank 0 hosts it; torch's store reuses that server, multi-tenant),
bounded by the rendezvous timeout, while a thread woken by the signal (``signal.set_wakeup_fd``)
ends the process in one line; nothing is stored before the ranks meet.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from .errors import LensbenchError

#: Seconds a rank waits for the others when a distributed run starts.
RENDEZVOUS_VAR = "LENSBENCH_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_S = 300.0
#: Set by a process that launches child ranks itself (Lightning's launcher): its pid.
LAUNCHER_VAR = "LENSBENCH_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1


def rendezvous_timeout() -> float:
    """``LENSBENCH_RENDEZVOUS_TIMEOUT`` in seconds (default 300)."""
    text = os.environ.get(RENDEZVOUS_VAR, "").strip()
    if not text:
        return DEFAULT_RENDEZVOUS_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise LensbenchError(f"must be a positive number of seconds, got {text!r}; unset it for the default "
                             f"({DEFAULT_RENDEZVOUS_S:g} s)", RENDEZVOUS_VAR)
    return value


def check_environment() -> None:
    """Refuse a malformed ``MASTER_PORT`` or rendezvous timeout before the trainer is built (torch
    would raise deep inside the rendezvous, in every rank Lightning started)."""
    port = os.environ.get("MASTER_PORT")
    if port is not None:
        try:
            number = int(port.strip())
        except ValueError:
            number = -1
        if not 1 <= number <= 65535:
            raise LensbenchError(f"must be a TCP port number in 1..65535, got {port!r}; set it to a free port "
                                 "(such as 29500) or unset it (Lightning's launcher then picks one)", "MASTER_PORT")
    rendezvous_timeout()


def bounded_start(trainer: Any) -> None:
    """Bound the rendezvous of ``trainer``'s strategy (one that sets up torch.distributed itself) and,
    where Lightning's launcher will start the other ranks from this process, mark them as its
    children (``end_with_launcher``)."""
    strategy = trainer.strategy
    original = getattr(strategy, "setup_distributed", None)
    if original is None or getattr(strategy, "cluster_environment", None) is None:
        return
    try:
        from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
    except ImportError:  # another Lightning layout: no marking
        _SubprocessScriptLauncher = ()
    seconds = rendezvous_timeout()
    if isinstance(strategy.launcher, _SubprocessScriptLauncher):
        os.environ[LAUNCHER_VAR] = str(os.getpid())  # the children's environment is a copy of ours
        _wait_for_children_after_success(strategy.launcher, seconds)

    def setup_distributed() -> None:
        import torch.distributed as dist

        if not dist.is_available() or dist.is_initialized():
            return original()
        strategy.set_world_ranks()
        env = strategy.cluster_environment
        rank, world = env.global_rank(), env.world_size()
        if world <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's agent met them
            return original()
        where = f"{env.main_address}:{env.main_port}"
        with _signals_end_the_wait(where):
            from .logs import console

            console.info(f"lensbench: rank {rank} of {world} waits for the others at {where} "
                         f"(at most {seconds:g} s, {RENDEZVOUS_VAR})")
            held = _meet(env.main_address, int(env.main_port), rank, world, seconds, where)
            try:
                original()
            finally:
                del held

    strategy.setup_distributed = setup_distributed


def _wait_for_children_after_success(launcher: Any, seconds: float) -> None:
    """When this process exits after a run that ended well, wait (at most ``seconds`` in all) for
    the child ranks, which passed the same last barrier, to exit first: its exit sends them SIGTERM
    (``end_with_launcher``). The wait is at exit, not after each launch, because a command that runs
    several steps (``lensbench pipeline``) has its children go on to the next step meanwhile.
    After a failure nothing waits: the children are stopped by this process's exit."""
    launch = launcher.launch

    def launch_and_record(function: Any, *args: Any, **kwargs: Any) -> Any:
        _EXIT_WAIT["ok"] = False
        result = launch(function, *args, **kwargs)
        _EXIT_WAIT["ok"] = True
        if launcher not in _EXIT_WAIT["launchers"]:
            _EXIT_WAIT["launchers"].append(launcher)
        if not _EXIT_WAIT["registered"]:
            import atexit

            atexit.register(_wait_for_children_at_exit, seconds)
            _EXIT_WAIT["registered"] = True
        return result

    launcher.launch = launch_and_record


#: The launchers whose child ranks this process waits for at exit, and whether the last run ended well.
_EXIT_WAIT: dict[str, Any] = {"launchers": [], "ok": False, "registered": False}


def _wait_for_children_at_exit(seconds: float) -> None:
    import subprocess
    import time

    if not _EXIT_WAIT["ok"]:
        return
    deadline = time.monotonic() + seconds
    for launcher in _EXIT_WAIT["launchers"]:
        for proc in getattr(launcher, "procs", []):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return


def _meet(addr: str, port: int, rank: int, world: int, seconds: float, where: str) -> Any:
    """Every rank of ``world`` at ``addr:port`` within ``seconds``: rank 0 hosts the store (torch's
    own store then reuses its server), each rank counts itself in and waits until all have.
    Returns the store, to be held until torch's process group exists."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    timeout = timedelta(seconds=seconds)
    try:
        store = TCPStore(addr, port, world, rank == 0, timeout=timeout, multi_tenant=True)
        if store.add("lensbench/met", 1) == world:
            store.set("lensbench/all", "1")
        store.wait(["lensbench/all"], timeout)
        return store
    except (RuntimeError, ValueError, OSError) as exc:  # torch's DistError family, a name that does not resolve
        text = str(exc).strip()
        first = (text.splitlines() or [type(exc).__name__])[0].strip()
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            raise LensbenchError(f"port {port} is in use on this machine, so rank 0 cannot host the rendezvous at "
                                 f"{where}; set MASTER_PORT to a free port", "MASTER_PORT") from None
        waited = "the other ranks, which never all came" if rank == 0 else "rank 0, which never came"
        raise LensbenchError(f"rank {rank} of {world} waited {seconds:g} s ({RENDEZVOUS_VAR}) at {where} "
                             f"(MASTER_ADDR:MASTER_PORT) for {waited} (torch: {first[:160]}); start every rank with "
                             "the same MASTER_ADDR and MASTER_PORT, rank 0's address reachable from each node, or "
                             f"wait longer with {RENDEZVOUS_VAR}=<seconds>", "MASTER_ADDR") from None


@contextmanager
def _signals_end_the_wait(where: str) -> Iterator[None]:
    """SIGTERM and SIGINT end the process at once, in one line, while this rank waits for the
    others: torch's store retries its connection through signals in C++, where Python's handlers
    never run; a thread woken through ``signal.set_wakeup_fd`` does. Signals left at their default
    or ignored stay so."""
    taken = [s for s in (signal.SIGTERM, signal.SIGINT) if callable(signal.getsignal(s))]
    if threading.current_thread() is not threading.main_thread() or not taken:
        yield
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = {s: signal.signal(s, lambda signum, frame: None) for s in taken}  # the thread handles them
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            try:
                data = os.read(read_end, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in taken:
                    name = signal.Signals(signum).name
                    sys.stderr.write(f"lensbench: error: stopped by {name} while waiting for the other ranks at "
                                     f"{where}; nothing was stored: run the same command again\n")
                    sys.stderr.flush()
                    os._exit(128 + signum)

    thread = threading.Thread(target=watch, name="lensbench-rendezvous-signals", daemon=True)
    thread.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(write_end)  # the thread reads the end of the pipe and returns
        thread.join()
        os.close(read_end)


def end_with_launcher() -> None:
    """In a rank that Lightning's launcher started (its parent's pid in ``LENSBENCH_LAUNCHER_PID``):
    ask Linux for SIGTERM when that parent dies (``PR_SET_PDEATHSIG``), so that a SIGKILLed rank 0
    leaves no rank running; a parent already gone sends it at once. Elsewhere: nothing."""
    pid = os.environ.get(LAUNCHER_VAR, "")
    if not pid.isdigit() or "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = int(pid)
    if os.getppid() != launcher:
        try:
            os.kill(launcher, 0)
            return  # alive, and not our parent: this process was not started by it
        except ProcessLookupError:
            signal.raise_signal(signal.SIGTERM)  # it died before we got here
            return
        except PermissionError:
            return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return
    if os.getppid() != launcher:  # it died between the check and the request
        signal.raise_signal(signal.SIGTERM)
