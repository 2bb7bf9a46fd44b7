"""Heatmaps whose colours and labels stay readable: a colour scale over the data's own range
(diverging and centred on 0 when the values change sign), row labels shortened and thinned so they
never overlap, NaN cells blank. memory_ablation draws its impact and swap matrices with them.

- ``color_scale(values)``: the colour map and the limits (vmin, vmax) of a block of values.
- ``shorten(text, width)``: ``text`` cut to ``width`` characters with an ellipsis.
- ``tick_every(n, most)``: the step k of the row labels drawn (every k-th) so at most ``most`` show.
- ``draw_block(fig, ax, values, rows, cols, label, title)``: one heatmap panel with its colour bar
  (on a figure with the constrained layout, which makes room for labels, titles and colour bars).
- ``panels_figure(plt, blocks, label, title)``: one panel per block stacked vertically, heights
  proportional to the blocks' row counts, each with its own colour scale.
"""

from __future__ import annotations

import math

#: The most row labels one panel draws (above it, every k-th).
MOST_LABELS = 60
#: Row labels longer than this are cut with an ellipsis.
LABEL_WIDTH = 40
#: Height (inches) of one labelled row, and the bounds of the labels' font size.
ROW_INCHES = 0.18
FONT_MIN, FONT_MAX = 5.0, 8.0
#: The tallest figure drawn (inches): far below what the image backend can hold.
MAX_INCHES = 150.0


def color_scale(values) -> tuple[str, float, float]:
    """``(cmap, vmin, vmax)`` for the finite ``values``: their min and max; a diverging map (blue
    below 0, red above, white at 0) when some value is negative, else a sequential one. Equal values
    get a small range around them; no finite value gives (0, 1)."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    finite = array[np.isfinite(array)]
    if not finite.size:
        return "magma", 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if low == high:
        pad = max(abs(low) * 0.05, 1e-3)
        low, high = low - pad, high + pad
    return ("RdBu_r" if low < 0 else "magma"), low, high


def norm_of(cmap: str, low: float, high: float):
    """The matplotlib norm of a ``color_scale``: a two-slope norm with 0 at the map's centre when
    the range holds 0 on a diverging map, else a linear one."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    if cmap == "RdBu_r" and low < 0 < high:
        return TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high)
    return Normalize(vmin=low, vmax=high)


def shorten(text: str, width: int = LABEL_WIDTH) -> str:
    """``text`` as is when it has at most ``width`` characters, else its first ``width - 1`` and '…'."""
    text = str(text)
    return text if len(text) <= width else text[:max(0, width - 1)] + "…"


def tick_every(n: int, most: int = MOST_LABELS) -> int:
    """The step k such that labelling every k-th of ``n`` rows draws at most ``most`` labels."""
    return max(1, math.ceil(n / most)) if n > 0 else 1


def font_size(n_labels: int) -> float:
    """Row labels' font size: smaller as more labels show, within FONT_MIN..FONT_MAX."""
    return max(FONT_MIN, min(FONT_MAX, 12.0 - n_labels / 10))


def block_inches(n_rows: int) -> float:
    """Height of a panel of ``n_rows`` rows: the labelled rows' height (at most MOST_LABELS of them)
    plus room for its title and its column labels."""
    return 1.8 + ROW_INCHES * min(max(1, n_rows), MOST_LABELS)


def draw_block(fig, ax, values, rows: list[str], cols: list[str], label: str, title: str):
    """One heatmap of ``values`` (rows x cols) on ``ax`` with its own colour bar over the values'
    range (``color_scale``); NaN cells are left blank and, when there are any, the title says so."""
    import numpy as np

    array = np.asarray(values, dtype=float).reshape(len(rows), len(cols))
    cmap, low, high = color_scale(array)
    masked = np.ma.masked_invalid(array)
    im = ax.imshow(masked, aspect="auto", cmap=cmap, norm=norm_of(cmap, low, high), interpolation="nearest")
    ax.set_facecolor("white")
    ax.set_xticks(range(len(cols)), [shorten(c, 24) for c in cols], rotation=45, ha="right", fontsize=7)
    step = tick_every(len(rows))
    shown = list(range(0, len(rows), step))
    ax.set_yticks(shown, [shorten(rows[i]) for i in shown], fontsize=font_size(len(shown)))
    # as long as the panel is high (a colour bar's length is ``aspect`` times its width)
    fig.colorbar(im, ax=ax, label=label, fraction=0.05, pad=0.02, aspect=max(10.0, 5 * block_inches(len(rows))))
    notes = []
    if step > 1:
        notes.append(f"every {step}th of {len(rows)} rows labelled")
    missing = int(np.isnan(array).sum())
    if missing:
        notes.append(f"blank: no value ({missing} cell{'s' if missing > 1 else ''})")
    ax.set_title(title + (f"\n({'; '.join(notes)})" if notes else ""), fontsize=9)
    return im


def figure_size(n_cols: int, heights: list[float]) -> tuple[float, float]:
    """A figure ``n_cols`` cells wide (room for labels and colour bars) holding panels of ``heights``."""
    return max(6.0, 4.5 + 0.45 * max(1, n_cols)), min(MAX_INCHES, 0.6 + sum(heights))


def panels_figure(plt, blocks: list[tuple[str, object, list[str], list[str]]], label: str, title: str):
    """One figure with a panel per block ``(name, values, rows, cols)``, stacked vertically, each
    panel as high as its rows need (``block_inches``) and with its own colour scale."""
    heights = [block_inches(len(rows)) for _, _, rows, _ in blocks]
    n_cols = max(len(cols) for _, _, _, cols in blocks)
    fig, axes = plt.subplots(len(blocks), 1, figsize=figure_size(n_cols, heights), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    for ax, (name, values, rows, cols) in zip(axes[:, 0], blocks):
        draw_block(fig, ax, values, rows, cols, label, shorten(name, 60))
    fig.suptitle(title, fontsize=10)
    return fig
