"""Writing and reading an analysis's tables and figures, the same way for every analysis."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import LensbenchError


def write_csv(table, path: Path) -> Path:
    """Write a pandas table atomically (temporary file, then rename); floats with 10 digits."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with _naming(path, tmp):
        table.to_csv(tmp, index=False, float_format="%.10g")
        tmp.replace(path)
    return path


def save_figure(fig, path: Path, **kwargs) -> Path:
    """``fig.savefig(path, **kwargs)`` atomically (temporary file, then rename): a write that fails
    (a full disk, a file size limit) leaves no half figure and names ``path`` in its error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    with _naming(path, tmp):
        fig.savefig(tmp, **kwargs)
        tmp.replace(path)
    return path


@contextlib.contextmanager
def _naming(path: Path, tmp: Path):
    """Re-raise an OSError of writing ``path`` (through ``tmp``) with ``path`` as its file name, and
    remove ``tmp``: the one-line error then names the file being written."""
    try:
        yield
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def read_csv(run_dir: Path, name: str):
    """A stored table of a run, or one clear error when the run has not written it."""
    import pandas as pd

    path = Path(run_dir) / name
    if not path.exists():
        raise LensbenchError(f"{path} does not exist; run the analysis first")
    return pd.read_csv(path)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finite(values):
    """``values`` as a float array with NaN in place of every non-finite value (NaN, inf): a line
    drawn through it skips them instead of failing on them or stretching the axes to infinity."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    return np.where(np.isfinite(array), array, np.nan)


def value_scale(ax, values, axis: str = "y") -> str:
    """Give ``ax``'s ``axis`` the scale that draws every finite value of ``values``: log when all are
    > 0; symlog, linear below the smallest positive value, when some are 0 or negative (an exact 0 is
    drawn, not dropped as a log axis drops it); linear when none is > 0 (a log axis would have
    nothing to draw). Returns the scale set."""
    import numpy as np

    array = finite(values)
    array = array[np.isfinite(array)]
    positive = array[array > 0]
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    if not len(positive):
        setter("linear")
        return "linear"
    if (array <= 0).any():
        setter("symlog", linthresh=float(positive.min()))
        return "symlog"
    setter("log")
    return "log"
