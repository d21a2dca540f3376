"""``splitlbi train``: settings -> data, model, optimizer -> :func:`~splitlbi.train.loop.run_epochs`.

The run directory (its layout, config.json, checkpoints, metrics.csv and path.csv, the
lock and the settings rule for resuming) is :mod:`splitlbi.train.rundir`'s; the names
below that come from there stay importable from here.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from splitlbi.data import canonical_dataset_name, load_dataset
from splitlbi.errors import SplitLBIError
from splitlbi.models import create_model, model_factory
from splitlbi.train import distributed
from splitlbi.train.config import TrainConfig, model_kwargs, resolve_device, validate_config
from splitlbi.train.loop import EpochCallback, TrainData, run_epochs, train_one_epoch
from splitlbi.train.optimizers import build_optimizer, build_scheduler, resolve_coupling
from splitlbi.train.rundir import (  # noqa: F401  (re-exported: the run-directory names callers import from here)
    CHECKPOINT_DIR, CONFIG_FILE, INIT_FILE, LAST_CHECKPOINT, MASK_DIR, METRICS_COLUMNS, METRICS_FILE, PATH_COLUMNS,
    PATH_FILE, RENAMED_METRICS_COLUMNS, RunHistory, check_new_run_dir, check_run_files, check_same_dataset,
    check_same_world, epoch_file_name, epoch_from_name, filter_path_rows, holds_run_dirs, list_checkpoints,
    load_checkpoint, load_masks, load_model_from_run, load_resume_point, merge_resume_config, newest_valid_checkpoint,
    open_run_dir, read_or_rebuild_run_config, read_run_config, read_train_config, restore_rng_state, rewind, rng_state,
    run_info, start_run, train_config_from_info, upgrade_metrics_row, validate_checkpoint, written_by,
)

__all__ = [
    "CONFIG_FILE", "METRICS_FILE", "PATH_FILE", "INIT_FILE", "CHECKPOINT_DIR", "LAST_CHECKPOINT", "MASK_DIR",
    "METRICS_COLUMNS", "PATH_COLUMNS", "RENAMED_METRICS_COLUMNS", "upgrade_metrics_row", "epoch_file_name",
    "run_training", "read_run_config", "read_train_config", "list_checkpoints", "load_checkpoint",
    "load_masks", "load_model_from_run", "filter_path_rows",
]

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------- data and model


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _load_data(config: TrainConfig, device: torch.device) -> TrainData:
    splits = load_dataset(config.dataset, config.data_dir, train_split=config.train_split, pad_to=config.pad_to)
    train_images, train_labels = splits.train.images[:config.limit_train], splits.train.labels[:config.limit_train]
    test_images, test_labels = splits.test.images[:config.limit_test], splits.test.labels[:config.limit_test]
    facts = {
        "num_classes": int(splits.num_classes),
        "in_channels": int(splits.in_channels),
        "image_size": _jsonable(splits.image_size),
        "mean": _jsonable(splits.mean),
        "std": _jsonable(splits.std),
        "train_size": int(train_images.shape[0]),
        "test_size": int(test_images.shape[0]),
        "dataset_description": splits.description,
    }
    return TrainData(train_images.to(device), train_labels.to(device), test_images.to(device), test_labels.to(device),
                 splits.mean, splits.std, facts)


def _check_model_name(name: str) -> None:
    """A one-line error for a model name that is not registered or an import path that does not resolve."""
    model_factory(name)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed)
    random.seed(seed)


# --------------------------------------------------------------------------- rows


# --------------------------------------------------------------------------- run directory


def run_training(
    config: Optional[TrainConfig],
    out_dir: PathLike,
    resume: bool = False,
    *,
    log: Optional[Callable[[str], None]] = print,
    on_epoch_end: Optional[EpochCallback] = None,
) -> Path:
    """Train a model as ``config`` says, writing a run directory at ``out_dir``; return its path.

    Args:
        config: the run's settings. With ``resume=True`` it may be ``None`` (use the
            stored ``config.json``); otherwise it must equal the stored settings except
            for ``RESUME_OVERRIDABLE_FIELDS`` (e.g. a larger ``epochs`` extends the run).
        out_dir: the run directory; for a new run it must not exist or be empty.
        resume: continue the run in ``out_dir`` from ``checkpoints/last.pt``. The result
            is bitwise identical (on CPU) to an uninterrupted run.
        log: receives the human-readable progress lines (``None``: silent).
        on_epoch_end: called as ``on_epoch_end(epoch, metrics)`` after each epoch's files
            and checkpoint are written; ``metrics`` has the metrics.csv columns as keys.

    Under ``torchrun`` (``WORLD_SIZE > 1``, or a process group the caller initialized)
    every process calls this with the same arguments: the model trains in
    DistributedDataParallel with ``config.batch_size`` images per process, rank 0 alone
    writes the run directory and calls ``log`` and ``on_epoch_end``, and every rank
    resumes from ``checkpoints/last.pt`` (see docs/distributed.md).

    Raises:
        SplitLBIError: invalid settings, unusable run directory, missing or corrupt data.
    """
    try:
        run_dir = _run_training(config, out_dir, resume, log=log, on_epoch_end=on_epoch_end)
    except BaseException:
        distributed.shutdown(success=False)
        raise
    distributed.shutdown()  # only a process group that run_training itself created
    return run_dir


def _silent(line: str) -> None:
    pass


def _check_speed_options(config: TrainConfig, context: distributed.DistributedContext, device: torch.device,
                         say: Callable[[str], None]) -> None:
    if config.amp:
        if device.type != "cuda":
            raise SplitLBIError(f"--amp needs CUDA (bfloat16 autocast; on the CPU it is slower than float32), "
                                f"but this run is on {device}")
        if not torch.cuda.is_bf16_supported():
            raise SplitLBIError(f"--amp: {torch.cuda.get_device_name(device)} does not support bfloat16")
    if config.sync_bn:
        if context.enabled and device.type != "cuda":
            raise SplitLBIError("--sync-bn needs CUDA devices: SyncBatchNorm does not run on the CPU")
        if not context.enabled:
            say("note: --sync-bn has no effect in a single process (it matters under torchrun)")


@holds_run_dirs  # the run directory's lock is held until training returns or fails
def _run_training(
    config: Optional[TrainConfig],
    out_dir: PathLike,
    resume: bool,
    *,
    log: Optional[Callable[[str], None]],
    on_epoch_end: Optional[EpochCallback],
) -> Path:
    say = log if log is not None else _silent
    if not os.fspath(out_dir):
        raise SplitLBIError("the run directory is an empty path; give a folder name")
    run_dir = Path(out_dir)
    if resume:
        if not run_dir.is_dir():
            raise SplitLBIError(f"--resume {run_dir}: no such directory")
        open_run_dir(run_dir, new=False, say=say)
        # Rank 0 writes a missing config.json back; the other ranks read the same copy.
        info = read_or_rebuild_run_config(run_dir, say, write=distributed.is_main_process())
        if "grow" in info:  # its widths change along the run: only its own command knows them
            raise SplitLBIError(f"--resume {run_dir}: this run was written by 'splitlbi grow'; continue it with "
                                f"'splitlbi grow --resume {run_dir}'")
        command = written_by(info)
        if command != "train":  # its masks and penalties are not TrainConfig settings: its own command resumes it
            raise SplitLBIError(f"--resume {run_dir}: this run was written by 'splitlbi {command}'; run the same "
                                f"'splitlbi {command}' command again to continue it")
        config = merge_resume_config(run_dir, train_config_from_info(info), config)
    else:
        if config is None:
            raise SplitLBIError("a new run needs a TrainConfig")
        check_new_run_dir(run_dir)
    validate_config(config)
    if config.tensorboard:
        from splitlbi.train.tensorboard import require_tensorboard

        require_tensorboard()  # before any file is written
    _check_model_name(config.model)
    canonical_dataset_name(config.dataset)  # unknown names fail before any file is written
    if not resume:
        open_run_dir(run_dir, new=True, say=say)
    # Under torchrun: join the process group (every rank has passed the checks above
    # before any rank writes: the first collective below waits for all of them).
    context, device = distributed.setup(config.device, resolve_device)
    if not context.is_main:
        say = _silent
    _check_speed_options(config, context, device, say)
    autocast_dtype = torch.bfloat16 if config.amp else None
    memory_format = torch.channels_last if config.channels_last else None

    # Each node's first process loads (and, if need be, downloads) first, then the others.
    data: Optional[TrainData] = None
    with distributed.agreement(context):
        if context.local_rank == 0:
            data = _load_data(config, device)
    with distributed.agreement(context):
        if data is None:
            data = _load_data(config, device)
    _seed_everything(config.seed)
    # `model` is the plain module throughout: the optimizer (layer names), checkpoints,
    # init.pt and path.csv use it; DDP and torch.compile only wrap it for the forward.
    model = create_model(config.model, num_classes=data.facts["num_classes"],
                         in_channels=data.facts["in_channels"], **model_kwargs(config.widths))
    check_model_fits(model, data, config)
    if config.sync_bn and context.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if context.rank > 0:
        # Same initial weights on every rank (seeded above), then distinct dropout streams.
        _seed_everything(distributed.rank_seed(config.seed, context.rank))
    if config.optimizer == "splitlbi":  # "auto" made concrete before config.json is written
        config = resolve_coupling(config, model)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)

    # The text of metrics.csv and path.csv so far (rank 0), saved in each checkpoint.
    history: Optional[RunHistory] = None
    restart = False
    if resume:
        check_same_dataset(run_dir, info, data.facts)
        check_same_world(run_dir, info, config, context)
        initial_state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
        resumed, rejected = _load_newest_valid_checkpoint(run_dir, info, config, model, context, say)
        if resumed is None:
            restart = True
        else:
            optimizer, scheduler, start_epoch, history = resumed
            if config.epochs < start_epoch:
                raise SplitLBIError(f"--epochs {config.epochs} is below the {start_epoch} epochs {run_dir} already has")
            with distributed.agreement(context):
                if context.is_main:
                    history = rewind(run_dir, info, config, start_epoch, history, rejected, say)
                    check_run_files(run_dir, initial_state, start_epoch, say)
            say(f"resuming {run_dir} from epoch {start_epoch}/{config.epochs}")
    if not resume or restart:
        rng_states = distributed.all_gather_objects(context, rng_state())
        with distributed.agreement(context):
            if context.is_main:
                if restart:  # killed before its first checkpoint: the same run again from its config.json
                    rewind(run_dir, info, config, None, None, rejected, say)
                history = start_run(run_dir, None if restart else {**run_info(config, data.facts),
                                                                   "world_size": context.world_size},
                                    model, optimizer, scheduler, rng_states)
        start_epoch = 0
        say(f"run directory: {run_dir}" if not restart else
            f"no usable checkpoint in {run_dir}: restarting it from epoch 0 (its config.json and initial weights)")

    train_model = distributed.wrap_model(model, context)
    eval_model = model
    if config.compile:
        train_model = torch.compile(train_model)
        eval_model = torch.compile(model) if context.enabled else train_model
    where = f"device {device}"
    if context.enabled:
        where = (f"{context.world_size} processes on {device.type} (global batch "
                 f"{config.batch_size * context.world_size} = {config.batch_size} x {context.world_size})")
    say(f"{config.model} on {config.dataset} ({data.facts['train_size']} train / "
        f"{data.facts['test_size']} test images), optimizer {config.optimizer}, {where}")
    if start_epoch >= config.epochs:
        say(f"nothing to do: {run_dir} already has {start_epoch} epochs")
        return run_dir

    run_epochs(run_dir, model, optimizer, scheduler, data, config, start_epoch=start_epoch, history=history,
               say=say, context=context, train_model=train_model, eval_model=eval_model,
               autocast_dtype=autocast_dtype, memory_format=memory_format, on_epoch_end=on_epoch_end,
               train_epoch=train_one_epoch)  # looked up here: a test stands in for it
    return run_dir


def check_model_fits(model: nn.Module, data: TrainData, config: TrainConfig) -> None:
    """Refuse (one line) a model whose forward pass fails on the data's images (an input
    too small for its pooling, e.g. ``vgg16_bn`` on the 28x28 digits), before anything is
    written. One image, eval mode, no gradient: no RNG and no running statistic changes."""
    if data.train_images.shape[0] == 0:
        return
    parameter = next(model.parameters(), None)
    example = data.train_images[:1].to(parameter.device if parameter is not None else "cpu").float()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:200]
        size = "x".join(str(s) for s in example.shape[2:])
        raise SplitLBIError(f"model {config.model} does not run on the {size} images of {config.dataset} ({detail}); "
                            f"choose another model or enlarge the images (--pad-to)") from None
    finally:
        model.train(was_training)


def _load_newest_valid_checkpoint(
    run_dir: Path, info: Dict[str, Any], config: TrainConfig, model: nn.Module,
    context: distributed.DistributedContext, say: Callable[[str], None],
) -> Tuple[Optional[Tuple[torch.optim.Optimizer, Any, int, Optional[RunHistory]]], List[Path]]:
    """Load the newest checkpoint of ``run_dir`` that passes validation into ``model``, new
    optimizer and scheduler and the RNGs: ``((optimizer, scheduler, epoch, history),
    rejected files)``. With none usable: ``(None, rejected)``, the model and RNGs as they
    were (a freshly seeded run), ready to restart from epoch 0. A checkpoint trained with
    other settings than config.json (``info``) now gives is a :class:`RunMismatchError`."""
    def build() -> Tuple[torch.optim.Optimizer, Any]:
        optimizer = build_optimizer(config, model)
        return optimizer, build_scheduler(config, optimizer)

    return load_resume_point(run_dir, info, model, build, context=context, say=say)


