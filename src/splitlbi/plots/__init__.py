"""Figures of the paper from run directories: filter paths, filter images, guided backprop, curves, style.

Names are loaded lazily so that ``import splitlbi.plots`` (and ``splitlbi --help``) does
not pay for matplotlib. The ``splitlbi plot`` command is :mod:`splitlbi.cli.figures`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "plot_filter_paths": "path",
    "make_filter_path_figure": "path",
    "read_filter_paths": "path",
    "FilterPaths": "path",
    "activation_maximization": "filters",
    "filter_activations": "filters",
    "plot_filter_grid": "filters",
    "plot_filter_visualizations": "filters",
    "first_conv_block": "guided",
    "guided_backprop_responses": "guided",
    "plot_guided_backprop": "guided",
    "Panel": "curves",
    "Series": "curves",
    "draw_panels": "curves",
    "read_metrics": "curves",
    "plot_growth": "growth",
    "GrowthBaseline": "growth",
    "apply_paper_style": "style",
    "paper_style": "style",
    "method_color": "style",
    "run_label": "style",
    "save_figure": "style",
    "SELECTED_COLOR": "style",
    "NOT_SELECTED_COLOR": "style",
    "UNKNOWN_SUPPORT_COLOR": "style",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
