"""``splitlbi plot ...``: the figure commands; the figures themselves are :mod:`splitlbi.plots`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from splitlbi.cli.argtypes import non_negative_int, output_path, positive_float, positive_int, seed

__all__ = ["add_parser"]


def _output_file(text: str) -> Path:
    return Path(output_path(text))


def _cmd_path(args: argparse.Namespace) -> int:
    from splitlbi.plots.path import plot_filter_paths

    out = plot_filter_paths(args.runs, args.layer, args.out, title=args.title, pdf=args.pdf)
    print(f"wrote {out}" + (f" and {out.with_suffix('.pdf')}" if args.pdf else ""))
    return 0


def _cmd_filters(args: argparse.Namespace) -> int:
    from splitlbi.plots.filters import plot_filter_visualizations, plot_selected_filters

    if args.per_group is not None:
        out = plot_selected_filters(
            args.run, args.layer, args.epochs, args.out, per_group=args.per_group, support_from=args.support_from,
            steps=args.steps, lr=args.lr, seed=args.seed, title=args.title, pdf=args.pdf,
            progress=not args.no_progress,
        )
        print(f"wrote {out}, {out.with_suffix('.csv')}" + (f" and {out.with_suffix('.pdf')}" if args.pdf else ""))
        return 0
    out = plot_filter_visualizations(
        args.run, args.layer, args.epochs, args.out,
        steps=args.steps, num_filters=args.filters, support_from=args.support_from,
        lr=args.lr, seed=args.seed, title=args.title, pdf=args.pdf, progress=not args.no_progress,
    )
    print(f"wrote {out}" + (f" and {out.with_suffix('.pdf')}" if args.pdf else ""))
    return 0


def _cmd_grow(args: argparse.Namespace) -> int:
    from splitlbi.plots.growth import plot_growth

    paths = plot_growth(args.runs, args.out, title=args.title)
    print("wrote " + ", ".join(str(path) for path in paths))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``plot`` with its sub-commands ``path`` and ``filters`` on ``subparsers``."""
    plot = subparsers.add_parser(
        "plot", help="draw the paper's figures from run directories",
        description="Draw figures from run directories written by `splitlbi train`.",
    )
    commands = plot.add_subparsers(dest="plot_command", metavar="{path,filters,grow}", required=True)

    path = commands.add_parser(
        "path", help="filter-norm paths, coloured by the support of Γ (Figure 1)",
        description="One panel per run: the ℓ2 norm of every filter of LAYER against epoch, "
        "blue if the filter is in the final support of Γ, red if not. Runs without Γ (SGD) "
        "are coloured by the first SplitLBI run given.",
    )
    path.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories, one panel each")
    path.add_argument("--layer", required=True, help="layer (module name) as in path.csv, e.g. conv3")
    path.add_argument("--out", required=True, type=_output_file, help="output PNG")
    path.add_argument("--title", default=None, help="figure title")
    path.add_argument("--pdf", action="store_true", help="also save a PDF next to the PNG")
    path.set_defaults(func=_cmd_path)

    filters = commands.add_parser(
        "filters", help="filter images by activation maximization at some epochs (Figure 1)",
        description="For each epoch, the input images that maximize each filter of LAYER "
        "(Erhan et al. 2009), framed blue if the filter is selected by Γ at the last epoch, "
        "red if not (with --per-group: by the support at each epoch).",
    )
    filters.add_argument("run", type=Path, metavar="RUN_DIR", help="run directory with checkpoints/")
    filters.add_argument("--layer", required=True, help="conv layer (module name), e.g. conv3")
    filters.add_argument("--epochs", required=True, nargs="+", type=non_negative_int, metavar="EPOCH",
                         help="epochs to show (0 = initialization)")
    filters.add_argument("--out", required=True, type=_output_file, help="output PNG")
    filters.add_argument("--steps", type=non_negative_int, default=200, help="ascent steps (default 200)")
    filters.add_argument("--lr", type=positive_float, default=0.1,
                         help="ascent step as a fraction of the image-norm bound (default 0.1)")
    filters.add_argument("--seed", type=seed, default=0, help="seed of the starting noise (default 0)")
    shown = filters.add_mutually_exclusive_group()
    shown.add_argument("--filters", type=positive_int, default=None, metavar="N",
                       help="show only the first N filters (default all)")
    shown.add_argument("--per-group", type=positive_int, default=None, metavar="K",
                       help="Figure 1's comparison: K filters selected by Γ at the end and K not, each epoch at "
                            "every image's own contrast and at one shared contrast weighted by the filter's "
                            "activation gain (weak filters fade to grey), frames by the support at that epoch, "
                            "‖W_f‖ on each tile; also writes OUT.csv with every filter's norm, support and gain")
    filters.add_argument("--support-from", type=Path, default=None, metavar="RUN_DIR",
                         help="frame by the Γ of this (SplitLBI) run, e.g. for an SGD run with the same init")
    filters.add_argument("--title", default=None, help="figure title")
    filters.add_argument("--pdf", action="store_true", help="also save a PDF next to the PNG")
    filters.add_argument("--no-progress", action="store_true",
                         help="no progress bars (drawn only when stderr is a terminal anyway)")
    filters.set_defaults(func=_cmd_filters)

    grow = commands.add_parser(
        "grow", help="widths along the run and accuracy against MACs of 'splitlbi grow' runs",
        description="Left: the width of each layer (ResNets: stage) of the grow runs along the run, in percent "
        "of the standard network, one line per run. Right: test accuracy against MACs of each "
        "run's stages and of the final grown networks. Writes the PNG, a PDF and the CSV of the numbers.",
    )
    grow.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="grow run directories (e.g. seeds)")
    grow.add_argument("--out", required=True, type=Path, help="output PNG (the PDF and CSV go beside it)")
    grow.add_argument("--title", default=None, help="figure title")
    grow.set_defaults(func=_cmd_grow)
    return plot
