"""Filter-norm solution paths (the paper's Figure 1, left and right panels).

Each run directory holds ``path.csv`` with the ℓ2 norm of every filter of every
coupled layer at every epoch. The figure draws one line per filter against epoch and
colours it by whether the filter is in the support of Γ at the *last* epoch: the
filters SplitLBI ends up selecting are blue, the rest red. A run without Γ (SGD) is
coloured by the support of the first SplitLBI run shown, so the panels compare the
same filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from splitlbi.errors import SplitLBIError
from splitlbi.plots.style import (
    COLUMN_WIDTH,
    NOT_SELECTED_COLOR,
    PANEL_HEIGHT,
    SELECTED_COLOR,
    UNKNOWN_SUPPORT_COLOR,
    paper_style,
    run_label,
    save_figure,
)
from splitlbi.train.run import PATH_FILE
from splitlbi.train.runfiles import iter_path, path_layers


@dataclass(frozen=True)
class FilterPaths:
    """The filter-norm paths of one layer of one run.

    ``norms[t, f]`` is ‖W_f‖ at ``epochs[t]`` (NaN where a row is missing);
    ``final_support[f]`` says whether filter f is in the support of Γ at the last
    epoch, or is None for a run without Γ (SGD and other baselines).
    """

    layer: str
    epochs: np.ndarray
    norms: np.ndarray
    final_support: Optional[np.ndarray]

    @property
    def num_filters(self) -> int:
        return int(self.norms.shape[1])


def read_run_config(run_dir: Path, required: bool = False) -> dict[str, Any]:
    """``config.json`` of a run as a dict ({} when absent and not ``required``)."""
    from splitlbi.train.rundir import read_run_config as read_checked  # the one checked reader

    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        if required:
            raise SplitLBIError(f"{run_dir}: no config.json; is this a run directory?")
        return {}
    return read_checked(run_dir)


def read_filter_paths(run_dir: Path, layer: str) -> FilterPaths:
    """Read the paths of ``layer`` from ``RUN_DIR/path.csv``.

    Raises SplitLBIError when the run has no path.csv, the file lacks columns, or the
    layer is not in it (the message lists the layers that are).
    """
    rows = [(row.epoch, row.filter, row.w_norm, row.in_support) for row in iter_path(run_dir, layer=layer)]
    if not rows:
        present = ", ".join(path_layers(run_dir)) or "none"
        raise SplitLBIError(f"layer {layer!r} not in {Path(run_dir) / PATH_FILE}; layers present: {present}")
    return _paths_from_rows(layer, rows)


def _paths_from_rows(layer: str, rows: list[tuple[int, int, float, Optional[bool]]]) -> FilterPaths:
    """Pivot (epoch, filter, norm, flag) rows into an epochs × filters array."""
    epochs = np.array(sorted({epoch for epoch, _, _, _ in rows}))
    filters = {f for _, f, _, _ in rows}
    num_filters = max(filters) + 1
    if min(filters) < 0 or num_filters != len(filters):
        # The trainer writes filters 0..n-1 of a layer; anything else is a damaged file (and a
        # filter 999999999 would size the array by it).
        raise SplitLBIError(f"path.csv rows of layer {layer!r} name filters {min(filters)} to {max(filters)} but "
                            f"only {len(filters)} distinct ones: a damaged path.csv?")
    epoch_index = {int(e): i for i, e in enumerate(epochs)}
    norms = np.full((len(epochs), num_filters), np.nan)
    last_epoch = int(epochs[-1])
    # Missing rows at the last epoch count as "not selected"; None marks "no Γ logged".
    final_flags: list[Optional[bool]] = [None] * num_filters
    for epoch, f, norm, flag in rows:
        norms[epoch_index[epoch], f] = norm
        if epoch == last_epoch:
            final_flags[f] = flag
    has_gamma = any(flag is not None for flag in final_flags)
    final_support = np.array([bool(flag) for flag in final_flags]) if has_gamma else None
    return FilterPaths(layer=layer, epochs=epochs, norms=norms, final_support=final_support)


def _draw_paths(ax: Any, paths: FilterPaths, support: Optional[np.ndarray]) -> None:
    """One line per filter; unselected (red) first so the selected (blue) lie on top."""
    if support is None:
        for f in range(paths.num_filters):
            ax.plot(paths.epochs, paths.norms[:, f], color=UNKNOWN_SUPPORT_COLOR,
                    linewidth=0.6, alpha=0.6, gid=f"filter{f}")
        return
    for selected, color, alpha in ((False, NOT_SELECTED_COLOR, 0.45), (True, SELECTED_COLOR, 0.8)):
        for f in np.flatnonzero(support == selected):
            ax.plot(paths.epochs, paths.norms[:, f], color=color,
                    linewidth=0.7, alpha=alpha, gid=f"filter{f}")


def _support_legend(ax: Any, support: Optional[np.ndarray], num_filters: int, note: Optional[str]) -> None:
    """Legend under the panel (the lines fill the axes), with the support size and a note."""
    if support is None:
        handles = [Line2D([], [], color=UNKNOWN_SUPPORT_COLOR, label=f"all filters ({num_filters})")]
    else:
        n_selected = int(support.sum())
        handles = [
            Line2D([], [], color=SELECTED_COLOR, label=f"selected by Γ ({n_selected}/{num_filters})"),
            Line2D([], [], color=NOT_SELECTED_COLOR, label="not selected"),
        ]
    legend = ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.24), ncol=len(handles),
        handlelength=1.2, columnspacing=1.2, title=note, title_fontsize=6,
    )
    if note:
        legend.get_title().set_style("italic")


def make_filter_path_figure(
    runs: Sequence[Path], layer: str, title: Optional[str] = None
) -> Figure:
    """Figure 1 (paths): one panel per run, ‖W_f‖ against epoch, one line per filter.

    Panels are side by side in the order of ``runs``. Line ``gid`` is ``filter<f>``,
    so callers can find a filter's line and check its colour.
    """
    if not runs:
        raise SplitLBIError("no run directory given")
    paths = [read_filter_paths(Path(run), layer) for run in runs]
    configs = [read_run_config(Path(run)) for run in runs]
    labels = [run_label(cfg) if cfg else Path(run).name for cfg, run in zip(configs, runs)]

    # Runs without Γ borrow the support of the first run that has one.
    reference = next((i for i, p in enumerate(paths) if p.final_support is not None), None)

    with paper_style():
        fig = Figure(figsize=(COLUMN_WIDTH * len(runs), PANEL_HEIGHT), layout="constrained")
        # One y-scale for all panels: SGD's larger norms must look larger than SplitLBI's.
        axes = fig.subplots(1, len(runs), squeeze=False, sharey=True)[0]
        supports, notes = [], []
        for run_paths, label in zip(paths, labels):
            support, note = run_paths.final_support, None
            if support is None and reference is not None:
                support = paths[reference].final_support
                if len(support) != run_paths.num_filters:
                    raise SplitLBIError(
                        f"layer {layer!r} has {run_paths.num_filters} filters in {label} "
                        f"but {len(support)} in {labels[reference]}; cannot compare"
                    )
                note = f"coloured by Γ of {labels[reference]}"
            elif support is None:
                note = "no SplitLBI run given: support of Γ unknown"
            supports.append(support)
            notes.append(note)
        if any(notes):  # a blank legend title elsewhere keeps the legends of all panels aligned
            notes = [note or " " for note in notes]
        for ax, run_paths, label, support, note in zip(axes, paths, labels, supports, notes):
            _draw_paths(ax, run_paths, support)
            _support_legend(ax, support, run_paths.num_filters, note)
            ax.set_title(label)
            ax.set_xlabel("epoch")
            if ax is axes[0]:  # one shared y-scale: its label once
                ax.set_ylabel("filter ℓ2 norm ‖W$_f$‖")
            ax.set_xlim(run_paths.epochs[0], run_paths.epochs[-1])
        # After every panel is drawn: fixing the limits earlier would size the shared scale to the first run.
        axes[0].set_ylim(bottom=0)
        if title:
            fig.suptitle(title)
    return fig


def plot_filter_paths(
    runs: Sequence[Path],
    layer: str,
    out: Path,
    title: Optional[str] = None,
    pdf: bool = False,
) -> Path:
    """Draw the filter paths of ``layer`` for ``runs`` and save them to ``out`` (and a PDF)."""
    fig = make_filter_path_figure(runs, layer, title=title)
    return save_figure(fig, out, pdf=pdf)
