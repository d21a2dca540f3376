"""``splitlbi retrain``: evaluate or retrain a run's sparse sub-network with its mask fixed."""

from __future__ import annotations

import argparse

from splitlbi.cli.argtypes import add_model_option, epoch_list, non_negative_int, output_path, positive_int, seed

__all__ = ["add_parser", "run"]


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``retrain`` on the ``splitlbi`` subcommand parsers."""
    parser = subparsers.add_parser(
        "retrain",
        help="prune, fine-tune or lottery-retrain a run's sparse sub-network (mask held fixed)",
        description="prune: evaluate W_K projected onto the support of Γ at epoch K, no training. "
                    "finetune (F-epoch K): train W_K masked with SGD, the mask fixed. lottery: reset to the "
                    "run's init.pt, apply the mask, train with SGD, the mask fixed. Masked weights stay exactly "
                    "zero. --masks FILE replaces the support of Γ (e.g. magnitude masks from 'splitlbi masks "
                    "--like'). Writes a new run directory.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run whose sub-network to take")
    add_model_option(parser)
    parser.add_argument("--epoch", type=non_negative_int, metavar="K",
                        help="epoch K: its support of Γ is the mask and, for prune/finetune, W_K the weights")
    parser.add_argument("--mode", choices=("prune", "finetune", "lottery"), required=True)
    parser.add_argument("--masks", metavar="FILE", help="mask file to use instead of the support of Γ at K")
    parser.add_argument("--out", required=True, type=output_path, metavar="NEW_RUN_DIR", help="new run directory to write")
    parser.add_argument("--epochs", type=positive_int, default=20, help="retraining epochs (default: 20)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--lr-milestones", type=epoch_list, nargs="*", default=[], metavar="EPOCHS",
                        help="multiply the learning rate by --lr-gamma at these epochs (e.g. 80,120)")
    parser.add_argument("--lr-gamma", type=float, default=0.1, help="(default: 0.1)")
    parser.add_argument("--batch-size", type=positive_int, help="(default: the run's)")
    parser.add_argument("--momentum", type=float, default=0.9, help="(default: 0.9)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="(default: 0)")
    parser.add_argument("--seed", type=seed, default=0, help="(default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--save-every", type=positive_int, help="keep a checkpoint every N epochs (default: last)")
    parser.add_argument("--allow-empty-mask", action="store_true",
                        help="accept a mask that keeps no weight at all (refused by default)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (drawn only when stderr is a terminal anyway)")
    parser.set_defaults(func=run)
    return parser


def run(arguments: argparse.Namespace) -> int:
    from splitlbi.models.registry import provide_model
    from splitlbi.prune import retrain
    from splitlbi.train.run import read_run_config

    provide_model(read_run_config(arguments.run_dir)["model"], arguments.model)

    milestones = [epoch for group in arguments.lr_milestones for epoch in group]
    retrain(arguments.run_dir, arguments.out, mode=arguments.mode, epoch=arguments.epoch, masks=arguments.masks,
            epochs=arguments.epochs, lr=arguments.lr, lr_milestones=milestones, lr_gamma=arguments.lr_gamma,
            batch_size=arguments.batch_size, momentum=arguments.momentum, weight_decay=arguments.weight_decay,
            seed=arguments.seed, device=arguments.device, save_every=arguments.save_every,
            progress=not arguments.no_progress, allow_empty_mask=arguments.allow_empty_mask)
    return 0
