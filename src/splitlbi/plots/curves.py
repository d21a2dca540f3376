"""Curves over epochs from run directories, drawn as the paper draws them.

Every figure of the reproduction is written as ``<name>.png``, ``<name>.pdf`` and
``<name>.csv``; the CSV holds exactly the numbers on the plot, one row per point:
``panel, series, x, y, y_std, n`` (``y_std`` the standard deviation over the ``n``
repeats, empty for a single run).
"""

from __future__ import annotations

import math
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from splitlbi.train.runfiles import iter_path, read_metric_columns
from splitlbi.utils.io import atomic_write_csv

__all__ = ["Series", "Panel", "Heatmap", "read_metrics", "layer_filter_share", "mean_curve", "draw_panels", "CSV_COLUMNS"]

CSV_COLUMNS = ("panel", "series", "x", "y", "y_std", "n")


#: ``metrics.csv`` as ``{column: values by epoch}``; kept here for the figure code and older callers.
read_metrics = read_metric_columns


def layer_filter_share(run_dir: Path) -> Dict[str, Dict[int, float]]:
    """``{layer: {epoch: share of its filters in the support of Γ}}`` from ``path.csv``."""
    counts: Dict[str, Dict[int, List[int]]] = {}
    for row in iter_path(run_dir):
        if row.in_support is None:  # a run without Γ
            continue
        kept_total = counts.setdefault(row.layer, {}).setdefault(row.epoch, [0, 0])
        kept_total[0] += row.in_support
        kept_total[1] += 1
    return {layer: {epoch: kept / total for epoch, (kept, total) in epochs.items()}
            for layer, epochs in counts.items()}


@dataclass
class Series:
    """One curve: ``y[i]`` at ``x[i]``; ``y_std`` draws a shaded band (mean ± std over ``n`` repeats)."""

    label: str
    x: List[float]
    y: List[float]
    y_std: Optional[List[float]] = None
    n: int = 1
    color: Optional[str] = None
    style: str = "-"
    marker: Optional[str] = None
    scatter: bool = False
    band: bool = True  #: y_std as a shaded band (True) or as error bars (many overlapping curves)


@dataclass
class Heatmap:
    """Values by row (e.g. a layer) and column ``x`` (e.g. an epoch), drawn as coloured cells."""

    rows: List[str]
    x: List[float]
    values: List[List[float]]
    label: str
    vmax: float = 100.0
    n: int = 1


@dataclass
class Panel:
    """One axes: a title, axis labels and its curves (and optional horizontal reference lines), or a heatmap."""

    title: str
    xlabel: str
    ylabel: str
    series: List[Series] = field(default_factory=list)
    hlines: List[Series] = field(default_factory=list)
    ylim: Optional[tuple] = None
    heatmap: Optional[Heatmap] = None


def mean_curve(label: str, curves: Sequence[Sequence[float]], x: Sequence[float], **style) -> Series:
    """Mean (and standard deviation when there are ≥ 2) of equally long ``curves`` over repeats."""
    length = min(len(c) for c in curves)
    columns = [[c[i] for c in curves] for i in range(length)]
    mean = [statistics.fmean(v) for v in columns]
    std = [statistics.stdev(v) for v in columns] if len(curves) > 1 else None
    return Series(label, list(x[:length]), mean, std, n=len(curves), **style)


def _rows(panels: Sequence[Panel]) -> List[List[str]]:
    rows = []
    for panel in panels:
        for series in panel.series + panel.hlines:
            for i, (x, y) in enumerate(zip(series.x, series.y)):
                std = "" if series.y_std is None else f"{series.y_std[i]:.6g}"
                rows.append([panel.title, series.label, f"{x:.6g}", f"{y:.6g}", std, str(series.n)])
        if panel.heatmap is not None:
            cells = panel.heatmap
            for label, values in zip(cells.rows, cells.values):
                rows.extend([panel.title, label, f"{x:.6g}", f"{y:.6g}", "", str(cells.n)] for x, y in zip(cells.x, values))
    return rows


