"""Writing tables and figures: atomic, and a failed write names the file it was writing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

WRITE_UNDER_A_FILE_SIZE_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    import pandas as pd
    from lensbench.cli import _environment_error
    from lensbench.tables import pyplot, save_figure, write_csv

    folder = Path(sys.argv[1])
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot(range(100), [i * i for i in range(100)])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
    for write, name in ((lambda p: save_figure(fig, p, dpi=100), "figure.png"),
                        (lambda p: write_csv(pd.DataFrame({"x": range(2000)}), p), "table.csv")):
        try:
            write(folder / name)
        except OSError as exc:
            print(_environment_error(exc))
""")


def test_a_write_past_the_file_size_limit_names_the_file_and_leaves_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-c", WRITE_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines == [f"File too large: {tmp_path / name}; raise the file size limit (ulimit -f), free disk space or "
                     "write elsewhere (model.init_args.output_dir) (LENSBENCH_DEBUG=1 shows the traceback)"
                     for name in ("figure.png", "table.csv")], done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half file, no temporary file


def test_save_figure_writes_the_figure(tmp_path):
    from lensbench.tables import pyplot, save_figure

    fig, ax = pyplot().subplots()
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "f.png", dpi=50)
    assert out.read_bytes().startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == ["f.png"]
