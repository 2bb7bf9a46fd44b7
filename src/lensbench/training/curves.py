"""Training curves of ``lensbench fit`` runs (the seed's ``plot_loss_comparison``), drawn from the
metrics Lightning's CSV logger wrote (``<run>/metrics/version_<n>/metrics.csv``, one version per
run or resumed run).

One run (``fit`` writes ``<run>/curves.png`` at the end; ``lensbench plot RUN`` redraws it): the
training loss and the validation loss against the step, and the validation exact match of each
group with its 95% Wilson interval as a band (from the examples per group, logged as ``val_n/<group>``;
runs logged without it draw no band). Several runs (``lensbench plot RUN RUN ...``): one line per run in each panel, the training
loss and the validation exact match averaged over the groups that were trained (``heldout`` groups,
never trained, left out: they would only pull every run towards 0).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LensbenchError

CURVES = "curves.png"
EXACT = "val_exact/"
#: The validation examples of each group, logged beside its exact match.
VAL_N = "val_n/"


def read_metrics(run_dir: Path):
    """The run's logged metrics, one row per step (``step`` as index, sorted): where a killed run
    logged a step that its resumed run logged again, the later version's value is kept."""
    import pandas as pd

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("metrics/version_*/metrics.csv"),
                   key=lambda p: int(p.parent.name.split("_")[-1]) if p.parent.name.split("_")[-1].isdigit() else -1)
    frames = [pd.read_csv(f) for f in files if f.stat().st_size]
    frames = [f for f in frames if "step" in f.columns and len(f)]
    if not frames:
        raise LensbenchError(f"{run_dir} is a training run (lensbench fit), which has no figures to draw yet: it "
                             "holds no metrics/version_*/metrics.csv with a row; train it (lensbench fit) first")
    table = pd.concat(frames, ignore_index=True)
    return table.groupby("step", sort=True).last().drop(columns=["epoch"], errors="ignore")


def mean_exact(metrics):
    """The validation exact match per step, averaged over the trained groups (NaN-free steps only)."""
    cols = [c for c in metrics.columns if c.startswith(EXACT) and "heldout" not in c]
    return metrics[cols].mean(axis=1, skipna=True).dropna() if cols else metrics.iloc[:0, :0].sum(axis=1)


def exact_band(metrics, group: str):
    """The 95% Wilson interval (``low``, ``high`` per step) of ``group``'s validation exact match,
    from the rate and the examples logged at each step; None when the examples were not logged."""
    import pandas as pd

    from ..intervals import wilson

    if f"{VAL_N}{group}" not in metrics.columns:
        return None
    rows = metrics[[f"{EXACT}{group}", f"{VAL_N}{group}"]].dropna()
    if not len(rows):
        return None
    rate, n = rows.iloc[:, 0].to_numpy(float), rows.iloc[:, 1].to_numpy(float)
    low, high = wilson((rate * n).round(), n)
    return pd.DataFrame({"low": low, "high": high}, index=rows.index)


def draw(runs: dict[str, object]):
    """The figure of ``runs`` (label -> ``read_metrics`` table): loss and exact-match panels."""
    from ..tables import finite, pyplot

    plt = pyplot()
    fig, (loss_ax, exact_ax) = plt.subplots(1, 2, figsize=(11, 4))
    if len(runs) == 1:
        (label, metrics), = runs.items()
        for col, style in (("train_loss", "-"), ("val_loss", "o-")):
            if col in metrics.columns:
                series = metrics[col].dropna()
                loss_ax.plot(series.index, finite(series.values), style, label=col, markersize=3)
        for col in sorted(c for c in metrics.columns if c.startswith(EXACT)):
            series = metrics[col].dropna()
            line, = exact_ax.plot(series.index, finite(series.values), "o-", label=col[len(EXACT):], markersize=3)
            band = exact_band(metrics, col[len(EXACT):])
            if band is not None:
                exact_ax.fill_between(band.index, band["low"], band["high"], color=line.get_color(), alpha=0.2,
                                      linewidth=0)
        fig.suptitle(label)
    else:
        for label, metrics in runs.items():
            if "train_loss" in metrics.columns:
                series = metrics["train_loss"].dropna()
                loss_ax.plot(series.index, finite(series.values), label=label)
            series = mean_exact(metrics)
            exact_ax.plot(series.index, finite(series.values), "o-", label=label, markersize=3)
        fig.suptitle(f"{len(runs)} training runs")
    loss_ax.set(xlabel="step", ylabel="loss (answer tokens)", title="loss")
    exact_ax.set(xlabel="step", ylabel="exact match" + (" (95% Wilson interval)" if exact_ax.collections else ""),
                 ylim=(-0.02, 1.02),
                 title="validation exact match" + (" (mean over trained groups)" if len(runs) > 1 else ""))
    for ax in (loss_ax, exact_ax):
        if ax.get_lines():
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: list[Path], path: Path, labels: list[str] | None = None) -> Path:
    """Draw the curves of ``run_dirs`` (fit run folders) into ``path``, each run's lines named by
    its entry of ``labels`` (default: its folder as given)."""
    from ..tables import pyplot, save_figure

    runs = {label: read_metrics(d) for label, d in zip(labels or [str(d) for d in run_dirs], run_dirs)}
    fig = draw(runs)
    try:
        return save_figure(fig, path, dpi=120)
    finally:
        pyplot().close(fig)


class FitRun:
    """What a report shows of ``lensbench fit`` runs (``lensbench.report``): each run's tables and
    figures (the default sections) and, for several runs, their curves on one figure."""

    name = "fit"

    @classmethod
    def report_sections(cls, run_dir: Path) -> list:
        from ..report import default_sections

        return default_sections(run_dir, cls.name)

    @classmethod
    def compare_figures(cls, run_dirs: list[Path], labels: list[str], out_dir: Path) -> list[Path]:
        return [plot_runs([Path(d) for d in run_dirs], Path(out_dir) / CURVES, labels)]
