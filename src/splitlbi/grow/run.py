"""``splitlbi grow``: train a narrow network with SplitLBI and widen the layers whose filters the path fills.

A grow run directory is a training run directory (:mod:`splitlbi.train.rundir`: lock,
config.json, metrics.csv, path.csv, atomic checkpoints, masks) whose network changes
width between epochs, plus two files of its own::

    checks.csv   one row per check and width group: epoch, group, width, selected, filters, share, new_width
    stages.csv   one row per stage (a stretch of epochs at fixed widths) and width group:
                 stage, first_epoch, last_epoch, group, width, macs, params, train_acc, test_acc,
                 sparse_test_acc (the metrics of the stage's last epoch)

config.json holds the settings (``widths``: the starting widths) and the growth rule under
``grow``. Each checkpoint holds the network at that epoch's widths; a resume reads the
widths from it. A check comes after the checkpoint of its epoch is written, so a run
killed at any moment resumes from the newest valid checkpoint, cuts ``checks.csv`` back to
the checks before it and makes the same decisions again: it ends as an uninterrupted run.
``stages.csv`` is always rebuilt from ``checks.csv`` and ``metrics.csv``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from splitlbi.data import canonical_dataset_name
from splitlbi.errors import SplitLBIError
from splitlbi.grow.layout import GrowthLayout, layout_of
from splitlbi.grow.rule import GrowthRule, LayerCheck, check_growth
from splitlbi.grow.widen import widen_model, widen_optimizer_state
from splitlbi.models import create_model, is_model, list_models, model_factory
from splitlbi.train import rundir
from splitlbi.train import run as run_module
from splitlbi.train.config import TrainConfig, model_kwargs, resolve_device, validate_config
from splitlbi.train.loop import EpochCallback, TrainData, run_epochs
from splitlbi.train.optimizers import build_optimizer, build_scheduler
from splitlbi.train.runfiles import read_metrics
from splitlbi.utils.io import atomic_write_csv

__all__ = ["CHECKS_FILE", "STAGES_FILE", "CHECK_COLUMNS", "STAGE_COLUMNS", "GROW_KEY", "Stage", "grow_network", "stages_of",
           "read_stages", "read_checks", "load_grown_model", "network_cost", "training_compute", "input_shape",
           "layout_of_config"]

PathLike = Union[str, "os.PathLike[str]"]

CHECKS_FILE = "checks.csv"
STAGES_FILE = "stages.csv"
CHECK_COLUMNS = ("epoch", "group", "width", "selected", "filters", "share", "new_width")
STAGE_COLUMNS = ("stage", "first_epoch", "last_epoch", "group", "width", "macs", "params", "train_acc", "test_acc",
                 "sparse_test_acc")
#: The key of config.json that holds the growth rule (and marks a grow run).
GROW_KEY = "grow"


class Stage(NamedTuple):
    """Epochs ``first_epoch .. last_epoch`` trained at ``widths`` (one per width group)."""

    index: int
    first_epoch: int
    last_epoch: int
    widths: Tuple[int, ...]


# --------------------------------------------------------------------------- the network


def _builder(config: TrainConfig, num_classes: int, in_channels: int) -> Callable[[Sequence[int]], nn.Module]:
    def build(widths: Sequence[int]) -> nn.Module:
        return create_model(config.model, num_classes=num_classes, in_channels=in_channels, widths=list(widths))

    return build


def layout_of_config(config: TrainConfig) -> GrowthLayout:
    """The growth layout of ``config.model`` at ``config.widths`` (one-line errors for an unknown
    model, one without width settings, or widths it does not take)."""
    if not is_model(config.model):
        raise SplitLBIError(f"unknown model {config.model!r} (choose from {', '.join(list_models())})")
    if "widths" not in inspect.signature(model_factory(config.model)).parameters:
        raise SplitLBIError(f"model {config.model} has no width settings: it cannot grow")
    # Only the structure matters: no memory, and the global RNG is left alone.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        probe = create_model(config.model, num_classes=10, in_channels=1, **model_kwargs(config.widths))
    return layout_of(probe)


@lru_cache(maxsize=256)
def _cost(model: str, num_classes: int, in_channels: int, shape: Tuple[int, ...], widths: Tuple[int, ...]
          ) -> Tuple[int, int]:
    from splitlbi.prune.compact import count_macs_params

    with torch.random.fork_rng(devices=[]):  # counting must not move the training run's RNG
        network = create_model(model, num_classes=num_classes, in_channels=in_channels, widths=list(widths))
    return count_macs_params(network, torch.zeros(1, *shape))


def network_cost(model: str, num_classes: int, in_channels: int, image_shape: Sequence[int],
                 widths: Sequence[int]) -> Tuple[int, int]:
    """(MACs of one forward pass of one image of ``image_shape`` = ``(C, H, W)``, parameters)
    of ``model`` at ``widths`` (torch-pruning's counter, as ``splitlbi compact``)."""
    return _cost(model, int(num_classes), int(in_channels), tuple(int(s) for s in image_shape),
                 tuple(int(w) for w in widths))


def input_shape(info: Dict[str, Any]) -> Tuple[int, int, int]:
    """``(C, H, W)`` of one input image of a run, from its config.json (MACs are counted on it)."""
    size = info.get("pad_to") or info.get("image_size") or 28
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    return int(info["in_channels"]), height, width


# --------------------------------------------------------------------------- the record


def _check_rows(epoch: int, checks: Sequence[LayerCheck]) -> List[List[str]]:
    return [[str(epoch), c.group, str(c.width), str(c.selected), str(c.filters), f"{c.share:.6g}", str(c.new_width)]
            for c in checks]


def read_checks(run_dir: PathLike) -> Dict[int, List[LayerCheck]]:
    """``checks.csv`` of a grow run: epoch -> the checks of every width group then."""
    path = Path(run_dir) / CHECKS_FILE
    if not path.is_file():
        raise SplitLBIError(f"{run_dir} has no {CHECKS_FILE} (not a 'splitlbi grow' run?)")
    checks: Dict[int, List[LayerCheck]] = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        fields = line.split(",")
        if len(fields) != len(CHECK_COLUMNS):
            continue
        epoch, group, width, selected, filters, _, new_width = fields
        checks.setdefault(int(epoch), []).append(LayerCheck(group, int(width), int(selected), int(filters),
                                                            int(new_width)))
    return checks


def stages_of(start: Sequence[int], checks: Dict[int, List[LayerCheck]], last_epoch: int) -> List[Stage]:
    """The stages of a run that started at widths ``start``, made these ``checks`` and has
    finished ``last_epoch`` epochs: a new stage begins after every check that grew something."""
    stages, first, widths = [], 1, tuple(start)
    for epoch in sorted(checks):
        if epoch >= last_epoch:
            break
        grown = tuple(c.new_width for c in checks[epoch])
        if grown != widths:
            stages.append(Stage(len(stages), first, epoch, widths))
            first, widths = epoch + 1, grown
    stages.append(Stage(len(stages), first, last_epoch, widths))
    return stages


def _write_stages(run_dir: Path, info: Dict[str, Any], groups: Sequence[str]) -> List[Stage]:
    """Rebuild ``stages.csv`` from ``checks.csv`` and ``metrics.csv``; return the stages."""
    metrics = {int(row["epoch"]): row for row in read_metrics(run_dir)}
    last = max(metrics, default=0)
    stages = stages_of(info["widths"], read_checks(run_dir), last)
    rows = []
    for stage in stages:
        macs, params = network_cost(info["model"], info["num_classes"], info["in_channels"], input_shape(info),
                                    stage.widths)
        row = metrics.get(stage.last_epoch, {})
        for group, width in zip(groups, stage.widths):
            rows.append([stage.index, stage.first_epoch, stage.last_epoch, group, width, macs, params,
                         row.get("train_acc", ""), row.get("test_acc", ""), row.get("sparse_test_acc", "")])
    atomic_write_csv(run_dir / STAGES_FILE, STAGE_COLUMNS, rows)
    return stages


def read_stages(run_dir: PathLike) -> List[Dict[str, Any]]:
    """The stages of a grow run from ``stages.csv``: one dict per stage with ``stage``,
    ``first_epoch``, ``last_epoch``, ``widths`` (``{group: width}``), ``macs``, ``params``,
    ``train_acc``, ``test_acc``, ``sparse_test_acc`` (None where empty)."""
    path = Path(run_dir) / STAGES_FILE
    if not path.is_file():
        raise SplitLBIError(f"{run_dir} has no {STAGES_FILE} (not a 'splitlbi grow' run?)")
    import csv

    stages: Dict[int, Dict[str, Any]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            index = int(row["stage"])
            stage = stages.setdefault(index, {
                "stage": index, "first_epoch": int(row["first_epoch"]), "last_epoch": int(row["last_epoch"]),
                "widths": {}, "macs": int(row["macs"]), "params": int(row["params"]),
                **{key: float(row[key]) if row[key] else None for key in ("train_acc", "test_acc", "sparse_test_acc")}})
            stage["widths"][row["group"]] = int(row["width"])
    return [stages[index] for index in sorted(stages)]


def training_compute(run_dir: PathLike) -> int:
    """Σ over the stages of a grow run of (epochs × MACs of one image's forward pass): its
    training compute in the units of ``epochs × MACs`` of a fixed network."""
    return sum((stage["last_epoch"] - stage["first_epoch"] + 1) * stage["macs"] for stage in read_stages(run_dir))


# --------------------------------------------------------------------------- the run


def grow_network(
    config: Optional[TrainConfig],
    rule: Optional[GrowthRule],
    out_dir: PathLike,
    resume: bool = False,
    *,
    log: Optional[Callable[[str], None]] = print,
    on_epoch_end: Optional[EpochCallback] = None,
) -> Path:
    """Train ``config.model`` from the narrow ``config.widths`` with SplitLBI, growing it by ``rule``.

    Every ``rule.check_every`` epochs each width group's share of selected filters is read;
    the groups at or above ``rule.tau`` are widened (keeping the network's function, the old
    filters' weights, momentum and V; new filters start with V = 0), the optimizer and the
    schedule are rebuilt around the new parameters, and training continues. The first
    check where nothing grew ends the growth; the run then trains to ``config.epochs``.

    Args:
        config: the run's settings (``optimizer`` must be ``splitlbi``; ``widths`` the
            starting widths). With ``resume=True`` it may be None (the stored settings).
        rule: the growth rule; with ``resume=True`` None or the stored one.
        out_dir: the run directory (new: must not exist or be empty).
        resume: continue the run in ``out_dir`` from its newest valid checkpoint.
        log: receives the progress lines (None: silent).
        on_epoch_end: ``on_epoch_end(epoch, metrics)`` after each epoch's files are written.

    Returns:
        The run directory.

    Raises:
        SplitLBIError: invalid settings, a model that cannot grow, an unusable run directory.
    """
    return _grow(config, rule, Path(out_dir), resume, log=log, on_epoch_end=on_epoch_end)


def _check_settings(config: TrainConfig, rule: GrowthRule) -> GrowthLayout:
    validate_config(config)
    rule.validate()
    if config.optimizer != "splitlbi":
        raise SplitLBIError(f"growing reads the solution path of SplitLBI: --optimizer {config.optimizer} has none")
    for name in ("compile", "sync_bn", "amp", "channels_last", "tensorboard"):
        if getattr(config, name):
            raise SplitLBIError(f"--{name.replace('_', '-')} is not supported by 'splitlbi grow'")
    if not config.widths:
        raise SplitLBIError("give the starting widths with --widths (the narrow network to grow, e.g. --widths 3 8 60 "
                            "for lenet5, whose standard widths are 6 16 120)")
    layout = layout_of_config(config)
    rule.caps(layout, config.widths)
    return layout


def _silent(line: str) -> None:
    pass


@rundir.holds_run_dirs
def _grow(config: Optional[TrainConfig], rule: Optional[GrowthRule], run_dir: Path, resume: bool, *,
          log: Optional[Callable[[str], None]], on_epoch_end: Optional[EpochCallback]) -> Path:
    say = log if log is not None else _silent
    info: Dict[str, Any] = {}
    if resume:
        if not run_dir.is_dir():
            raise SplitLBIError(f"--resume {run_dir}: no such directory")
        rundir.open_run_dir(run_dir, new=False, say=say)
        info = rundir.read_run_config(run_dir)
        if GROW_KEY not in info:
            raise SplitLBIError(f"--resume {run_dir}: not a 'splitlbi grow' run (continue a training run with "
                                f"'splitlbi train --resume')")
        stored_rule = GrowthRule.from_dict(info[GROW_KEY])
        if rule is not None and rule != stored_rule:
            changed = [f.name for f in dataclasses.fields(GrowthRule) if getattr(rule, f.name) != getattr(stored_rule, f.name)]
            raise SplitLBIError(f"cannot change the growth rule ({', '.join(changed)}) when resuming {run_dir}: its "
                                f"config.json fixes it")
        rule = stored_rule
        config = rundir.merge_resume_config(run_dir, rundir.train_config_from_info(info), config)
    else:
        if config is None or rule is None:
            raise SplitLBIError("a new grow run needs a TrainConfig and a GrowthRule")
        rundir.check_new_run_dir(run_dir)
    layout = _check_settings(config, rule)
    canonical_dataset_name(config.dataset)
    if not resume:
        rundir.open_run_dir(run_dir, new=True, say=say)
    device = resolve_device(config.device)
    data = run_module._load_data(config, device)
    build = _builder(config, data.facts["num_classes"], data.facts["in_channels"])
    caps = rule.caps(layout, config.widths)

    start_epoch, history, state = 0, None, None
    if resume:
        rundir.check_same_dataset(run_dir, info, data.facts)
        state, rejected = _newest_valid_state(run_dir, config, layout, build, device, say)
        if state is not None:
            start_epoch = state.epoch
            if config.epochs < start_epoch:
                raise SplitLBIError(f"--epochs {config.epochs} is below the {start_epoch} epochs {run_dir} already has")
            history = rundir.rewind(run_dir, info, config, start_epoch, state.history, rejected, say)
            _rewind_checks(run_dir, start_epoch, config.widths, state.widths, layout)
            say(f"resuming {run_dir} from epoch {start_epoch}/{config.epochs} at widths "
                f"{_widths_text(layout, state.widths)}")
        else:
            rundir.rewind(run_dir, info, config, None, None, rejected, say)
            say(f"no usable checkpoint in {run_dir}: restarting it from epoch 0")
    if state is None:
        run_module._seed_everything(config.seed)
        model = build(config.widths).to(device)
        optimizer = build_optimizer(config, model)
        scheduler = build_scheduler(config, optimizer)
        if not info:
            info = {**rundir.run_info(config, data.facts), "world_size": 1, GROW_KEY: rule.to_dict()}
            new_info: Optional[Dict[str, Any]] = info
        else:
            new_info = None  # a restart keeps the config.json it has
        history = rundir.start_run(run_dir, new_info, model, optimizer, scheduler, [rundir.rng_state()])
        atomic_write_csv(run_dir / CHECKS_FILE, CHECK_COLUMNS, [])
        say(f"run directory: {run_dir}")
    else:
        model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    assert history is not None

    growing = not any(all(not c.grew for c in checks) for checks in read_checks(run_dir).values())
    say(f"{config.model} on {config.dataset} ({data.facts['train_size']} train / {data.facts['test_size']} test "
        f"images), growing from widths {_widths_text(layout, config.widths)} (caps {_widths_text(layout, caps)}; "
        f"check every {rule.check_every} epochs, grow at share selected >= {rule.tau:g} "
        f"{'by ' + str(rule.count) + ' filters' if rule.count is not None else 'x' + format(rule.ratio, 'g')})")
    _write_stages(run_dir, info, layout.groups)
    epoch = start_epoch
    while True:
        if growing and rule.is_check(epoch, config.epochs):
            widths = layout.widths(model)
            checks = check_growth(layout, optimizer, widths, rule, caps)
            rundir.append_rows(run_dir / CHECKS_FILE, _check_rows(epoch, checks))
            say(f"check after epoch {epoch}: " + ", ".join(
                f"{c.group} {c.selected}/{c.filters} selected ({100 * c.share:.0f}%)"
                + (f" -> {c.new_width}" if c.grew else "") for c in checks))
            if any(c.grew for c in checks):
                model, optimizer, scheduler = _widen(model, optimizer, scheduler, config, build,
                                                     [c.new_width for c in checks], epoch, rule.init)
                say(f"grew to widths {_widths_text(layout, layout.widths(model))}")
            else:
                growing = False
                say(f"nothing grew: the widths stay {_widths_text(layout, widths)} to the end")
            _write_stages(run_dir, info, layout.groups)
        if epoch >= config.epochs:
            break
        stop = (rule.next_check(epoch, config.epochs) if growing else None) or config.epochs
        run_epochs(run_dir, model, optimizer, scheduler, data, config, start_epoch=epoch, until=stop,
                   history=history, say=say, on_epoch_end=on_epoch_end,
                   description=f"stage {stages_of(config.widths, read_checks(run_dir), epoch + 1)[-1].index}")
        epoch = stop
    stages = _write_stages(run_dir, info, layout.groups)
    final = stages[-1]
    macs, params = network_cost(config.model, data.facts["num_classes"], data.facts["in_channels"],
                                input_shape(info), final.widths)
    standard_macs, standard_params = network_cost(config.model, data.facts["num_classes"],
                                                  data.facts["in_channels"], input_shape(info), layout.standard)
    say(f"final widths {_widths_text(layout, final.widths)} after {len(stages)} stage(s): {macs:,} MACs "
        f"({100 * macs / standard_macs:.1f}% of the standard {config.model}), {params:,} parameters "
        f"({100 * params / standard_params:.1f}%)")
    return run_dir


def _widths_text(layout: GrowthLayout, widths: Sequence[int]) -> str:
    return " ".join(f"{name}={width}" for name, width in zip(layout.groups, widths))


def _widen(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: TrainConfig,
           build: Callable[[Sequence[int]], nn.Module], widths: Sequence[int], epoch: int, init: str
           ) -> Tuple[nn.Module, torch.optim.Optimizer, Any]:
    """The network widened to ``widths``, with a new optimizer holding the old state
    (widened) and a new scheduler at the old one's place in the schedule."""
    # The new filters' draw depends on (seed, epoch) only: a resumed run draws the same.
    seed = int(np.random.SeedSequence([config.seed, epoch, 0x67726F77]).generate_state(1)[0])
    widening = widen_model(model, build, widths, seed=seed, init=init)
    widened = widening.model
    new_optimizer = build_optimizer(config, widened)
    new_scheduler = build_scheduler(config, new_optimizer)
    new_optimizer.load_state_dict(widen_optimizer_state(optimizer.state_dict(), widening,
                                                        dict(widened.named_parameters())))
    new_scheduler.load_state_dict(scheduler.state_dict())
    return widened, new_optimizer, new_scheduler


class _Resumed(NamedTuple):
    epoch: int
    widths: Tuple[int, ...]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    history: Optional[rundir.RunHistory]


def _newest_valid_state(run_dir: Path, config: TrainConfig, layout: GrowthLayout,
                        build: Callable[[Sequence[int]], nn.Module], device: torch.device,
                        say: Callable[[str], None]) -> Tuple[Optional[_Resumed], List[Path]]:
    """The newest checkpoint that passes validation, loaded into a network of its widths, a
    new optimizer and scheduler, and the RNGs; ``(None, rejected)`` when there is none."""
    chosen: Dict[str, Any] = {}

    def accept(checkpoint: Dict[str, Any], path: Path) -> None:
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
            raise rundir.CheckpointError("not a training checkpoint")
        widths = layout.widths_of_state(checkpoint["model"])
        model = build(widths).to(device)
        epoch = rundir.validate_checkpoint(checkpoint, model.state_dict(),
                                           epoch=None if path.name == rundir.LAST_CHECKPOINT
                                           else rundir.epoch_from_name(path))
        optimizer = build_optimizer(config, model)
        scheduler = build_scheduler(config, optimizer)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        model.load_state_dict(checkpoint["model"])
        rundir.restore_rng_state(checkpoint["rng"])
        chosen.update(epoch=epoch, widths=widths, model=model, optimizer=optimizer, scheduler=scheduler)

    found, rejected = rundir.newest_valid_checkpoint(run_dir, accept, say=say)
    if found is None:
        return None, rejected
    path, checkpoint = found
    if rejected:
        say(f"resuming from {rundir.CHECKPOINT_DIR}/{path.name}, the newest valid checkpoint")
    return _Resumed(history=rundir.RunHistory.from_state(checkpoint.get("history")), **chosen), rejected


def _rewind_checks(run_dir: Path, epoch: int, start: Sequence[int], widths: Sequence[int],
                   layout: GrowthLayout) -> None:
    """Cut ``checks.csv`` back to the checks before ``epoch`` (the check after ``epoch`` is
    made again) and make sure they lead from ``start`` to the checkpoint's ``widths``."""
    rundir.truncate_rows_after(run_dir / CHECKS_FILE, epoch - 1, CHECK_COLUMNS)
    reached = stages_of(start, read_checks(run_dir), epoch)[-1].widths
    if tuple(reached) != tuple(widths):
        raise SplitLBIError(f"{run_dir / CHECKS_FILE} leads to widths {_widths_text(layout, reached)} but the "
                            f"checkpoint of epoch {epoch} has {_widths_text(layout, widths)}; restore the file or "
                            f"start a new run")


def load_grown_model(run_dir: PathLike, epoch: Optional[int] = None, map_location: Any = "cpu") -> nn.Module:
    """The network of a grow run at ``epoch`` (None: its last checkpoint), at that epoch's widths."""
    info = rundir.read_run_config(run_dir)
    if GROW_KEY not in info:
        raise SplitLBIError(f"{run_dir} is not a 'splitlbi grow' run")
    state = rundir.load_checkpoint(run_dir, epoch, map_location)["model"]
    config = rundir.train_config_from_info(info)
    layout = layout_of_config(config)
    model = _builder(config, info["num_classes"], info["in_channels"])(layout.widths_of_state(state))
    model.load_state_dict(state)
    return model
