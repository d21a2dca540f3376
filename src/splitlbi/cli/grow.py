"""``splitlbi grow``: parse the command line into a TrainConfig and a GrowthRule and grow a network."""

from __future__ import annotations

import argparse
import dataclasses
from datetime import datetime
from pathlib import Path

from splitlbi.cli.argtypes import positive_float, positive_int
from splitlbi.cli.train import _given_settings, add_training_options, config_from_arguments
from splitlbi.errors import SplitLBIError

__all__ = ["add_parser", "rule_from_arguments", "run"]

#: The growth options and their GrowthRule fields.
_RULE_OPTIONS = {"check_every": "check_every", "tau": "tau", "grow_ratio": "ratio", "grow_count": "count",
                 "max_widths": "max_widths", "grow_until": "until", "new_filters": "init"}


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``grow`` on the ``splitlbi`` subcommand parsers."""
    from splitlbi.grow import GROWABLE, GrowthRule
    from splitlbi.grow.widen import NEW_FILTER_INITS

    defaults = GrowthRule()
    parser = subparsers.add_parser(
        "grow",
        help="start narrow and widen, along the SplitLBI path, the layers whose filters it fills",
        description="Train a narrow network (--widths) with SplitLBI; every --check-every epochs, widen each "
                    "layer (ResNets: each stage) of which at least --tau of the filters are in the support of "
                    "Γ, by --grow-ratio or --grow-count filters up to --max-widths, keeping the network's "
                    "function, the old filters' weights, momentum and V (new filters start with V = 0). The "
                    "first check where nothing grows ends the growth; training goes on to --epochs. Writes a "
                    "run directory like 'splitlbi train' plus checks.csv and stages.csv (widths, MACs, "
                    f"parameters and accuracy of each stage). Models: {GROWABLE}. "
                    "A stopped or killed run continues with --resume RUN_DIR.",
    )
    add_training_options(parser, baselines=False, extras=False)
    option = dict(default=argparse.SUPPRESS)
    growth = parser.add_argument_group("growth")
    growth.add_argument("--check-every", type=positive_int, metavar="EPOCHS", **option,
                        help=f"epochs between checks (the paper's local_epoch) (default: {defaults.check_every})")
    growth.add_argument("--tau", type=positive_float, metavar="SHARE", **option,
                        help="grow a layer when at least this share of its filters is selected by the path "
                             f"(default: {defaults.tau:g})")
    by = growth.add_mutually_exclusive_group()
    by.add_argument("--grow-ratio", type=positive_float, metavar="R", **option,
                    help=f"a full layer grows to ceil(width x R) filters (default: {defaults.ratio:g})")
    by.add_argument("--grow-count", type=positive_int, metavar="N", **option,
                    help="a full layer grows by N filters (instead of --grow-ratio)")
    growth.add_argument("--max-widths", type=positive_int, nargs="+", metavar="N", **option,
                        help="the cap of each layer (stage), in the order of --widths (default: the model's "
                             "standard widths)")
    growth.add_argument("--grow-until", type=positive_int, metavar="EPOCH", **option,
                        help="no check after this epoch (default: checks until the last epoch)")
    growth.add_argument("--new-filters", choices=NEW_FILTER_INITS, **option,
                        help="how a new filter's weights start (its outgoing weights are zero either way): matched "
                             "(drawn as the model initializes, then scaled to the median norm of the layer's filters, "
                             "so that it can enter the support of Γ) or drawn (as the model initializes) "
                             f"(default: {defaults.init})")
    parser.set_defaults(func=run)
    return parser


def rule_from_arguments(namespace: argparse.Namespace):
    """The GrowthRule of the given growth options over the defaults (None: none given)."""
    from splitlbi.grow import GrowthRule

    given = {field: getattr(namespace, option) for option, field in _RULE_OPTIONS.items() if hasattr(namespace, option)}
    if not given:
        return None
    return GrowthRule(**given)


def run(namespace: argparse.Namespace) -> int:
    """Execute ``splitlbi grow``."""
    from splitlbi.grow import GrowthRule, grow_network
    from splitlbi.train.rundir import read_run_config, train_config_from_info

    rule = rule_from_arguments(namespace)
    if namespace.resume is not None:
        run_dir = Path(namespace.resume)
        if not run_dir.is_dir():
            raise SplitLBIError(f"--resume {run_dir}: no such directory")
        info = read_run_config(run_dir)
        given = _given_settings(namespace)
        given.setdefault("progress", True)  # showing a bar is not a property of the run
        config = dataclasses.replace(train_config_from_info(info), **given)
        if rule is not None and "grow" in info:  # options given on resume must agree with the stored rule
            rule = dataclasses.replace(GrowthRule.from_dict(info["grow"]),
                                       **{field: getattr(rule, field) for option, field in _RULE_OPTIONS.items()
                                          if hasattr(namespace, option)})
        grow_network(config, rule, run_dir, resume=True)
    else:
        config = config_from_arguments(namespace)
        rule = rule if rule is not None else GrowthRule()
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(namespace.out) if namespace.out is not None else Path("runs") / f"{config.model}-{config.dataset}-grow-{stamp}"
        grow_network(config, rule, run_dir)
    print(f"done: {run_dir}")
    return 0
