"""The figure of growing networks: the width of each layer over the run, and accuracy against MACs.

One panel per grow run given (e.g. seeds): each width group's width in percent of the
family's standard width, epoch by epoch. Last panel: test accuracy
against MACs (percent of the standard network's): each run's stages (the accuracy at the
end of each stage against the stage's MACs), the final grown networks (mean ± std), and
any baselines given as points (mean ± std over their repeats). Written as PNG, PDF and the
CSV of the plotted numbers (:func:`splitlbi.plots.curves.draw_panels`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from splitlbi.errors import SplitLBIError
from splitlbi.plots.curves import Panel, Series, draw_panels
from splitlbi.plots.style import METHOD_COLORS

__all__ = ["GrowthBaseline", "plot_growth", "BASELINE_COLORS"]

#: Colours of the benchmark's points (the grown network is SplitLBI's colour).
BASELINE_COLORS = {"standard": "#333333", "narrow": "#ff7f0e", "pruned": "#2ca02c"}
GROWN_COLOR = METHOD_COLORS["splitlbi"]
#: One hue per width group on the left panel (tab10 without SplitLBI's blue).
GROUP_COLORS = ("#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
                "#ff7f0e", "#1f77b4")
#: Line styles of the width groups (a group hidden under another at the same share still shows).
GROUP_STYLES = ("-", "--", ":", "-.")
#: Markers of the runs' stages on the accuracy panel.
RUN_MARKERS = (".", "^", "s", "D", "v", "P")


@dataclass
class GrowthBaseline:
    """A network to compare with: its name, and per repeat its MACs and test accuracy (percent)."""

    name: str
    macs: List[float]
    accuracy: List[float]
    color: Optional[str] = None


def _mean_std(values: Sequence[float]) -> tuple:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _width_panels(runs: Sequence[Path], seeds: Sequence[object], groups: Sequence[str],
                  standard: Dict[str, int]) -> List[Panel]:
    """One panel per run with a staircase per width group: runs that stop growing at
    different epochs are not summarized well by a mean and a std band (which can pass the cap)."""
    from splitlbi.grow import read_stages

    panels = []
    for run_index, (run, seed) in enumerate(zip(runs, seeds)):
        stages = read_stages(run)
        epochs = [(stage, e) for stage in stages for e in range(stage["first_epoch"], stage["last_epoch"] + 1)]
        # A staircase: epoch e is trained at its width from e - 1 to e (widths change between epochs).
        x = [float(edge) for _, e in epochs for edge in (e - 1, e)]
        title = "Width of each layer along the run" if len(runs) == 1 else \
            f"Widths along run {run_index + 1} (seed {seed})"
        panels.append(Panel(title, "epoch", "width (% of the standard)", series=[
            Series(group, x, [100.0 * stage["widths"][group] / standard[group] for stage, _ in epochs for _ in (0, 1)],
                   color=GROUP_COLORS[index % len(GROUP_COLORS)], style=GROUP_STYLES[index % len(GROUP_STYLES)])
            for index, group in enumerate(groups)]))
    return panels


def plot_growth(runs: Sequence[Path], out: Path, *, baselines: Sequence[GrowthBaseline] = (),
                title: Optional[str] = None, note: Optional[str] = None) -> List[Path]:
    """Draw the growth figure of the grow run directories ``runs`` (same model; e.g. one per
    seed) with ``baselines`` on the accuracy panel; write ``out`` (.png), .pdf and .csv.

    Returns the paths written. Raises :class:`SplitLBIError` when a run is not a grow run
    or the runs grow different models.
    """
    from splitlbi.grow import GROW_KEY, input_shape, layout_of_config, network_cost, read_stages
    from splitlbi.train.rundir import read_run_config, train_config_from_info

    if not runs:
        raise SplitLBIError("no grow runs to plot")
    infos = [read_run_config(run) for run in runs]
    for run, info in zip(runs, infos):
        if GROW_KEY not in info:
            raise SplitLBIError(f"{run} is not a 'splitlbi grow' run")
    if len({info["model"] for info in infos}) > 1:
        raise SplitLBIError(f"the runs grow different models ({', '.join(sorted({i['model'] for i in infos}))})")
    info = infos[0]
    layout = layout_of_config(train_config_from_info(info))
    standard = dict(zip(layout.groups, layout.standard))
    standard_macs = network_cost(info["model"], info["num_classes"], info["in_channels"], input_shape(info),
                                 layout.standard)[0]

    widths = _width_panels(runs, [i.get("seed") for i in infos], layout.groups, standard)
    accuracy = Panel("Accuracy against MACs", "MACs (% of the standard network)", "test accuracy (%)")
    finals_macs, finals_accuracy = [], []
    for seed_index, (run, run_info) in enumerate(zip(runs, infos)):
        stages = [s for s in read_stages(run) if s["test_acc"] is not None]
        if not stages:
            continue
        accuracy.series.append(Series(f"grown: stages of run {seed_index + 1} (seed {run_info.get('seed')})",
                                      [100.0 * s["macs"] / standard_macs for s in stages],
                                      [s["test_acc"] for s in stages], color=GROWN_COLOR, style=":",
                                      marker=RUN_MARKERS[seed_index % len(RUN_MARKERS)]))
        finals_macs.append(100.0 * stages[-1]["macs"] / standard_macs)
        finals_accuracy.append(stages[-1]["test_acc"])
    if finals_macs:
        macs_mean, _ = _mean_std(finals_macs)
        accuracy_mean, accuracy_std = _mean_std(finals_accuracy)
        accuracy.series.append(Series("grown (final)", [macs_mean], [accuracy_mean],
                                      [accuracy_std] if len(finals_accuracy) > 1 else None, n=len(finals_accuracy),
                                      color=GROWN_COLOR, style="", marker="*", band=False))
    for index, baseline in enumerate(baselines):
        macs_mean, _ = _mean_std([100.0 * m / standard_macs for m in baseline.macs])
        accuracy_mean, accuracy_std = _mean_std(baseline.accuracy)
        color = baseline.color or BASELINE_COLORS.get(baseline.name.split()[0].lower(),
                                                      GROUP_COLORS[index % len(GROUP_COLORS)])
        accuracy.series.append(Series(baseline.name, [macs_mean], [accuracy_mean],
                                      [accuracy_std] if len(baseline.accuracy) > 1 else None, n=len(baseline.accuracy),
                                      color=color, style="", marker="o", band=False))
    model_title = title or f"Growing {info['model']} along the SplitLBI path ({len(runs)} run(s))"
    return draw_panels([*widths, accuracy], Path(out), columns=2, title=model_title, note=note, shared_legend=True)

