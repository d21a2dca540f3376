"""``splitlbi masks``: the support of Γ at an epoch as a mask file, masks at a MACs or
parameter budget chosen by path score, or magnitude masks like a mask file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping

from torch import Tensor

from splitlbi.cli.argtypes import add_model_option, non_negative_int, output_path
from splitlbi.prune.budget import AGGREGATIONS, DEFAULT_NORMALIZE, NORMALIZATIONS
from splitlbi.errors import SplitLBIError

__all__ = ["add_parser", "run", "format_sparsity"]


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``masks`` on the ``splitlbi`` subcommand parsers."""
    parser = subparsers.add_parser(
        "masks",
        help="save the support of Γ at an epoch, masks at a MACs/params budget, or magnitude masks as a mask file",
        description="Save the support of Γ at --epoch K of a SplitLBI run as a mask file and print the share "
                    "of weights and filters kept per layer. With --macs F or --params F: keep whole conv "
                    "filters by their path score at epoch K (||V_g||/lambda, how close a filter is to entering "
                    "the support) so that the network compacted for real ('splitlbi compact') keeps at most F of "
                    "the dense network's MACs or parameters and at least F - 0.02; channels coupled by residual "
                    "connections go together. With --like MASK_FILE: magnitude masks of RUN_DIR's "
                    "final weights (e.g. an SGD run) keeping the same number of weights per layer (whole "
                    "filters with the largest l2 norms where the reference is filter-structured, else the "
                    "largest |w|): the pruning step of SGD (Lottery).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory")
    add_model_option(parser)
    parser.add_argument("--epoch", type=non_negative_int, metavar="K",
                        help="epoch whose support of Γ to save (SplitLBI runs; not with --like)")
    parser.add_argument("--like", metavar="MASK_FILE",
                        help="reference mask file: make magnitude masks of RUN_DIR's last weights with its "
                             "per-layer sparsity")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--macs", type=float, metavar="F",
                        help="keep a fraction F in (0, 1] of the dense network's MACs (with --epoch)")
    budget.add_argument("--params", type=float, metavar="F",
                        help="keep a fraction F in (0, 1] of the dense network's parameters (with --epoch)")
    parser.add_argument("--ranking", choices=("global", "uniform"), default="global",
                        help="with --macs/--params: one score threshold across layers (global, default) or the "
                             "same share of filters removed in every layer (uniform)")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default=None,
                        help="with --macs/--params: per-layer normalization of the scores before layers are "
                             f"compared (default: {DEFAULT_NORMALIZE}; mean: each layer's scores divided by their "
                             "mean; sqrt_size: by the square root of the weights per filter)")
    parser.add_argument("--aggregate", choices=AGGREGATIONS, default="max",
                        help="with --macs/--params: how the filters of residual-coupled channels combine "
                             "(default: max)")
    parser.add_argument("--out", type=output_path, metavar="FILE", help="where to write the mask file (default: masks.pt; "
                        "without --out and --like, masks_epochK.pt, or masks_epochK_macsF.pt with a budget)")
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
    from splitlbi.models.registry import provide_model
    from splitlbi.train.run import load_checkpoint, read_run_config

    info = read_run_config(arguments.run_dir)
    provide_model(info["model"], arguments.model)
    budget = [(flag, value) for flag, value in (("--macs", arguments.macs), ("--params", arguments.params))
              if value is not None]
    if budget:
        return _run_budget(arguments, info, *budget[0])
    for flag, default in (("ranking", "global"), ("normalize", None), ("aggregate", "max")):
        if getattr(arguments, flag) != default:
            raise SplitLBIError(f"--{flag} is for budget masks: add --macs F or --params F")
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


def _run_budget(arguments: argparse.Namespace, info: dict, flag: str, fraction: float) -> int:
    """``--macs F`` / ``--params F``: budget masks from the path scores at ``--epoch``."""
    import torch

    from splitlbi.cli.compact import _input_shape
    from splitlbi.prune import save_mask_file
    from splitlbi.prune.budget import budget_masks, path_scores
    from splitlbi.train.rundir import create_run_model

    if arguments.like is not None:
        raise SplitLBIError(f"{flag} chooses filters by the path scores of RUN_DIR; it does not combine with --like")
    if not 0 < fraction <= 1:
        raise SplitLBIError(f"{flag} must be a fraction in (0, 1] of the dense network, got {fraction:g}")
    if arguments.epoch is None:
        raise SplitLBIError(f"{flag} needs --epoch K (the epoch whose path scores rank the filters)")
    scores = path_scores(arguments.run_dir, arguments.epoch)
    # Only the architecture matters for which filters go and what the compacted network costs.
    model = create_run_model(info).eval()
    example = torch.randn(1, *_input_shape(info), generator=torch.Generator().manual_seed(0))
    normalize = arguments.normalize or DEFAULT_NORMALIZE
    result = budget_masks(model, example, scores, ranking=arguments.ranking, normalize=normalize,
                          aggregate=arguments.aggregate, **{flag.lstrip("-"): fraction})
    out = Path(arguments.out or f"masks_epoch{arguments.epoch}_{flag.lstrip('-')}{fraction:g}.pt")
    save_mask_file(out, result.masks, model=info["model"], epoch=arguments.epoch, source=arguments.run_dir,
                   kind="budget")
    print(f"path-score masks of {arguments.run_dir} at epoch {arguments.epoch}, {flag} {fraction:g}")
    print(format_sparsity(result.masks))
    for line in result.lines():
        print(line)
    if not result.reached:
        print(f"note: {flag} {fraction:g} cannot be met within 2 points while every conv keeps a filter")
    print(f"wrote {out}")
    return 0
