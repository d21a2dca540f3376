"""``splitlbi train``: parse the command line into a TrainConfig and run it."""

from __future__ import annotations

import argparse
import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Any, Dict

from splitlbi.cli.argtypes import epoch_list, output_path, positive_int, seed
from splitlbi.errors import SplitLBIError
from splitlbi.optim.functional import UPDATES
from splitlbi.optim.groups import COUPLINGS, LAM_SCALES
from splitlbi.train.config import (
    AUGMENTATIONS, COUPLING_LAM, DEFAULT_LR, NONFINITE_CHOICES, OPTIMIZER_NAMES, SCHEDULES, TrainConfig, apply_schedule_preset,
)
from splitlbi.train.distributed import is_main_process
from splitlbi.train.run import read_train_config, run_training

__all__ = ["add_parser", "add_training_options", "config_from_arguments", "run"]

_DEFAULTS = TrainConfig()


def _default(name: str) -> str:
    value = getattr(_DEFAULTS, name)
    return "none" if value is None else str(value)


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``train`` on the ``splitlbi`` subcommand parsers."""
    parser = subparsers.add_parser(
        "train",
        help="train a model with SplitLBI or a baseline optimizer, writing a run directory",
        description="Train a model with SplitLBI (or a baseline optimizer) and write a run directory with "
                    "config.json, metrics.csv, path.csv, init.pt, checkpoints/ and masks/. "
                    "A stopped or killed run continues with --resume RUN_DIR.",
    )
    add_training_options(parser)
    parser.set_defaults(func=run)
    return parser


def add_training_options(parser: argparse.ArgumentParser, *, baselines: bool = True, extras: bool = True) -> None:
    """The options of a training run (each a :class:`TrainConfig` field, default SUPPRESS),
    ``--out`` and ``--resume``: ``splitlbi train``'s, shared with ``splitlbi grow``.

    ``baselines``: offer ``--optimizer``; ``extras``: offer ``--tensorboard`` and the
    speed-and-scale options.
    """
    # Every option defaults to SUPPRESS so that we know which ones the user gave: with
    # --resume, given options must agree with the run's config.json.
    option = dict(default=argparse.SUPPRESS)
    model = parser.add_argument_group("model and data")
    model.add_argument("--model", **option, metavar="NAME|MODULE:FACTORY",
                       help=f"a registered model name, or your own network as package.module:factory (any "
                            f"importable callable returning an nn.Module, given num_classes and in_channels where it "
                            f"takes them; stored in config.json so that masks, retrain and compact find it) "
                            f"(default: {_default('model')})")
    model.add_argument("--widths", type=positive_int, nargs="+", metavar="N", **option,
                       help="the model's widths: filters per conv (lenet5: 3 numbers, vggNN_bn: one per conv) or "
                            "per stage (CIFAR ResNets: 3) (default: the model's standard network)")
    model.add_argument("--dataset", **option,
                       help=f"mnist, fashion-mnist, cifar10, digits (default: {_default('dataset')})")
    model.add_argument("--data-dir", **option, metavar="DIR",
                       help="dataset folder (default: $SPLITLBI_DATA, else ~/.cache/splitlbi)")
    model.add_argument("--train-split", type=int, metavar="N", **option,
                       help="train on the first N images of the official test set and evaluate on the rest")
    model.add_argument("--pad-to", type=int, metavar="SIZE", **option,
                       help="zero-pad images to SIZE x SIZE (e.g. 32 for ResNet/VGG on 28x28 data)")
    model.add_argument("--augment", choices=AUGMENTATIONS, **option,
                       help="on-device training augmentation: crop-flip zero-pads 4 pixels, takes a random crop "
                            "of the original size and flips left-right with probability 1/2 (the standard "
                            "recipe for cifar10, and for fashion-mnist/mnist with --pad-to 32) "
                            f"(default: {_default('augment')})")
    model.add_argument("--limit-train", type=int, metavar="N", **option,
                       help="use only the first N training images (quick trials, tests, the smoke recipes)")
    model.add_argument("--limit-test", type=int, metavar="N", **option,
                       help="evaluate on only the first N test images")

    optim = parser.add_argument_group("optimizer")
    if baselines:
        optim.add_argument("--optimizer", choices=OPTIMIZER_NAMES, **option,
                           help=f"(default: {_default('optimizer')})")
    optim.add_argument("--lr", type=float, **option,
                       help="learning rate (default: per optimizer, "
                            + ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items()) + ")")
    optim.add_argument("--kappa", type=float, **option, help=f"SplitLBI damping factor κ (default: {_default('kappa')})")
    optim.add_argument("--nu", type=float, **option,
                       help="SplitLBI coupling strength ν. It sets when filters enter Γ: a filter of norm |W_g| "
                            "enters after about λν/(lr·|W_g|) steps, so the right ν grows with the number of "
                            "steps: the default suits a few hundred steps (the default run); raise ν in "
                            "proportion for longer runs, e.g. 20-100 for tens of thousands of steps "
                            f"(default: {_default('nu')})")
    optim.add_argument("--lam", type=float, **option,
                       help=f"SplitLBI penalty weight λ (default: {COUPLING_LAM['filters']:g} when the filters carry Γ, "
                            f"{COUPLING_LAM['bn']:g} when the BatchNorm scales do)")
    optim.add_argument("--penalty", **option,
                       help="SplitLBI penalty: auto (group lasso on conv filters, lasso on linear weights), "
                            "group, neuron, l1 (weight sparsity) or none (default: auto)")
    optim.add_argument("--linear-penalty", choices=("auto", "l1", "neuron", "none"), **option,
                       help="SplitLBI penalty of the 2-D (linear) weights only, overriding --penalty for them: "
                            "none (the default) leaves the classifier uncoupled, so it is never cut from the "
                            "sparse model; auto follows --penalty (lasso on linear weights under auto)")
    optim.add_argument("--update", choices=UPDATES, **option,
                       help="SplitLBI update: paper (the paper's equations, the reference) or release (the variant "
                            "of the paper's release code: V step x min(1 - share of non-zeros of the layer's Γ, "
                            "0.01) / max(|W|, 1), Γ = κ max(|W|, 1) prox(V); its script uses it with --nu 500 "
                            "--lam 3e-4 --penalty l1; docs/results.md) (default: paper)")
    optim.add_argument("--couple", choices=("auto",) + COUPLINGS, **option,
                       help="what carries Γ in the conv layers: filters (group lasso on each conv filter, the "
                            "paper), bn (the BatchNorm scale of each conv's output channel, l1; convs without "
                            "BatchNorm keep their filters), both, or auto: bn for a network whose convs have "
                            "BatchNorm, filters otherwise (default: auto; docs/defaults.md)")
    optim.add_argument("--couple-stem", action=argparse.BooleanOptionalAction, **option,
                       help="whether the first conv (and its BatchNorm) carries Γ; --no-couple-stem leaves it "
                            "dense, never pruned (default: not when BatchNorm scales carry Γ, else yes)")
    optim.add_argument("--lam-scale", choices=LAM_SCALES, **option,
                       help="λ per coupled conv layer: none (one λ) or norm (λ times the median norm of the "
                            f"layer's filters at the start) (default: {_default('lam_scale')})")
    optim.add_argument("--momentum", type=float, **option,
                       help=f"momentum of splitlbi and sgd (default: {_default('momentum')})")
    optim.add_argument("--nesterov", action="store_true", **option, help="Nesterov momentum (splitlbi, sgd)")
    optim.add_argument("--weight-decay", type=float, **option, help=f"(default: {_default('weight_decay')})")

    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--schedule", choices=SCHEDULES, **option,
                          help="learning-rate schedule, stepped once per epoch: step multiplies --lr by --lr-gamma "
                               "at each of --lr-milestones; paper is the paper's preset (160 epochs, lr 0.1 (adaptive "
                               "optimizers: their default lr), "
                               "x0.1 at epochs 80 and 120, batch 128) where --epochs, --lr, --lr-milestones, "
                               "--lr-gamma and --batch-size given on the command line win over the preset; "
                               "cosine anneals --lr to 0 over --epochs (default: step)")
    schedule.add_argument("--epochs", type=int, **option, help=f"(default: {_default('epochs')})")
    schedule.add_argument("--batch-size", type=int, **option,
                          help="images per step, per process under torchrun: the global batch is this x the "
                               f"number of processes (default: {_default('batch_size')})")
    schedule.add_argument("--lr-milestones", type=epoch_list, nargs="+", metavar="EPOCH", **option,
                          help="epochs after which the learning rate is multiplied by --lr-gamma, e.g. 80 120")
    schedule.add_argument("--lr-gamma", type=float, **option, help=f"(default: {_default('lr_gamma')})")
    schedule.add_argument("--seed", type=seed, **option, help=f"(default: {_default('seed')})")

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--device", **option, help="auto, cpu, cuda or cuda:N (default: auto)")
    where = run_group.add_mutually_exclusive_group()
    where.add_argument("--out", type=output_path, metavar="RUN_DIR", help="new run directory (default: runs/MODEL-DATASET-"
                       f"{'OPTIMIZER' if baselines else 'grow'}-TIME)")
    where.add_argument("--resume", type=output_path, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its last checkpoint; --epochs may extend it")
    run_group.add_argument("--save-every", type=int, metavar="N", **option,
                           help="keep checkpoints/epoch_XXXX.pt every N epochs; the last epoch and last.pt "
                                f"are always written (default: {_default('save_every')})")
    run_group.add_argument("--eval-batch-size", type=int, **option,
                           help=f"(default: {_default('eval_batch_size')})")
    if extras:
        run_group.add_argument("--tensorboard", action="store_true", **option,
                               help="also write TensorBoard event files to RUN_DIR/tensorboard (losses, accuracies, "
                                    "share of non-zeros of Γ overall and per layer, filter-norm histograms; "
                                    "metrics.csv stays the record); needs pip install \"splitlbi[tensorboard]\"")
    run_group.add_argument("--no-progress", action="store_true", **option, help="no progress bars (they are drawn only when stderr is a terminal anyway)")
    run_group.add_argument("--nonfinite", choices=NONFINITE_CHOICES, **option,
                           help="a batch whose loss is nan or inf: stop the run with an error (the last good "
                                "checkpoint stays last.pt) or skip that batch, as AMP's GradScaler does; may "
                                "change on --resume (default: stop)")
    run_group.add_argument("--recalibrate-bn", type=int, metavar="N", **option,
                           help="also evaluate the sparse model with BatchNorm statistics recalibrated on the first N "
                                "training images (metrics.csv: sparse_recal_test_acc; 0: not; default: "
                                f"{_default('recalibrate_bn')})")
    if not extras:
        return

    speed = parser.add_argument_group("speed and scale",
                                      "multi-GPU and multi-node: launch with torchrun --nproc-per-node N -m splitlbi "
                                      "train ... (see docs/distributed.md)")
    speed.add_argument("--sync-bn", action="store_true", **option,
                       help="under torchrun, convert BatchNorm layers to SyncBatchNorm (statistics over the "
                            "global batch; needs CUDA)")
    speed.add_argument("--amp", action="store_true", **option,
                       help="bfloat16 autocast for forward passes and loss (needs CUDA; weights, gradients and "
                            "the optimizer stay float32)")
    speed.add_argument("--channels-last", action="store_true", **option,
                       help="model and input batches in channels-last memory format (faster convolutions on "
                            "recent GPUs)")
    speed.add_argument("--compile", action="store_true", **option,
                       help="torch.compile the model (the first epoch pays the compilation)")


def _given_settings(namespace: argparse.Namespace) -> Dict[str, Any]:
    """The TrainConfig fields that the user set on the command line."""
    given = dict(vars(namespace))
    if "lr_milestones" in given:
        given["lr_milestones"] = tuple(epoch for group in given["lr_milestones"] for epoch in group)
    if given.pop("no_progress", False):
        given["progress"] = False
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {name: value for name, value in given.items() if name in names}


def config_from_arguments(namespace: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a new run: the given options over the ``--schedule`` preset over the defaults."""
    given = _given_settings(namespace)
    return apply_schedule_preset(TrainConfig(**given), keep=given)


def _default_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    model = config.model.rsplit(":", 1)[-1]  # an import path: its factory's name
    return Path("runs") / f"{model}-{config.dataset}-{config.optimizer}-{stamp}"


def run(namespace: argparse.Namespace) -> int:
    """Execute ``splitlbi train``."""
    if namespace.resume is not None:
        run_dir = Path(namespace.resume)
        if not run_dir.is_dir():
            raise SplitLBIError(f"--resume {run_dir}: no such directory")
        given = _given_settings(namespace)
        given.setdefault("progress", True)  # showing a bar is not a property of the run
        config = dataclasses.replace(read_train_config(run_dir), **given)
        run_training(config, run_dir, resume=True)
    else:
        config = config_from_arguments(namespace)
        run_dir = Path(namespace.out) if namespace.out is not None else _default_run_dir(config)
        run_training(config, run_dir)
    if is_main_process():  # under torchrun, rank 0 speaks for all
        print(f"done: {run_dir}")
    return 0
