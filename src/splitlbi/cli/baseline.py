"""``splitlbi baseline``: the pruning baselines of Fig 5 (Network Slimming, Soft Filter Pruning, Scratch-E/B).

The data and SGD settings are given explicitly, with the defaults of ``splitlbi train``
(see :mod:`splitlbi.prune.baselines` for what each baseline does).
"""

from __future__ import annotations

import argparse

from splitlbi.cli.argtypes import epoch_list, output_path, positive_float, positive_int, seed

__all__ = ["add_parser", "run"]


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``baseline`` on the ``splitlbi`` subcommand parsers."""
    from splitlbi.train.config import AUGMENTATIONS, TrainConfig

    default = TrainConfig()
    parser = subparsers.add_parser(
        "baseline",
        help="pruning baselines: network slimming, soft filter pruning, scratch-e, scratch-b",
        description="slimming: SGD with an L1 penalty on the BatchNorm scales, prune the BN channels with the "
                    "smallest |γ| globally (--keep share kept), fine-tune with the mask fixed (the sparsity "
                    "training goes to --sparse-out, default OUT_sparse). sfp: soft filter pruning, after every "
                    "epoch zero the --keep share of filters with the smallest ℓ2 norms in each conv layer, they "
                    "keep training; the last zeroed set is the mask. scratch-e / scratch-b: train the architecture "
                    "of --masks FILE from a fresh random init (seed --seed + 1) for --epochs epochs (E) or "
                    "round(epochs × dense MACs / pruned MACs) epochs (B, MACs of the compacted model). "
                    "Writes a new run directory with mask.pt.",
    )
    parser.add_argument("method", choices=("slimming", "sfp", "scratch-e", "scratch-b"))
    parser.add_argument("--out", required=True, type=output_path, metavar="NEW_RUN_DIR", help="new run directory to write")
    parser.add_argument("--keep", type=positive_float, default=0.5,
                        help="slimming: share of BN channels kept (global); sfp: share of filters kept per "
                             "conv layer (default: 0.5)")
    parser.add_argument("--masks", metavar="FILE", help="scratch-e/b: mask file of the pruned architecture")
    parser.add_argument("--allow-empty-mask", action="store_true",
                        help="scratch-e/b: accept a mask that keeps no weight at all (refused by default)")
    parser.add_argument("--sparsity-lambda", type=float, default=1e-4,
                        help="slimming: L1 penalty on the BN scales (default: 1e-4)")
    parser.add_argument("--finetune-epochs", type=positive_int, help="slimming: fine-tuning epochs (default: --epochs)")
    parser.add_argument("--finetune-lr", type=float, help="slimming: fine-tuning learning rate (default: --lr)")
    parser.add_argument("--sparse-out", type=output_path, metavar="DIR", help="slimming: run directory of the sparsity training")
    parser.add_argument("--model", default=default.model, metavar="NAME|MODULE:FACTORY",
                        help=f"a registered model name or your own network as package.module:factory, as for "
                             f"'splitlbi train' (default: {default.model})")
    parser.add_argument("--dataset", default=default.dataset, help=f"(default: {default.dataset})")
    parser.add_argument("--data-dir", metavar="DIR", help="dataset folder (default: $SPLITLBI_DATA, else ~/.cache/splitlbi)")
    parser.add_argument("--train-split", type=int, metavar="N",
                        help="train on the first N images of the official test set and evaluate on the rest")
    parser.add_argument("--pad-to", type=int, metavar="SIZE", help="zero-pad images to SIZE x SIZE")
    parser.add_argument("--augment", choices=AUGMENTATIONS, default=default.augment,
                        help=f"(default: {default.augment})")
    parser.add_argument("--limit-train", type=int, metavar="N", help="use only the first N training images")
    parser.add_argument("--limit-test", type=int, metavar="N", help="evaluate on only the first N test images")
    parser.add_argument("--epochs", type=positive_int, default=default.epochs, help=f"(default: {default.epochs})")
    parser.add_argument("--lr", type=float, default=default.lr, help=f"SGD learning rate (default: {default.lr})")
    parser.add_argument("--lr-milestones", type=epoch_list, nargs="*", default=[], metavar="EPOCHS",
                        help="multiply the learning rate by --lr-gamma at these epochs (e.g. 80,120)")
    parser.add_argument("--lr-gamma", type=float, default=default.lr_gamma, help=f"(default: {default.lr_gamma})")
    parser.add_argument("--batch-size", type=positive_int, default=default.batch_size,
                        help=f"(default: {default.batch_size})")
    parser.add_argument("--momentum", type=float, default=default.momentum, help=f"(default: {default.momentum})")
    parser.add_argument("--weight-decay", type=float, default=default.weight_decay,
                        help=f"(default: {default.weight_decay:g})")
    parser.add_argument("--seed", type=seed, default=default.seed, help=f"(default: {default.seed})")
    parser.add_argument("--device", default=default.device, help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--save-every", type=positive_int, default=default.save_every,
                        help=f"keep a checkpoint every N epochs (default: {default.save_every})")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (drawn only when stderr is a terminal anyway)")
    parser.set_defaults(func=run)
    return parser


def run(arguments: argparse.Namespace) -> int:
    from splitlbi.prune import baselines
    from splitlbi.train.config import TrainConfig

    config = TrainConfig(
        model=arguments.model, dataset=arguments.dataset, data_dir=arguments.data_dir,
        train_split=arguments.train_split, pad_to=arguments.pad_to, augment=arguments.augment, optimizer="sgd",
        lr=arguments.lr, momentum=arguments.momentum, weight_decay=arguments.weight_decay, epochs=arguments.epochs,
        batch_size=arguments.batch_size, lr_milestones=tuple(e for group in arguments.lr_milestones for e in group),
        lr_gamma=arguments.lr_gamma, seed=arguments.seed, device=arguments.device, save_every=arguments.save_every,
        limit_train=arguments.limit_train, limit_test=arguments.limit_test, progress=not arguments.no_progress)
    if arguments.method == "slimming":
        baselines.slimming(config, arguments.out, keep=arguments.keep, sparsity_lambda=arguments.sparsity_lambda,
                           finetune_epochs=arguments.finetune_epochs, finetune_lr=arguments.finetune_lr,
                           sparse_out=arguments.sparse_out)
    elif arguments.method == "sfp":
        baselines.soft_filter_pruning(config, arguments.out, keep=arguments.keep)
    else:
        baselines.scratch(config, arguments.out, masks=arguments.masks,
                          budget="E" if arguments.method == "scratch-e" else "B",
                          allow_empty_mask=arguments.allow_empty_mask)
    return 0
