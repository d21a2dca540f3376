"""Argument types shared by the subcommands (argparse turns their errors into one line)."""

from __future__ import annotations

import argparse

from splitlbi.train.config import MAX_SEED


def epoch_list(text: str) -> list[int]:
    """``80,120`` or ``80`` -> epochs; lets ``--lr-milestones 80 120`` and ``80,120`` both work."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs like 80,120, got {text!r}") from None


def _number(text: str, kind: type) -> float:
    try:
        return kind(text)
    except ValueError:
        expected = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def seed(text: str) -> int:
    """A random seed: a whole number from 0 to 2**32 - 1."""
    value = int(_number(text, int))
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SEED} (2**32 - 1), got {text}")
    return value


def output_path(text: str) -> str:
    """A file or folder to write: anything but the empty string (which would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text
def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model MODULE:FACTORY`` of the commands that read a run (masks, retrain, compact):
    the factory of a model that the run's config.json names but this process cannot build."""
    parser.add_argument("--model", metavar="MODULE:FACTORY",
                        help="the run's network as package.module:factory, for a run whose config.json names a "
                             "model this process cannot build (one registered by your own code); runs trained "
                             "with --model MODULE:FACTORY need nothing")