def _draw_heatmap(figure, ax, cells: Heatmap) -> None:
    step = (cells.x[1] - cells.x[0]) if len(cells.x) > 1 else 1.0
    extent = (cells.x[0] - step / 2, cells.x[-1] + step / 2, len(cells.rows) - 0.5, -0.5)
    image = ax.imshow(cells.values, aspect="auto", cmap="Blues", vmin=0.0, vmax=cells.vmax, extent=extent,
                      interpolation="nearest")
    ax.set_yticks(range(len(cells.rows)), cells.rows, fontsize=5)
    figure.colorbar(image, ax=ax, label=cells.label, fraction=0.06, pad=0.02)


def draw_panels(panels: Sequence[Panel], out: Path, *, columns: int = 2, title: Optional[str] = None,
                note: Optional[str] = None, shared_legend: bool = False) -> List[Path]:
    """Draw ``panels`` on a grid, write ``out`` (.png), the PDF and the CSV beside it; return the paths.

    ``shared_legend``: one legend below the whole figure (every label once) instead of one below each
    panel, for panels that draw the same methods: the panels keep their full height.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from splitlbi.plots.style import COLUMN_WIDTH, PANEL_HEIGHT, paper_style, save_figure

    out = Path(out)
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    with paper_style():
        figure, axes = plt.subplots(rows, columns, figsize=(COLUMN_WIDTH * columns, PANEL_HEIGHT * rows),
                                    squeeze=False, layout="constrained")
        for ax, panel in zip(axes.flat, panels):
            if panel.heatmap is not None:
                _draw_heatmap(figure, ax, panel.heatmap)
            for series in panel.series:
                if series.scatter:
                    ax.scatter(series.x, series.y, label=series.label, color=series.color,
                               marker=series.marker or "o", s=60 if series.marker == "*" else 22, zorder=3,
                               edgecolors="black" if series.marker == "*" else "none", linewidths=0.4)
                    continue
                ax.plot(series.x, series.y, series.style, label=series.label, color=series.color,
                        marker=series.marker, markersize=3)
                if series.y_std is not None and not series.band:
                    ax.errorbar(series.x, series.y, yerr=series.y_std, fmt="none", ecolor=ax.lines[-1].get_color(),
                                capsize=2, linewidth=0.6)
                elif series.y_std is not None:
                    low = [m - s for m, s in zip(series.y, series.y_std)]
                    high = [m + s for m, s in zip(series.y, series.y_std)]
                    ax.fill_between(series.x, low, high, color=ax.lines[-1].get_color(), alpha=0.2, linewidth=0)
            for line in panel.hlines:
                ax.axhline(line.y[0], color=line.color or "black", linestyle=line.style or "--", linewidth=0.8,
                           label=line.label)
            if panel.xlabel.endswith("epoch"):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(panel.title)
            ax.set_xlabel(panel.xlabel)
            ax.set_ylabel(panel.ylabel)
            if panel.ylim is not None:
                ax.set_ylim(*panel.ylim)
            if (panel.series or panel.hlines) and not shared_legend:
                # Below the axes: with many curves there is no free corner inside.
                ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=6.5)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        if shared_legend:
            handles = {}
            for ax in axes.flat:
                for handle, label in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(label, handle)
            if handles:  # the note goes in the legend's title: below the panels, never over an entry
                figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                              ncol=min(len(handles), 2 * columns), fontsize=6.5, title_fontsize=6.5,
                              title=textwrap.fill(note, 60 * columns) if note else None)
                note = None
        if title:
            figure.suptitle(title)
        if note:
            figure.canvas.draw()
            to_figure = figure.transFigure.inverted()
            bottom = min([0.0] + [to_figure.transform(legend.get_window_extent())[0][1]
                                  for legend in figure.legends + [ax.get_legend() for ax in axes.flat]
                                  if legend is not None])
            figure.text(0.5, bottom - 0.02, textwrap.fill(note, 40 * columns + 30), ha="center", va="top",
                        fontsize=6.5)
        png = save_figure(figure, out, pdf=True)
        plt.close(figure)
    csv_path = out.with_suffix(".csv")
    atomic_write_csv(csv_path, CSV_COLUMNS, _rows(panels))
    return [png, out.with_suffix(".pdf"), csv_path]
