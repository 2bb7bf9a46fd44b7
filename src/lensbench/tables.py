"""Writing and reading an analysis's tables and figures, the same way for every analysis."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LensbenchError


def write_csv(table, path: Path) -> Path:
    """Write a pandas table atomically (temporary file, then rename); floats with 10 digits."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table.to_csv(tmp, index=False, float_format="%.10g")
    tmp.replace(path)
    return path


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
