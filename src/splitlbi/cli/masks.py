"""``splitlbi masks``: the support of Γ at an epoch as a mask file, or magnitude masks like it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping

from torch import Tensor

from splitlbi.cli.argtypes import non_negative_int
from splitlbi.errors import SplitLBIError

__all__ = ["add_parser", "run", "format_sparsity"]


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``masks`` on the ``splitlbi`` subcommand parsers."""
    parser = subparsers.add_parser(
        "masks",
        help="save the support of Γ at an epoch (or magnitude masks like it) as a mask file",
        description="Save the support of Γ at --epoch K of a SplitLBI run as a mask file and print the share "
                    "of weights and filters kept per layer. With --like MASK_FILE: magnitude masks of RUN_DIR's "
                    "final weights (e.g. an SGD run) keeping the same number of weights per layer (whole "
                    "filters with the largest l2 norms where the reference is filter-structured, else the "
                    "largest |w|): the pruning step of SGD (Lottery).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory")
    parser.add_argument("--epoch", type=non_negative_int, metavar="K",
                        help="epoch whose support of Γ to save (SplitLBI runs; not with --like)")
    parser.add_argument("--like", metavar="MASK_FILE",
                        help="reference mask file: make magnitude masks of RUN_DIR's last weights with its "
                             "per-layer sparsity")
    parser.add_argument("--out", metavar="FILE", help="where to write the mask file (default: masks.pt; "
                        "without --out and --like, masks_epochK.pt)")
    parser.set_defaults(func=run)
    return parser


def format_sparsity(masks: Mapping[str, Tensor]) -> str:
    """Per-layer and overall share of weights kept, and filters kept, as printable lines."""
    from splitlbi.prune import mask_sparsity

    sparsity = mask_sparsity(masks)
    width = max(len(name) for name in masks)
    lines = [f"{'parameter':<{width}}  {'kept':>8}  filters kept"]
    for name in masks:
        lines.append(f"{name:<{width}}  {100.0 * sparsity.layers[name]:7.2f}%  "
                     f"{sparsity.filters_kept[name]}/{sparsity.filters_total[name]}")
    lines.append(f"{'overall':<{width}}  {100.0 * sparsity.overall:7.2f}%")
    return "\n".join(lines)


def run(arguments: argparse.Namespace) -> int:
    from splitlbi.prune import load_run_masks, magnitude_masks_like, read_mask_file, save_mask_file
    from splitlbi.train.run import load_checkpoint, read_run_config

    info = read_run_config(arguments.run_dir)
    if arguments.like is not None:
        if arguments.epoch is not None:
            raise SplitLBIError("--like uses RUN_DIR's last weights; drop --epoch")
        reference = read_mask_file(arguments.like)
        if reference.get("model") not in (None, info["model"]):
            raise SplitLBIError(f"--like {arguments.like} holds masks of model {reference['model']}, "
                                f"but {arguments.run_dir} trained {info['model']}")
        checkpoint = load_checkpoint(arguments.run_dir)
        masks = magnitude_masks_like(checkpoint["model"], reference["masks"])
        out = Path(arguments.out or "masks.pt")
        save_mask_file(out, masks, model=info["model"], epoch=int(checkpoint["epoch"]), source=arguments.run_dir,
                       kind="magnitude")
        print(f"magnitude masks of {arguments.run_dir} (epoch {checkpoint['epoch']}) like {arguments.like}")
    else:
        if arguments.epoch is None:
            raise SplitLBIError("give --epoch K (the epoch whose support of Γ to save) or --like MASK_FILE")
        masks = load_run_masks(arguments.run_dir, arguments.epoch)
        out = Path(arguments.out or f"masks_epoch{arguments.epoch}.pt")
        save_mask_file(out, masks, model=info["model"], epoch=arguments.epoch, source=arguments.run_dir)
        print(f"support of Γ of {arguments.run_dir} at epoch {arguments.epoch}")
    print(format_sparsity(masks))
    print(f"wrote {out}")
    return 0
