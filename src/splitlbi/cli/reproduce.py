"""``splitlbi reproduce``: the command line of :func:`splitlbi.experiments.reproduce.reproduce`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from splitlbi.cli.argtypes import output_path
from splitlbi.experiments.recipes import EXPERIMENTS
from splitlbi.experiments.reproduce import reproduce

__all__ = ["add_parser"]


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``reproduce`` on the ``splitlbi`` subcommand parsers."""
    parser = subparsers.add_parser(
        "reproduce", help="run a figure's experiment from its recipe (or reuse finished runs) and draw it",
        description="Run what a figure or table of the paper needs, as its recipe (recipes/<fig>.toml) says at "
                    "--scale, skipping finished runs and resuming interrupted ones, then draw it into "
                    "OUT/figures/<fig>.png (+ .pdf and the .csv of the plotted numbers).")
    parser.add_argument("figures", nargs="+", metavar="FIG", help=f"{', '.join(EXPERIMENTS)}, or all (the "
                        "figures and table of the paper; prune-bench, the pruning benchmark at a MACs budget, "
                        "runs only when named)")
    parser.add_argument("--scale", default="smoke", help="recipe scale: smoke (minutes on a CPU), cpu (the runs "
                        "of docs/results.md), paper (the paper's setting) (default: smoke)")
    parser.add_argument("--out", type=output_path, metavar="DIR", help="reproduction folder (default: reproduce-<scale>)")
    parser.add_argument("--data-dir", metavar="DIR", help="dataset folder (default: $SPLITLBI_DATA, else "
                        "~/.cache/splitlbi)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change one recipe entry, e.g. --set train.model=vgg16_bn --set run.seeds=[0,1]")
    parser.add_argument("--recipe", metavar="FILE", help="use this recipe file instead of the bundled one")
    parser.add_argument("--reuse", nargs="+", default=[], metavar="RUN_DIR",
                        help="finished `splitlbi train` runs to copy in where a needed run has exactly their settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run)
    return parser


def _run(arguments: argparse.Namespace) -> int:
    data_dir = arguments.data_dir or os.environ.get("SPLITLBI_DATA")
    reproduce(arguments.figures, arguments.scale, Path(arguments.out) if arguments.out else None,
              data_dir=data_dir, device=arguments.device, progress=not arguments.no_progress,
              overrides=arguments.overrides, recipe_file=Path(arguments.recipe) if arguments.recipe else None,
              reuse=[Path(folder) for folder in arguments.reuse])
    return 0
