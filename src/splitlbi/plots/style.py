"""One visual language for every figure of the paper reproduction.

Colours mean the same thing in every figure: a filter or weight *selected* by the
support of Γ is blue, one left out is red, and "unknown" (no Γ to read) is grey.
Each optimizer / baseline has its own colour so curves of the same method match
across figures. :data:`PAPER_RC` sizes fonts and lines for a figure printed at
column width (≈ 3.3 in per panel), where matplotlib's defaults are far too large.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import matplotlib
from matplotlib.figure import Figure

# Support colours (matplotlib's tab10 blue/red, so they sit well next to method colours).
SELECTED_COLOR = "#1f77b4"
NOT_SELECTED_COLOR = "#d62728"
UNKNOWN_SUPPORT_COLOR = "#7f7f7f"

# Method colours: SplitLBI is the hero (dark blue), baselines get distinct hues.
METHOD_COLORS: dict[str, str] = {
    "splitlbi": "#08519c",
    "sgd": "#ff7f0e",
    "adam": "#2ca02c",
    "adamw": "#98df8a",
    "adagrad": "#9467bd",
    "adadelta": "#c5b0d5",
    "rmsprop": "#8c564b",
    "network_slimming": "#e377c2",
    "soft_filter_pruning": "#bcbd22",
    "scratch_e": "#17becf",
    "scratch_b": "#9edae5",
    "lottery": "#7f7f7f",
}
FALLBACK_METHOD_COLOR = "#333333"

# Display names of optimizers / baselines as the paper writes them.
METHOD_NAMES: dict[str, str] = {
    "splitlbi": "SplitLBI",
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "adagrad": "AdaGrad",
    "adadelta": "Adadelta",
    "rmsprop": "RMSprop",
    "network_slimming": "Network Slimming",
    "soft_filter_pruning": "Soft Filter Pruning",
    "scratch_e": "Scratch-E",
    "scratch_b": "Scratch-B",
    "lottery": "Lottery",
}

# Figure widths in inches (two-column paper layout).
COLUMN_WIDTH = 3.3
FULL_WIDTH = 6.9
PANEL_HEIGHT = 2.5
SAVE_DPI = 150

PAPER_RC: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 10,
    "lines.linewidth": 1.0,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": SAVE_DPI,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
    # Embed TrueType fonts so PDFs stay editable and pass camera-ready checks.
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
}


def apply_paper_style() -> None:
    """Set matplotlib's global rcParams to the paper style (for notebooks and scripts)."""
    matplotlib.rcParams.update(PAPER_RC)


@contextlib.contextmanager
def paper_style(overrides: Optional[Mapping[str, Any]] = None) -> Iterator[None]:
    """Use the paper style inside a ``with`` block, leaving global rcParams untouched."""
    rc = dict(PAPER_RC)
    if overrides:
        rc.update(overrides)
    with matplotlib.rc_context(rc):
        yield


def support_color(selected: Optional[bool]) -> str:
    """Colour of a filter/weight by its membership in the support of Γ (None = unknown)."""
    if selected is None:
        return UNKNOWN_SUPPORT_COLOR
    return SELECTED_COLOR if selected else NOT_SELECTED_COLOR


def method_key(name: str) -> str:
    """Normalise an optimizer/baseline name ("Soft-Filter-Pruning" -> "soft_filter_pruning")."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def method_color(name: str) -> str:
    """The colour of a method, the same in every figure."""
    return METHOD_COLORS.get(method_key(name), FALLBACK_METHOD_COLOR)


def method_name(name: str) -> str:
    """The paper's spelling of a method name; unknown names are returned unchanged."""
    return METHOD_NAMES.get(method_key(name), name)


def format_number(value: Any) -> str:
    """Short form of a hyperparameter for a label: 1.0 -> "1", 0.001 -> "0.001", 100 -> "100"."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def run_label(config: Mapping[str, Any]) -> str:
    """Panel/legend label of a run from its config: "SplitLBI (κ=1, ν=100)", "SGD", ...

    SplitLBI runs carry their κ and ν because the paper compares several of them.
    """
    optimizer = str(config.get("optimizer", "") or "")
    if not optimizer:
        return str(config.get("name", "run"))
    label = method_name(optimizer)
    if method_key(optimizer) == "splitlbi":
        params = [
            f"{symbol}={format_number(config[key])}"
            for symbol, key in (("κ", "kappa"), ("ν", "nu"))
            if config.get(key) is not None
        ]
        if params:
            label += f" ({', '.join(params)})"
    return label


def save_figure(fig: Figure, out: Path, pdf: bool = False) -> Path:
    """Write ``fig`` to ``out`` (PNG at :data:`SAVE_DPI`) and, with ``pdf``, a PDF beside it.

    Parent folders are created. Returns ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with paper_style():
        fig.savefig(out, dpi=SAVE_DPI)
        if pdf and out.suffix.lower() != ".pdf":
            fig.savefig(out.with_suffix(".pdf"))
    return out
