"""``splitlbi compact RUN_DIR --epoch K --out model.pt``: remove the filters outside the
support of Γ for real and save the smaller model (see :mod:`splitlbi.prune.compact`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict

import torch

from splitlbi.cli.argtypes import positive_int
from splitlbi.errors import SplitLBIError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``compact`` on the ``splitlbi`` subcommand parsers."""
    parser = subparsers.add_parser(
        "compact",
        help="remove the filters outside the support of Γ and save the smaller model",
        description="Load the weights W of epoch K of a run and the support of Γ at epoch K (masks/, or "
                    "--masks FILE), zero the unselected conv filters (weights, bias and the affine "
                    "parameters of their BatchNorm channel), remove them for real with torch-pruning "
                    "(with the BN channels and next-layer inputs that depend on them), save the whole "
                    "compact module with torch.save, and print parameters, MACs and CPU latency "
                    "before -> after. Channels coupled by residual additions are removed only when "
                    "unselected in every coupled conv. Load the result with "
                    "torch.load(path, weights_only=False).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by 'splitlbi train'")
    parser.add_argument("--epoch", type=positive_int, required=True, metavar="K",
                        help="epoch whose checkpoint (checkpoints/epoch_K.pt) and masks are used")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to save the compact model (.pt)")
    parser.add_argument("--masks", metavar="FILE",
                        help="a mask file ({'masks': {param name: bool tensor}}) instead of the run's "
                             "masks/epoch_K.pt")
    parser.add_argument("--allow-empty-mask", action="store_true",
                        help="accept a mask that keeps no weight at all (refused by default)")
    parser.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                        help="batch size of the latency measurement (default: 16)")
    parser.add_argument("--repeats", type=positive_int, default=20, metavar="N",
                        help="timed forward passes; the median is reported (default: 20)")
    parser.set_defaults(func=run)
    return parser


def _input_shape(info: Dict[str, Any]) -> tuple:
    size = info.get("pad_to") or info.get("image_size") or 32
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    return int(info.get("in_channels", 3)), height, width


def run(args: argparse.Namespace) -> int:
    from splitlbi.prune.compact import compact_model
    from splitlbi.prune.masks import check_not_empty, load_run_masks, read_mask_file
    from splitlbi.train.run import list_checkpoints, load_model_from_run, read_run_config
    from splitlbi.utils.io import atomic_torch_save

    run_dir = Path(args.run_dir)
    info = read_run_config(run_dir)
    available = list(list_checkpoints(run_dir))
    if args.epoch not in available:
        listed = ", ".join(map(str, available)) or "none"
        raise SplitLBIError(f"{run_dir} has no checkpoint of epoch {args.epoch} (available epochs: {listed})")
    if args.masks is not None:
        masks = read_mask_file(args.masks)["masks"]
    else:
        masks = load_run_masks(run_dir, args.epoch)
    check_not_empty(masks, f"the masks ({args.masks or f'{run_dir} epoch {args.epoch}'})", args.allow_empty_mask)
    model = load_model_from_run(run_dir, weights=args.epoch).eval()

    shape = _input_shape(info)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(args.batch_size, *shape, generator=generator)
    compact, report = compact_model(model, masks, batch[:1], latency_repeats=args.repeats, latency_input=batch)

    out = Path(args.out)
    atomic_torch_save(compact, out)
    print(f"{info.get('model', 'model')} epoch {args.epoch}: input {list(shape)}, latency batch {args.batch_size}")
    for line in report.lines():
        print(line)
    print(f"wrote {out} (load with torch.load(path, weights_only=False))")
    return 0
