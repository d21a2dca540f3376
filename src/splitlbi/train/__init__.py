"""Training runs: settings, the epoch loop (:func:`run_epochs`), run directories with checkpoints and resume
(:mod:`splitlbi.train.rundir`)."""

from splitlbi.train.config import OPTIMIZER_NAMES, TrainConfig, resolve_device, validate_config
from splitlbi.train.loop import Evaluation, epoch_generator, evaluate, run_epochs, train_one_epoch
from splitlbi.train.optimizers import build_optimizer, build_scheduler, is_splitlbi
from splitlbi.train.run import (
    METRICS_COLUMNS,
    PATH_COLUMNS,
    filter_path_rows,
    list_checkpoints,
    load_checkpoint,
    load_masks,
    load_model_from_run,
    read_run_config,
    read_train_config,
    run_training,
)

__all__ = [
    "OPTIMIZER_NAMES", "TrainConfig", "resolve_device", "validate_config",
    "Evaluation", "epoch_generator", "evaluate", "run_epochs", "train_one_epoch",
    "build_optimizer", "build_scheduler", "is_splitlbi",
    "METRICS_COLUMNS", "PATH_COLUMNS", "filter_path_rows", "list_checkpoints", "load_checkpoint", "load_masks",
    "load_model_from_run", "read_run_config", "read_train_config", "run_training",
]
