"""``splitlbi compare``: the command line of :func:`splitlbi.experiments.compare.compare` (Table 1)."""

from __future__ import annotations

import argparse

from splitlbi.cli.argtypes import epoch_list, output_path, seed
from splitlbi.data.augment import AUGMENTATIONS
from splitlbi.experiments.compare import DEFAULT_WEIGHT_DECAY, VARIANT_NAMES, compare
from splitlbi.train.config import TrainConfig

__all__ = ["add_parser"]


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``compare`` on the ``splitlbi`` subcommand parsers."""
    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "compare",
        help="Table 1: test accuracy of SplitLBI variants against SGD and adaptive optimizers over seeds",
        description="Train one model on one dataset with several optimizer variants and seeds (each an ordinary "
                    "run directory OUT/<variant>/seed<k>), then write OUT/table.md and OUT/table.csv: final and "
                    "best test accuracy, mean ± std over seeds, and for SplitLBI the sparse model's accuracy, the "
                    "final share of non-zeros of Γ and (--layer) the filters selected; OUT/runs.csv per run. "
                    "Re-running the command skips finished runs and resumes interrupted ones. "
                    f"Variants: {', '.join(VARIANT_NAMES)}.",
    )
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", default=defaults.model, help=f"model name (default: {defaults.model})")
    data.add_argument("--dataset", default=defaults.dataset, help=f"mnist, fashion-mnist, digits, ... "
                                                                   f"(default: {defaults.dataset})")
    data.add_argument("--data-dir", metavar="DIR",
                      help="dataset folder (default: $SPLITLBI_DATA, else ~/.cache/splitlbi)")
    data.add_argument("--train-split", type=int, metavar="N",
                      help="train on the first N images of the official test set and evaluate on the rest")
    data.add_argument("--pad-to", type=int, metavar="SIZE", help="zero-pad images to SIZE x SIZE (e.g. 32)")
    data.add_argument("--augment", choices=AUGMENTATIONS,
                      help="on-device training augmentation, e.g. crop-flip for CIFAR (default: none)")
    data.add_argument("--limit-train", type=int, metavar="N", help="use only the first N training images")
    data.add_argument("--limit-test", type=int, metavar="N", help="evaluate on only the first N test images")

    optim = parser.add_argument_group("optimizers")
    optim.add_argument("--optimizers", nargs="+", metavar="VARIANT", default=None,
                       help="variants to compare, in table order (default: all)")
    optim.add_argument("--lr", type=float, default=defaults.lr,
                       help=f"learning rate of the SGD and SplitLBI variants (default: {defaults.lr})")
    optim.add_argument("--adaptive-lr", type=float, metavar="LR",
                       help="learning rate of the adaptive methods (default: 1e-3, AdaGrad 1e-2)")
    optim.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY,
                       help=f"weight decay of splitlbi-mom-wd and sgd-mom-wd (default: {DEFAULT_WEIGHT_DECAY:g})")
    optim.add_argument("--kappa", type=float, default=defaults.kappa, help=f"SplitLBI κ (default: {defaults.kappa:g})")
    optim.add_argument("--nu", type=float, default=defaults.nu, help=f"SplitLBI ν (default: {defaults.nu:g})")
    optim.add_argument("--lam", type=float, default=defaults.lam,
                       help="SplitLBI λ (default: the coupling's, 1 for filters, 2 for BatchNorm scales)")
    optim.add_argument("--penalty", default=defaults.penalty, help="SplitLBI penalty (default: auto)")
    optim.add_argument("--layer", metavar="NAME",
                       help="count this layer's filters in the support of Γ at the end of the SplitLBI runs "
                            "(e.g. conv3, LeNet-5's c5)")

    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--seeds", type=seed, nargs="+", default=[0, 1, 2], metavar="SEED",
                          help="one run per seed and variant (default: 0 1 2)")
    schedule.add_argument("--epochs", type=int, default=defaults.epochs, help=f"(default: {defaults.epochs})")
    schedule.add_argument("--batch-size", type=int, default=defaults.batch_size,
                          help=f"(default: {defaults.batch_size})")
    schedule.add_argument("--lr-milestones", type=epoch_list, nargs="+", metavar="EPOCH", default=[],
                          help="epochs after which every learning rate is multiplied by --lr-gamma")
    schedule.add_argument("--lr-gamma", type=float, default=defaults.lr_gamma, help=f"(default: {defaults.lr_gamma})")

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", required=True, type=output_path, metavar="DIR",
                           help="folder of the comparison; re-use it to continue an interrupted comparison")
    run_group.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default: auto)")
    run_group.add_argument("--save-every", type=int, metavar="N",
                           help="keep each run's checkpoint every N epochs (default: only the final epoch)")
    run_group.add_argument("--table-only", action="store_true",
                           help="train nothing: write the tables from the runs finished so far")
    run_group.add_argument("--verbose", action="store_true", help="also print every run's per-epoch lines")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_run)
    return parser


def _run(namespace: argparse.Namespace) -> int:
    settings = dict(
        model=namespace.model, dataset=namespace.dataset, data_dir=namespace.data_dir,
        train_split=namespace.train_split, pad_to=namespace.pad_to, augment=namespace.augment,
        limit_train=namespace.limit_train, limit_test=namespace.limit_test,
        lr=namespace.lr, kappa=namespace.kappa, nu=namespace.nu, lam=namespace.lam, penalty=namespace.penalty,
        epochs=namespace.epochs, batch_size=namespace.batch_size,
        lr_milestones=tuple(epoch for group in namespace.lr_milestones for epoch in group),
        lr_gamma=namespace.lr_gamma, device=namespace.device, save_every=namespace.save_every,
        progress=not namespace.no_progress,
    )
    compare(namespace.out, namespace.optimizers, namespace.seeds, weight_decay=namespace.weight_decay,
            adaptive_lr=namespace.adaptive_lr, layer=namespace.layer, train=not namespace.table_only,
            epoch_log=(lambda line: print("    " + line)) if namespace.verbose else None, **settings)
    return 0
