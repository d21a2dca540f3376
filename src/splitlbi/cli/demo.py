"""``splitlbi demo``: the command line of :func:`splitlbi.experiments.demo.run_demo`."""

from __future__ import annotations

import argparse

from splitlbi.cli.argtypes import output_path, positive_int
from splitlbi.experiments.demo import DEMO_EPOCHS, format_summary, run_demo

__all__ = ["add_parser"]


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``demo`` on the ``splitlbi`` subcommand parsers."""
    parser = subparsers.add_parser(
        "demo",
        help="Figure 1 in half a minute: LeNet-5 on the bundled digits, SplitLBI vs SGD (no download)",
        description="Train LeNet-5 on scikit-learn's bundled digits with SplitLBI and with SGD from the same "
                    "initialization, then draw the conv3 filter paths (filter_paths.png), activation-maximization "
                    "images of conv3 filters (conv3_filters.png) and write summary.txt. Runs offline on a CPU "
                    "in well under a minute. Re-running into the same --out replaces its previous output.",
    )
    parser.add_argument("--out", type=output_path, default="splitlbi-demo", metavar="DIR",
                        help="output folder: new, empty or a previous demo's (default: ./splitlbi-demo)")
    parser.add_argument("--epochs", type=positive_int, default=DEMO_EPOCHS, metavar="N",
                        help=f"epochs of each run (default: {DEMO_EPOCHS})")
    parser.add_argument("--no-progress", action="store_true", help="print only the summary")
    parser.set_defaults(func=_run)
    return parser


def _run(namespace: argparse.Namespace) -> int:
    progress = not namespace.no_progress
    summary = run_demo(namespace.out, epochs=namespace.epochs, progress=progress)
    text = format_summary(summary)
    print(("\n" if progress else "") + text, end="")
    return 0
