"""memory_ablation's impact and swap figures: a colour scale per family over its own data, readable
labels, swap colour bars over the data's range (tables written by hand, ``MemoryAblation.plot``)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lensbench import heatmaps
from lensbench.analyses import memory_ablation
from lensbench.analyses.memory_ablation import MemoryAblation

GROUPS = ["bucket=1/seen", "bucket=4/seen", "bucket=16/seen"]


@pytest.fixture
def figures(monkeypatch):
    """The figures ``plot`` saves, by file name (they are still written)."""
    saved = {}
    real = memory_ablation.save_figure

    def keep(fig, path, **kwargs):
        saved[path.name] = fig
        return real(fig, path, **kwargs)

    monkeypatch.setattr(memory_ablation, "save_figure", keep)
    return saved


def run_folder(tmp_path, impact: pd.DataFrame | None = None, swaps: pd.DataFrame | None = None):
    # what plot reads of accuracy.csv: the baseline's rows (no bucket column: no bucket figure, no drop intervals)
    pd.DataFrame({"intervention": "baseline", "target": "", "transform": "", "group": GROUPS,
                  "exact_match": [0.9, 0.8, 0.7]}).to_csv(tmp_path / "accuracy.csv", index=False)
    if impact is not None:
        impact.to_csv(tmp_path / "impact_matrix.csv", index=False)
    if swaps is not None:
        swaps.to_csv(tmp_path / "swap_matrix.csv", index=False)
    return tmp_path


def impact_rows(family: str, drops: list[list[float]], targets: list[str] | None = None) -> pd.DataFrame:
    targets = targets if targets is not None else [f"[{i}]" for i in range(len(drops))]
    return pd.DataFrame([{"intervention": family, "target": t, **dict(zip(GROUPS, d))} for t, d in zip(targets, drops)])


def panels(fig):
    """The heatmap panels of a figure (the colour bars' axes hold no image)."""
    return [ax for ax in fig.axes if ax.images]


def test_each_family_has_its_own_colour_scale_over_its_data(tmp_path, figures):
    values = impact_rows("values", [[0.6, 0.9, 0.75]], [""])  # the all-values ablation: large drops
    slots = impact_rows("slots", [[0.0, 0.1, 0.3], [0.05, 0.2, 0.0], [0.1, 0.1, 0.15]])
    signed = impact_rows("signed", [[-0.2, 0.1, 0.05], [0.0, math.nan, 0.4]])
    run = run_folder(tmp_path, pd.concat([values, slots, signed]))
    MemoryAblation.plot(run)
    assert (run / "impact_matrix.png").stat().st_size > 1000
    axes = panels(figures["impact_matrix.png"])
    assert [ax.get_title().splitlines()[0] for ax in axes] == ["values", "slots", "signed"]
    limits = [ax.images[0].get_clim() for ax in axes]
    assert limits[0] == pytest.approx((0.6, 0.9))
    assert limits[1] == pytest.approx((0.0, 0.3))  # not washed out by the values family's 0.9
    assert limits[2] == pytest.approx((-0.2, 0.4))
    # the family with a negative drop: a diverging map with 0 at its centre
    norm = axes[2].images[0].norm
    assert norm(0.0) == pytest.approx(0.5) and axes[2].images[0].get_cmap().name == "RdBu_r"
    assert axes[1].images[0].get_cmap().name != "RdBu_r"
    # each panel's colour bar spans its own data
    for ax, (low, high) in zip(axes, limits):
        bar = ax.images[0].colorbar
        assert (bar.vmin, bar.vmax) == pytest.approx((low, high))
    # the NaN cell is blank (masked), and the panel says so
    assert np.ma.getmaskarray(axes[2].images[0].get_array())[1, 1]
    assert "blank" in axes[2].get_title()
    # a row without target is labelled with its family; panels are as high as their rows need
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["values"]
    heights = [ax.get_position().height for ax in axes]
    assert heights[0] < heights[1]


def test_many_rows_show_at_most_sixty_labels_and_long_labels_are_cut(tmp_path, figures):
    long = "[" + ", ".join(str(i) for i in range(100, 140)) + "]"
    rng = np.random.default_rng(0)
    targets = [long] + [f"[{i}]" for i in range(1, 200)]
    many = impact_rows("slots", rng.uniform(0, 0.3, (200, 3)).tolist(), targets)
    run = run_folder(tmp_path, pd.concat([impact_rows("values", [[0.5, 0.9, 0.7]], [""]), many]))
    MemoryAblation.plot(run)
    fig = figures["impact_matrix.png"]
    ax = panels(fig)[1]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert 1 < len(labels) <= heatmaps.MOST_LABELS
    step = heatmaps.tick_every(200)
    assert list(ax.get_yticks()) == list(range(0, 200, step))
    assert labels[0].endswith("…") and len(labels[0]) == heatmaps.LABEL_WIDTH
    assert labels[1] == f"[{step}]"
    assert heatmaps.FONT_MIN <= ax.get_yticklabels()[0].get_fontsize() <= heatmaps.FONT_MAX
    assert f"every {step}th of 200 rows" in ax.get_title()
    assert fig.get_size_inches()[1] <= heatmaps.MAX_INCHES


def test_swap_colour_bar_spans_the_data_and_leaves_missing_pairs_blank(tmp_path, figures):
    swaps = pd.DataFrame({"intervention": "swap", "a": [3, 3, 7], "b": [7, 9, 9], "changed": [2, 5, 7],
                          "follow": [0, 1, 2], "follow_share": [0.0, 0.2, 0.3]})
    run = run_folder(tmp_path, swaps=swaps)
    MemoryAblation.plot(run)
    ax, = panels(figures["swap_matrix_swap.png"])
    image = ax.images[0]
    assert image.get_clim() == pytest.approx((2, 7))
    assert (image.colorbar.vmin, image.colorbar.vmax) == pytest.approx((2, 7))
    mask = np.ma.getmaskarray(image.get_array())
    assert mask.diagonal().all() and mask.sum() == 3  # no slot is swapped with itself
    assert "blank" in ax.get_title()


def test_colour_scale_of_constant_and_missing_values():
    cmap, low, high = heatmaps.color_scale([0.2, 0.2, math.nan])
    assert low < 0.2 < high and cmap == "magma"
    assert heatmaps.color_scale([math.nan]) == ("magma", 0.0, 1.0)
    assert heatmaps.color_scale([-0.3, -0.1])[1:] == (-0.3, -0.1)
    assert heatmaps.shorten("abc", 3) == "abc" and heatmaps.shorten("abcd", 3) == "ab…"
    assert heatmaps.tick_every(60) == 1 and heatmaps.tick_every(61) == 2 and heatmaps.tick_every(200) == 4
