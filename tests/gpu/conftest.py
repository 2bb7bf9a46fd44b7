"""The GPU suite: every test is marked ``gpu`` and skipped without CUDA (``pytest -m gpu tests/gpu``;
the project's default ``-m 'not slow and not gpu'`` deselects them).

``LENSBENCH_GPU_LOG=<file>`` writes a log there: the device, each test's outcome and duration (with
the reason of a skip or the first lines of a failure), and the lensbench/Lightning log records
emitted meanwhile. bench/gpu_suite.py sets it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch


from .gpu_models import CUDA, save_llama

_LOG: dict = {}
_LOGGERS = ("", "lightning.pytorch", "lensbench.run")


def _log():
    """The open log file (None when LENSBENCH_GPU_LOG is unset), opened with its header once."""
    path = os.environ.get("LENSBENCH_GPU_LOG")
    if not path:
        return None
    if "file" not in _LOG:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a", encoding="utf-8", buffering=1)
        device = (f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible, "
                  f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)") if CUDA else "no CUDA device"
        handle.write(f"# GPU suite {time.strftime('%Y-%m-%d %H:%M:%S')}: {device}, torch {torch.__version__}, "
                     f"CUDA {torch.version.cuda}\n")
        records = logging.StreamHandler(handle)
        records.setFormatter(logging.Formatter("    %(asctime)s %(levelname)s %(name)s: %(message)s"))
        records.setLevel(logging.INFO)
        for name in _LOGGERS:
            logging.getLogger(name).addHandler(records)
        _LOG.update(file=handle, handler=records, counts={})
    return _LOG["file"]


def pytest_runtest_logreport(report) -> None:
    handle = _log()
    if handle is None or (report.when != "call" and not (report.failed or report.skipped)):
        return
    outcome = report.outcome.upper() if report.when == "call" else f"{report.outcome.upper()} in {report.when}"
    line = f"{outcome:18s} {report.duration:7.2f} s  {report.nodeid}"
    if report.skipped and isinstance(report.longrepr, tuple):
        line += f"  ({report.longrepr[2]})"
    handle.write(line + "\n")
    if report.failed:
        text = str(report.longrepr).strip().splitlines()
        handle.write("".join(f"    | {t}\n" for t in text[-30:]))
    _LOG["counts"][report.outcome] = _LOG["counts"].get(report.outcome, 0) + 1


def pytest_sessionfinish(session, exitstatus) -> None:
    handle = _LOG.get("file")
    if handle is None:
        return
    counts = ", ".join(f"{n} {k}" for k, n in sorted(_LOG["counts"].items())) or "nothing ran"
    handle.write(f"# done: {counts}; exit status {int(exitstatus)}\n")
    for name in _LOGGERS:
        logging.getLogger(name).removeHandler(_LOG["handler"])
    handle.close()
    _LOG.clear()


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Path:
    """A small random Llama (4 layers, width 256) with the suite's tokenizer."""
    return save_llama(tmp_path_factory.mktemp("gpu-models") / "llama")


@pytest.fixture(scope="session")
def gemma3(tmp_path_factory) -> Path:
    from lensbench.testing import save_tiny_gemma3

    return save_tiny_gemma3(tmp_path_factory.mktemp("gpu-models") / "gemma3")


@pytest.fixture(scope="session")
def llava(tmp_path_factory) -> Path:
    from lensbench.testing import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("gpu-models") / "llava")


@pytest.fixture(autouse=True)
def _fresh_cuda_memory():
    """Each test starts with the caching allocator emptied and no memory cap."""
    yield
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
