"""Run logs: every rank writes ``<run folder>/logs/rank<r>.log`` beside the console.

Two loggers serve every analysis:

- ``console`` (``lightning.pytorch.lensbench``): what the user should see (model loads, warnings);
  it prints like Lightning's own messages and also reaches the run log.
- ``run_log`` (``lensbench.run``): the run log only (state changes, batch sizes, memory,
  progress), so that the console keeps a clean progress bar.

While a run lasts, ``RunLog`` adds one UTF-8 file handler at INFO to both, and to Lightning's own
loggers, so the file holds lensbench's and Lightning's console messages plus the details, and
why a run stopped (``Analysis.release_run``). Progress bars and Python warnings stay on the console. Lightning's
advertisements are filtered out of both (``quiet_lightning``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

console = logging.getLogger("lightning.pytorch.lensbench")
run_log = logging.getLogger("lensbench.run")
run_log.propagate = False  # never on the console
run_log.setLevel(logging.INFO)

LOG_DIR = "logs"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Loggers whose records the run log receives (lensbench's own and Lightning's).
CAPTURED = ("lightning.pytorch", "lightning.fabric", "lensbench.run")
#: Messages nobody running an analysis needs: Lightning's advertisements for its cloud services,
#: its advice on float32 matmul precision (lensbench sets it itself: float32_matmul_precision), its
#: "Seed set to" line (the seed is in the run's config.yaml), and its list of the devices it found
#: ("GPU available: ..., used: ...": lensbench's own lines name the device a model is loaded on,
#: and Lightning still warns about a GPU left unused). Printed when the trainer is made, before
#: the run checks its settings and loads its model, they made a bad-input error several lines.
NOISE = ("💡 Tip:", "set_float32_matmul_precision", "Seed set to", "GPU available: ", "TPU available: ",
         "HPU available: ")
_RANK_ZERO_LOGGERS = ("lightning_utilities.core.rank_zero", "lightning.pytorch.utilities.rank_zero",
                      "lightning.fabric.utilities.rank_zero", "lightning.fabric.utilities.seed")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern in message for pattern in NOISE)


#: Loggers of bitsandbytes that repeat one warning at every quantized matrix product (8-bit inputs
#: cast to float16) or at every load (no optimised CPU kernel): each message is shown once.
_REPEATING_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


class _Once(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quiet_lightning() -> None:
    """Filter Lightning's advertisements and precision advice out of every output, and show
    bitsandbytes' repeated warnings once (idempotent)."""
    for names, kind in ((_RANK_ZERO_LOGGERS, _DropNoise), (_REPEATING_LOGGERS, _Once)):
        for name in names:
            logger = logging.getLogger(name)
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())


def memory_summary(device: torch.device | None = None) -> str:
    """Resident memory of this process and, on a GPU, allocated and reserved CUDA memory."""
    parts = []
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        parts.append(f"rss {pages * os.sysconf('SC_PAGE_SIZE') / 2**30:.2f} GiB")
    except (OSError, ValueError, IndexError):
        pass
    if device is not None and device.type == "cuda":
        parts.append(f"cuda allocated {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB, "
                     f"reserved {torch.cuda.memory_reserved(device) / 2**30:.2f} GiB")
    return ", ".join(parts) or "unknown"


class RunLog:
    """Attach ``<run_dir>/logs/rank<r>.log`` to the captured loggers while a run lasts."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.path = Path(run_dir) / LOG_DIR / f"rank{rank}.log"
        self.handler: logging.Handler | None = None

    def attach(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_DropNoise())
        for name in CAPTURED:
            logging.getLogger(name).addHandler(handler)
        self.handler = handler
        return self.path

    def detach(self) -> None:
        if self.handler is None:
            return
        for name in CAPTURED:
            logging.getLogger(name).removeHandler(self.handler)
        self.handler.close()
        self.handler = None


class Progress:
    """Progress lines for the run log: at the first step, then at most every ``every`` seconds,
    and at the last step, with the rate, the time left and memory."""

    def __init__(self, total: int, rank: int, device: torch.device | None = None, every: float = 10.0) -> None:
        self.total, self.rank, self.device, self.every = total, rank, device, every
        self.done = 0
        self.start = time.monotonic()
        self._last = -float("inf")

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done < self.total and self.done > n and now - self._last < self.every:
            return
        self._last = now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        run_log.info(f"rank {self.rank}: {self.done}/{self.total} work items ({100 * self.done / max(self.total, 1):.0f}%), "
                     f"{rate:.2f} items/s, about {left:.0f} s left; memory: {memory_summary(self.device)}")
