"""The one owner of a run directory: what ``splitlbi train``, ``retrain``, the baselines,
``compare`` and the reproduce workspace write and read, and how.

Layout of a run directory (all writes atomic or append-then-fsync, so a run killed at
any moment can be resumed with ``--resume`` and finishes with the same weights)::

    config.json                  settings, dataset facts, model, versions (see read_run_config)
    metrics.csv                  one row per epoch, METRICS_COLUMNS
    path.csv                     one row per epoch x layer x filter, PATH_COLUMNS; epoch 0 = init
                                 (runs written before v_norm existed have the first six columns)
    init.pt                      the initial model state_dict (for lottery retraining)
    checkpoints/epoch_XXXX.pt    every --save-every epochs and the final epoch
    checkpoints/last.pt          always the latest epoch (epoch 0 right after creation)
    masks/epoch_XXXX.pt          SplitLBI runs: optimizer.masks() (support of Γ) per epoch
    .lock                        the writer's lock (RunDirLock)

What this module owns:

* creating and opening: :func:`open_run_dir` (the lock, stale temporaries, "is it new
  and empty"), :func:`start_run` (config.json, init.pt, the CSV headers, path.csv's
  epoch 0, the epoch-0 checkpoint);
* reading: :func:`read_run_config` / :func:`read_train_config`, :func:`load_checkpoint`,
  :func:`load_masks`, :func:`load_model_from_run`;
* the settings rule for resuming: :func:`merge_resume_config` (only
  ``RESUME_OVERRIDABLE_FIELDS`` may differ from the stored settings),
  :func:`check_same_dataset`, :func:`check_same_world`, and :func:`train_or_resume`
  (skip finished, resume, or train: what ``compare`` and the reproduce workspace do);
* writing an epoch: :func:`write_epoch` (metrics.csv and path.csv rows, the masks, then
  the checkpoint, atomically written);
* resuming safely: :class:`RunDirLock`, :func:`remove_stale_temporaries`,
  :func:`newest_valid_checkpoint` (the fall-back read), :class:`RunHistory` and
  :func:`restore_rows` (rebuild metrics.csv / path.csv from the checkpoint's copy).

The lock: every command that writes a run directory holds :class:`RunDirLock`
(``flock`` on ``<run_dir>/.lock``) while it writes, released by the kernel when the
process ends, however it ends; a second writer gets a one-line :class:`RunDirBusyError`
naming the holder's pid. Re-entrant within one process (a baseline that calls
``retrain`` on its own output). :func:`remove_stale_temporaries` deletes the
``.NAME.*.tmp`` files that :mod:`splitlbi.utils.io`'s atomic writes leave behind when
killed, only under the lock. :func:`newest_valid_checkpoint` tries ``last.pt``, then
``epoch_XXXX.pt`` newest first, each passed to the caller's check; each rejected one is
named with the reason and moved aside (``.rejected``). :class:`RunHistory` is the text of
``metrics.csv`` and ``path.csv`` up to a checkpoint's epoch, saved inside it, so that a
resume rewrites those files exactly as they were.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import os
import platform
import random
import shutil
import threading
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch
from torch import Tensor, nn

import splitlbi
from splitlbi.errors import SplitLBIError
from splitlbi.models import create_model
from splitlbi.models.registry import import_model_module, model_module
from splitlbi.optim import SplitLBI
from splitlbi.optim import penalties as _penalties
from splitlbi.train import distributed
from splitlbi.train.config import RESUME_OVERRIDABLE_FIELDS, SPLITLBI_ONLY_FIELDS, TrainConfig, check_setting_types, model_kwargs
from splitlbi.utils.io import (
    DamagedFileError, append_text, atomic_torch_save, atomic_write_text, check_torch_file, fsync_directory,
    load_torch_file,
)

__all__ = [
    # the layout
    "CONFIG_FILE", "METRICS_FILE", "PATH_FILE", "INIT_FILE", "CHECKPOINT_DIR", "LAST_CHECKPOINT", "MASK_DIR",
    "LOCK_FILE", "REJECTED_SUFFIX", "RUN_FORMAT", "METRICS_COLUMNS", "PATH_COLUMNS", "RENAMED_METRICS_COLUMNS",
    "upgrade_metrics_row", "epoch_file_name",
    # the lock and temporaries
    "RunDirBusyError", "RunDirLock", "check_not_busy", "holds_run_dirs", "lock_run_dir",
    "remove_stale_temporaries", "is_empty_run_dir",
    # reading
    "read_run_config", "read_train_config", "train_config_from_info", "list_checkpoints", "torch_load",
    "load_checkpoint", "load_masks", "load_model_from_run", "check_run_info", "read_or_rebuild_run_config",
    "saved_config", "written_by", "create_run_model",
    # creating, opening, the settings rule
    "check_new_run_dir", "open_run_dir", "changed_settings", "merge_resume_config", "check_same_settings",
    "check_same_dataset", "check_same_world", "run_info", "write_json", "record_resume", "completed_epochs",
    "remove_unstarted_run", "run_differences", "check_can_write", "start_or_continue", "check_checkpoint_settings", "RunMismatchError",
    "train_or_resume", "JOB_FILE", "job_done", "mark_job_done", "job_lock",
    # rows and checkpoints
    "filter_path_rows", "metrics_row", "append_rows", "file_columns", "restore_rows", "truncate_rows_after",
    "rng_state", "restore_rng_state", "checkpoint_state", "save_checkpoint", "remove_epoch_files_after",
    "start_run", "rewind", "write_epoch",
    "checkpoint_candidates", "newest_valid_checkpoint", "set_aside", "CheckpointError", "CheckpointMisfit",
    "validate_checkpoint", "check_same_hyperparameters", "load_resume_point", "check_run_files",
    "epoch_from_name", "RunHistory", "restore_table", "csv_epochs",
]

PathLike = Union[str, "os.PathLike[str]"]


CONFIG_FILE = "config.json"


METRICS_FILE = "metrics.csv"


PATH_FILE = "path.csv"


INIT_FILE = "init.pt"


CHECKPOINT_DIR = "checkpoints"


LAST_CHECKPOINT = "last.pt"


MASK_DIR = "masks"


RUN_FORMAT = 1


METRICS_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                   "sparse_test_acc", "gamma_nonzero_share", "epoch_seconds",
                   # added later, hence after epoch_seconds: the compact network with recalibrated
                   # BatchNorm statistics (--recalibrate-bn), and its MACs over the dense network's
                   "sparse_recal_test_acc", "sparse_macs_share")


#: metrics.csv columns renamed since: old name -> new name. Runs written before keep the
#: old header (also when resumed: the renamed columns kept their places, new rows fit);
#: every reader passes rows through :func:`upgrade_metrics_row`.
RENAMED_METRICS_COLUMNS = {"sparsity": "gamma_nonzero_share"}


PATH_COLUMNS = ("epoch", "layer", "filter", "w_norm", "gamma_norm", "in_support", "v_norm")


def upgrade_metrics_row(row: Dict[str, Any]) -> Dict[str, Any]:
    """A metrics.csv row (``{column: value}``) with old column names replaced by the current
    ones (``sparsity`` -> ``gamma_nonzero_share``): what every reader of runs uses, so run
    directories written before the rename stay readable."""
    return {RENAMED_METRICS_COLUMNS.get(key, key): value for key, value in row.items()}


def epoch_file_name(epoch: int) -> str:
    """``epoch_0007.pt``: the file name of epoch ``epoch`` under checkpoints/ and masks/."""
    return f"epoch_{epoch:04d}.pt"
PathLike = Union[str, "os.PathLike[str]"]

#: The lock file inside a run directory. It stays after the run (an unlocked file is no
#: lock); removing it while a writer runs would let a second writer in.
LOCK_FILE = ".lock"
#: Suffix given to a checkpoint that a resume found damaged (kept for inspection).
REJECTED_SUFFIX = ".rejected"
#: Keys every training checkpoint has (see ``splitlbi.train.run``).
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng")


# --------------------------------------------------------------------------- the lock


class RunDirBusyError(SplitLBIError):
    """Another process holds the run directory's lock."""


# Locks this process holds: real path -> [depth, file descriptor]. flock locks belong to an
# open file, so a second open() of the lock file in the same process would block on our
# own lock; the registry makes the lock re-entrant instead.
_held: Dict[str, List[int]] = {}
_held_guard = threading.Lock()


def _lock_file(descriptor: int) -> bool:
    """Take an exclusive non-blocking lock on an open file; False when another process has it."""
    try:
        import fcntl
    except ImportError:  # Windows: lock the first byte instead
        import msvcrt
        try:
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _busy_message(directory: Path) -> str:
    return (f"{directory} is in use by another splitlbi process ({_holder(directory / LOCK_FILE)}); "
            f"wait for it to finish or use another directory")


def check_not_busy(directory: PathLike) -> None:
    """Raise :class:`RunDirBusyError` if another process holds ``directory``'s lock now
    (a quick probe for a clear first message; only holding the lock excludes others)."""
    directory = Path(directory)
    path = directory / LOCK_FILE
    if not path.is_file():
        return
    with _held_guard:
        if os.path.realpath(directory) in _held:
            return  # this process holds it
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            free = _lock_file(descriptor)
        finally:
            os.close(descriptor)  # also lets go of the probe's lock
    if not free:
        raise RunDirBusyError(_busy_message(directory))


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        text = []
    return f"pid {text[0]}" if text and text[0].isdigit() else "pid unknown"


class RunDirLock:
    """Exclusive lock on a run directory for as long as one process writes it.

    Use as a context manager (or :meth:`acquire` / :meth:`release`)::

        with RunDirLock(out):           # creates out/ if need be
            ...write the run...

    Args:
        directory: the run directory.
        create: create the directory (and its parents) if missing; otherwise a missing
            directory is an error.

    Raises (on acquiring):
        RunDirBusyError: another process holds the lock (the message names the
            directory and the holder's pid).
        SplitLBIError: the directory cannot be created or written (one line, naming it).

    The lock is ``flock`` on ``<directory>/.lock``: released by the kernel when the
    process dies, so a killed run never leaves a stale lock. The file records the
    holder's pid for the message of the second writer. Taking the lock again in the same
    process only counts up (re-entrant).
    """

    def __init__(self, directory: PathLike, *, create: bool = True) -> None:
        self.directory = Path(directory)
        self.create = create
        self._key: Optional[str] = None
        self._created = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._key is not None

    def acquire(self) -> "RunDirLock":
        if self._key is not None:
            raise RuntimeError(f"{self.directory}: this RunDirLock is already held")
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise SplitLBIError(f"{directory} exists and is not a directory")
        if self.create:
            self._created = not directory.exists()
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise SplitLBIError(f"cannot create the run directory {directory}: "
                                    f"{error.strerror or error}") from None
        elif not directory.is_dir():
            raise SplitLBIError(f"{directory}: no such directory")
        key = os.path.realpath(directory)
        with _held_guard:
            if key in _held:
                _held[key][0] += 1
                self._key = key
                return self
            path = directory / LOCK_FILE
            try:
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise SplitLBIError(f"cannot write in the run directory {directory}: "
                                    f"{error.strerror or error}") from None
            if not _lock_file(descriptor):
                os.close(descriptor)
                raise RunDirBusyError(_busy_message(directory))
            try:
                os.ftruncate(descriptor, 0)
                os.write(descriptor, f"{os.getpid()}\n".encode())
            except OSError:
                pass  # the pid is only for the message of a second writer
            _held[key] = [1, descriptor]
            self._key = key
        return self

    def release(self) -> None:
        """Let go of the lock (the last release of this process closes the file, which unlocks it).

        A directory that this lock created and that still holds nothing but the lock file
        (the command failed before writing anything) is removed again.
        """
        key, self._key = self._key, None
        if key is None:
            return
        with _held_guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] > 0:
                return
            del _held[key]
            if self._created and is_empty_run_dir(self.directory):
                with contextlib.suppress(OSError):
                    (self.directory / LOCK_FILE).unlink()
                    self.directory.rmdir()
            os.close(entry[1])  # closing the last descriptor releases flock

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


_Function = TypeVar("_Function", bound=Callable[..., Any])
# The locks taken by lock_run_dir inside the innermost holds_run_dirs call (per thread).
_scope: contextvars.ContextVar[Optional[contextlib.ExitStack]] = contextvars.ContextVar("run_dir_locks",
                                                                                        default=None)
# lock_run_dir outside any holds_run_dirs call: held until the process ends.
_process_locks: List[RunDirLock] = []


def holds_run_dirs(function: _Function) -> _Function:
    """Decorator: the run-directory locks that ``function`` takes with :func:`lock_run_dir`
    are released when it returns or raises (the commands: train, retrain, baselines)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with contextlib.ExitStack() as stack:
            token = _scope.set(stack)
            try:
                return function(*args, **kwargs)
            finally:
                _scope.reset(token)

    return wrapper  # type: ignore[return-value]


def lock_run_dir(directory: PathLike, *, create: bool = True) -> RunDirLock:
    """Take ``directory``'s :class:`RunDirLock` until the enclosing :func:`holds_run_dirs`
    call ends (without one: until the process ends)."""
    lock = RunDirLock(directory, create=create).acquire()
    stack = _scope.get()
    if stack is not None:
        stack.callback(lock.release)
    else:
        _process_locks.append(lock)
    return lock


# --------------------------------------------------------------------------- temporaries


def _is_temporary(path: Path) -> bool:
    # utils.io names them ".<destination>.<random>.tmp"; run.py's hard-link swap ".last.pt.link.tmp".
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def remove_stale_temporaries(run_dir: PathLike) -> List[Path]:
    """Delete the temporary files of interrupted atomic writes in a run directory (its
    root, ``checkpoints/`` and ``masks/``); return the paths removed. Call it only while
    holding :class:`RunDirLock`, when no writer can be mid-write."""
    root = Path(run_dir)
    removed = []
    for folder in (root, root / CHECKPOINT_DIR, root / MASK_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _is_temporary(path):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def is_empty_run_dir(run_dir: PathLike) -> bool:
    """True when ``run_dir`` holds nothing but its lock file and stale temporaries (a new run may start there)."""
    return all(entry.name == LOCK_FILE or _is_temporary(entry) for entry in Path(run_dir).iterdir())


# --------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from (the message says why)."""


class CheckpointMisfit(CheckpointError):
    """A checkpoint that loads but does not fit the run that ``config.json`` describes
    (another model, other hyperparameters): either the file or ``config.json`` changed.
    A resume falls back past it like past a damaged file, but when no checkpoint fits,
    the run is not restarted over its history (:class:`RunMismatchError`)."""


class RunMismatchError(SplitLBIError):
    """``config.json`` and the checkpoints of a run describe different runs (``config.json``
    edited): a resume refuses, before it changes anything."""


def epoch_from_name(path: Path) -> Optional[int]:
    """7 for ``epoch_0007.pt``; None for other names."""
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return None


def checkpoint_candidates(run_dir: PathLike) -> List[Path]:
    """The checkpoints a resume tries, in order: ``last.pt``, then ``epoch_XXXX.pt`` newest first."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    epochs = [(epoch, path) for path in directory.glob("epoch_*.pt") if (epoch := epoch_from_name(path)) is not None]
    ordered = [path for _, path in sorted(epochs, reverse=True)]
    last = directory / LAST_CHECKPOINT
    return ([last] if last.is_file() else []) + ordered


def _tensors(value: Any, prefix: str) -> Iterator[Tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{prefix}[{index}]")


def _first_non_finite(value: Any, prefix: str) -> Optional[str]:
    for name, tensor in _tensors(value, prefix):
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def validate_checkpoint(checkpoint: Any, model_state: Mapping[str, Tensor], *,
                        epoch: Optional[int] = None) -> int:
    """Check that ``checkpoint`` is a training checkpoint for a model with ``model_state``'s
    keys and shapes, with finite weights and optimizer state; return its epoch.

    Args:
        epoch: the epoch the file name promises (``epoch_XXXX.pt``), if any.

    Raises:
        CheckpointError: naming the first problem (missing keys, another model, a tensor
            of the wrong shape, a non-finite value, an epoch that differs from its name).
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"not a checkpoint (a {type(checkpoint).__name__}, not a dict)")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"not a training checkpoint (no {', '.join(repr(k) for k in missing)}; "
                              f"a plain state_dict such as init.pt?)")
    stored_epoch = checkpoint["epoch"]
    if not isinstance(stored_epoch, int) or isinstance(stored_epoch, bool) or stored_epoch < 0:
        raise CheckpointError(f"its epoch is {stored_epoch!r}, not an integer >= 0")
    if epoch is not None and stored_epoch != epoch:
        raise CheckpointError(f"it holds epoch {stored_epoch}, its name says {epoch}")
    weights = checkpoint["model"]
    if not isinstance(weights, Mapping):
        raise CheckpointError("its 'model' is not a state_dict")
    optimizer = checkpoint["optimizer"]
    if not isinstance(optimizer, Mapping) or "state" not in optimizer or "param_groups" not in optimizer:
        raise CheckpointError("its 'optimizer' is not an optimizer state_dict")
    scheduler = checkpoint["scheduler"]
    if not isinstance(scheduler, Mapping) or "last_epoch" not in scheduler:
        raise CheckpointError("its 'scheduler' is not a scheduler state_dict")
    if not isinstance(scheduler["last_epoch"], int) or scheduler["last_epoch"] != stored_epoch:
        raise CheckpointError(f"its scheduler is at epoch {scheduler['last_epoch']!r}, the checkpoint at {stored_epoch}")
    if not all(isinstance(tensor, Tensor) for tensor in weights.values()):
        raise CheckpointError("its 'model' holds something other than tensors")
    if set(weights) != set(model_state):
        extra, lacking = sorted(set(weights) - set(model_state)), sorted(set(model_state) - set(weights))
        detail = f"lacks {lacking[0]!r}" if lacking else f"has an unknown {extra[0]!r}"
        raise CheckpointMisfit(f"its weights are not of this model (it {detail})")
    for name, expected in model_state.items():
        if tuple(weights[name].shape) != tuple(expected.shape):
            raise CheckpointMisfit(f"weight {name!r} has shape {list(weights[name].shape)}, "
                                   f"the model {list(expected.shape)}")
    bad = _first_non_finite(weights, "model") or _first_non_finite(optimizer.get("state"), "optimizer state")
    if bad is not None:
        raise CheckpointError(f"{bad} is not finite (nan or inf)")
    return stored_epoch


#: Optimizer and scheduler settings that a checkpoint's state must share with the ones
#: config.json gives (``torch.optim``'s ``load_state_dict`` would silently take the
#: checkpoint's): a difference means config.json was edited since.
_OPTIMIZER_SETTINGS = ("initial_lr", "momentum", "dampening", "weight_decay", "nesterov", "betas", "eps", "amsgrad",
                       "alpha", "centered", "lr_decay", "kappa", "nu", "lam", "penalty", "update")
_SCHEDULER_SETTINGS = ("milestones", "gamma", "base_lrs", "T_max", "eta_min")


def check_same_hyperparameters(checkpoint: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                               scheduler: Any) -> None:
    """Raise :class:`CheckpointMisfit` when the optimizer or scheduler state of
    ``checkpoint`` (validated by :func:`validate_checkpoint`) was made with other settings
    than the fresh ``optimizer`` and ``scheduler`` (built from config.json) have."""
    saved_groups = checkpoint["optimizer"].get("param_groups")
    groups = optimizer.state_dict()["param_groups"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        count = len(saved_groups) if isinstance(saved_groups, list) else "no"
        raise CheckpointMisfit(f"its optimizer has {count} parameter group(s), config.json's {len(groups)}")
    for index, (saved, fresh) in enumerate(zip(saved_groups, groups)):
        if not isinstance(saved, Mapping):
            raise CheckpointError(f"its optimizer's parameter group {index} is not a dict")
        for key in _OPTIMIZER_SETTINGS:
            if key in fresh and key in saved and _plain(saved[key]) != _plain(fresh[key]):
                raise CheckpointMisfit(f"its optimizer has {key} {_plain(saved[key])!r}, config.json gives "
                                       f"{_plain(fresh[key])!r}")
    fresh_scheduler = scheduler.state_dict()
    for key in _SCHEDULER_SETTINGS:
        if key in fresh_scheduler and key in checkpoint["scheduler"] \
                and _plain(checkpoint["scheduler"][key]) != _plain(fresh_scheduler[key]):
            raise CheckpointMisfit(f"its learning-rate schedule has {key} {_plain(checkpoint['scheduler'][key])!r}, "
                                   f"config.json gives {_plain(fresh_scheduler[key])!r}")


def _plain(value: Any) -> Any:
    """Settings in comparable form: tuples as lists, Counters (MultiStepLR's milestones) as sorted items."""
    if isinstance(value, Mapping):
        return sorted((str(key), _plain(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    return value


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, KeyError):
        text = f"missing {text}"
    return text or type(error).__name__


def newest_valid_checkpoint(
    run_dir: PathLike,
    accept: Callable[[Dict[str, Any], Path], None],
    *,
    say: Callable[[str], None],
    map_location: Any = "cpu",
) -> Tuple[Optional[Tuple[Path, Dict[str, Any]]], List[Path]]:
    """The newest checkpoint of ``run_dir`` that loads and that ``accept`` takes (``(path,
    checkpoint)`` or None), and the newer files it rejected.

    Tries :func:`checkpoint_candidates` in order. Each is read with
    :func:`splitlbi.utils.io.load_torch_file` (its content digest checked,
    ``weights_only=True``) and passed to ``accept(checkpoint, path)``, which validates it
    (e.g. :func:`validate_checkpoint`) and loads it into the model and optimizer, raising
    any exception to reject it. A rejected file is reported through ``say`` with the
    reason; :func:`set_aside` renames them so that no later resume trips on them again.

    Raises:
        RunMismatchError: ``accept`` raised it (config.json and the checkpoint describe
            different runs), or no file was accepted and some loaded but did not fit
            (:class:`CheckpointMisfit`): config.json changed, not the files. Nothing is
            said or renamed then.
    """
    rejected: List[Path] = []
    misfits: List[Tuple[Path, str]] = []
    lines: List[str] = []
    found: Optional[Tuple[Path, Dict[str, Any]]] = None
    seen: List[Path] = []
    for path in checkpoint_candidates(run_dir):
        if any(_same_file(path, other) for other in seen):
            continue  # last.pt is a hard link to the newest kept epoch file: tried already
        seen.append(path)
        try:
            checkpoint = load_torch_file(path, map_location)
            accept(checkpoint, path)
        except RunMismatchError:
            raise
        except Exception as error:  # a damaged file raises many types
            reason = error.reason if isinstance(error, DamagedFileError) else _reason(error)
            if isinstance(error, CheckpointMisfit):
                misfits.append((path, reason))
            lines.append(f"skipping {path.parent.name}/{path.name}: {reason}")
            rejected.append(path)
            continue
        found = (path, checkpoint)
        break
    if found is None and misfits:
        # Files that load but fit none of config.json's model or settings: config.json is what
        # changed. Restarting would train another network over the run's history.
        path, reason = misfits[0]
        raise RunMismatchError(f"no checkpoint of {run_dir} fits its {CONFIG_FILE} ({path.parent.name}/{path.name}: "
                               f"{reason}); was {CONFIG_FILE} edited? Restore it or start a new run (nothing was "
                               f"changed)")
    for line in lines:
        say(line)
    return found, rejected


Build = Callable[[], Tuple[torch.optim.Optimizer, Any]]


def load_resume_point(
    run_dir: Path, info: Mapping[str, Any], model: nn.Module, build: Build, *,
    context: Optional[distributed.DistributedContext] = None, say: Callable[[str], None],
) -> Tuple[Optional[Tuple[torch.optim.Optimizer, Any, int, Optional[RunHistory]]], List[Path]]:
    """Load the newest checkpoint of ``run_dir`` that passes validation into ``model``, a
    fresh optimizer and scheduler from ``build()`` and the RNGs: ``((optimizer, scheduler,
    epoch, history), rejected files)``. With none usable: ``(None, rejected)``, the model
    and RNGs as they were (freshly seeded), ready to restart from epoch 0.

    A candidate is checked in this order: its copy of config.json against ``info``
    (:func:`check_checkpoint_settings`: a difference is a :class:`RunMismatchError`, no
    fall-back), its structure and weights (:func:`validate_checkpoint`), its optimizer
    and scheduler settings (:func:`check_same_hyperparameters`), then the optimizer's and
    scheduler's own ``load_state_dict``.
    """
    context = context if context is not None else distributed.DistributedContext()
    pristine = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    rng_before = rng_state()
    chosen: Dict[str, Any] = {}

    def accept(checkpoint: Dict[str, Any], path: Path) -> None:
        check_checkpoint_settings(checkpoint, info, path)
        epoch = validate_checkpoint(checkpoint, pristine,
                                    epoch=None if path.name == LAST_CHECKPOINT else epoch_from_name(path))
        # Fresh optimizer and scheduler per try: a rejected file leaves nothing half-loaded behind.
        optimizer, scheduler = build()
        check_same_hyperparameters(checkpoint, optimizer, scheduler)
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            raise CheckpointMisfit(f"its optimizer state does not fit: {_reason(error)}") from None
        model.load_state_dict(checkpoint["model"])
        # Each rank continues its own RNG stream (older and one-process checkpoints: "rng").
        restore_rng_state(checkpoint.get("rng_ranks", [checkpoint["rng"]] * context.world_size)[context.rank])
        chosen.update(optimizer=optimizer, scheduler=scheduler, epoch=epoch)

    found, rejected = newest_valid_checkpoint(run_dir, accept, say=say if context.is_main else (lambda line: None))
    if found is None:
        model.load_state_dict(pristine)
        restore_rng_state(rng_before)
        return None, rejected
    path, checkpoint = found
    if rejected:
        say(f"resuming from {CHECKPOINT_DIR}/{path.name}, the newest valid checkpoint")
    history = RunHistory.from_state(checkpoint.get("history"))
    return (chosen["optimizer"], chosen["scheduler"], chosen["epoch"], history), rejected


def check_run_files(run_dir: Path, initial: Mapping[str, Tensor], epoch: int, say: Callable[[str], None]) -> None:
    """After a resume chose the checkpoint of ``epoch``: ``init.pt``, when missing or
    damaged, is written again from ``initial`` (the run's initial weights, which its seed
    gives again), and every ``masks/epoch_XXXX.pt`` up to ``epoch`` whose content digest
    fails is named (they cannot be rebuilt; :func:`load_masks` refuses them)."""
    init = run_dir / INIT_FILE
    try:
        load_torch_file(init)
    except SplitLBIError as error:
        reason = error.reason if isinstance(error, DamagedFileError) else "it was missing"
        atomic_torch_save(dict(initial), init)
        say(f"rebuilt {INIT_FILE} from the run's seed ({reason})")
    for path in sorted((run_dir / MASK_DIR).glob("epoch_*.pt")):
        number = epoch_from_name(path)
        if number is None or number > epoch:
            continue
        try:
            check_torch_file(path)
        except DamagedFileError as error:
            say(f"warning: {MASK_DIR}/{path.name} is damaged ({error.reason}); the support of Γ of epoch {number} "
                f"is lost (the other epochs' masks and the checkpoints are intact)")


def set_aside(paths: List[Path]) -> None:
    """Rename each rejected checkpoint to ``<name>.rejected`` (kept for inspection, never tried again)."""
    for path in paths:
        try:
            os.replace(path, path.with_name(path.name + REJECTED_SUFFIX))
        except OSError:
            pass


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


# --------------------------------------------------------------------------- history


class RunHistory:
    """The text of ``metrics.csv`` and ``path.csv`` (header included) up to the last
    finished epoch, and the content of ``config.json``. Stored in every checkpoint
    (:meth:`state`), it lets a resume rebuild the CSV files byte for byte
    (:func:`restore_table`), even when they were cut or deleted, rebuild a deleted
    ``config.json``, and refuse a ``config.json`` edited since (:func:`run_differences`).

    ``path.csv`` grows by one row per filter and epoch, so it is kept zlib-compressed in
    the checkpoint (a uint8 tensor: checkpoints still load with ``weights_only=True``);
    ``config`` is kept as JSON text. Checkpoints written before ``config`` was saved have
    ``config`` None.
    """

    def __init__(self, metrics: str, path: str, config: Optional[Dict[str, Any]] = None) -> None:
        self.metrics = metrics
        self.path = path
        self.config = config

    def state(self) -> Dict[str, Any]:
        compressed = zlib.compress(self.path.encode("utf-8"), 1)
        state: Dict[str, Any] = {"metrics": self.metrics,
                                 "path_zlib": torch.frombuffer(bytearray(compressed), dtype=torch.uint8)}
        if self.config is not None:
            state["config_json"] = json.dumps(self.config, sort_keys=True)
        return state

    @classmethod
    def from_state(cls, state: Any) -> Optional["RunHistory"]:
        """The history saved in a checkpoint, or None (checkpoints of older versions have none)."""
        if not isinstance(state, Mapping) or not isinstance(state.get("metrics"), str):
            return None
        compressed = state.get("path_zlib")
        if not isinstance(compressed, Tensor):
            return None
        try:
            path = zlib.decompress(compressed.numpy().tobytes()).decode("utf-8")
        except (zlib.error, UnicodeDecodeError):
            return None
        return cls(state["metrics"], path, saved_config({"history": state}))


def saved_config(checkpoint: Any) -> Optional[Dict[str, Any]]:
    """The ``config.json`` content a checkpoint holds (``history.config_json``); None for
    checkpoints written before it was saved (or anything that is not such a checkpoint)."""
    history = checkpoint.get("history") if isinstance(checkpoint, Mapping) else None
    text = history.get("config_json") if isinstance(history, Mapping) else None
    if not isinstance(text, str):
        return None
    try:
        config = json.loads(text)
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def restore_table(path: Path, text: str, say: Callable[[str], None]) -> None:
    """Make the file at ``path`` hold exactly ``text`` (the checkpoint's history).

    Rows after it (the epoch being redone, or a row cut by a kill) are dropped silently,
    as a resume always did; if the file lacked any of ``text`` (missing, shortened,
    rows lost or changed), it is rebuilt and ``say`` tells so.
    """
    try:
        current = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        current = None
    except (OSError, UnicodeDecodeError):
        current = ""
    if current == text:
        return
    atomic_write_text(path, text)
    if current is None:
        say(f"rebuilt {path.name} from the checkpoint's history (the file was missing)")
    elif not current.startswith(text):
        say(f"rebuilt {path.name} from the checkpoint's history (it lacked or changed rows)")


def csv_epochs(text: str) -> List[int]:
    """The epoch (first column) of each complete row after the header of a CSV text."""
    epochs = []
    for line in text.split("\n")[1:-1]:
        try:
            epochs.append(int(line.split(",", 1)[0]))
        except ValueError:
            continue
    return epochs


# --------------------------------------------------------------------------- reading runs


def read_run_config(run_dir: PathLike) -> Dict[str, Any]:
    """The parsed ``config.json`` of a run: one flat dict.

    Keys: every :class:`TrainConfig` field (``model`` is the model name or import path
    ``package.module:factory``; ``model_module``, when present, the module that registered
    it, imported here when this process lacks the name; ``dataset`` the
    dataset name, ``optimizer``, ``lr``, ``kappa``, ``nu``, ``seed``, ``epochs``, ...);
    the dataset facts ``num_classes``, ``in_channels`` (with ``model``: the arguments of
    ``create_model``), ``image_size``, ``mean``, ``std``, ``train_size``, ``test_size``,
    ``dataset_description``; and ``format``, ``versions`` (splitlbi, torch, numpy,
    python), ``created``, ``resumed`` (one entry per resume), ``world_size`` (processes
    that trained it under torchrun; absent in runs made before it was recorded: 1).
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise SplitLBIError(f"{run_dir} is not a splitlbi run directory (no {CONFIG_FILE})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON or not UTF-8
        raise SplitLBIError(f"cannot read {path}: {error}") from None
    if not isinstance(info, dict):
        raise SplitLBIError(f"{path} is not a run's config (a JSON {type(info).__name__}, not an object)")
    check_run_info(info, path)
    import_model_module(info.get("model"), info.get("model_module"))
    return info


def _is_count(value: Any, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


#: The entries of config.json besides the TrainConfig fields that readers rely on: a check
#: (value -> ok) and what it should be, for the message. ``model`` and the first two are required.
_RUN_INFO_ENTRIES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str) and bool(v), "a model name"),
    "num_classes": (_is_count, "an integer >= 1"),
    "in_channels": (_is_count, "an integer >= 1"),
    "image_size": (lambda v: _is_count(v) or (isinstance(v, list) and len(v) == 2 and all(map(_is_count, v))),
                   "an integer >= 1 or [height, width]"),
    "world_size": (_is_count, "an integer >= 1"),
    "train_size": (lambda v: _is_count(v, 0), "an integer >= 0"),
    "test_size": (lambda v: _is_count(v, 0), "an integer >= 0"),
    "mean": (_is_number_list, "a list of numbers"),
    "std": (_is_number_list, "a list of numbers"),
    "retrain": (lambda v: isinstance(v, dict), "an object"),
    "baseline": (lambda v: isinstance(v, dict), "an object"),
}
_REQUIRED_RUN_INFO = ("model", "num_classes", "in_channels")


def check_run_info(info: Mapping[str, Any], path: PathLike = CONFIG_FILE) -> None:
    """Raise :class:`SplitLBIError` (one line, naming ``path`` and the entry) when a parsed
    config.json lacks ``model``, ``num_classes`` or ``in_channels``, or holds a value of the
    wrong type (``"world_size": "two"``, ``"image_size": "big"``, a setting such as
    ``"epochs": "6"``). Ranges of the training settings are :func:`validate_config`'s."""
    for key in _REQUIRED_RUN_INFO:
        if key not in info:
            raise SplitLBIError(f"{path} has no {key!r}: not a complete run config (restore it)")
    for key, (ok, expected) in _RUN_INFO_ENTRIES.items():
        if key in info and not ok(info[key]):
            raise SplitLBIError(f"{path}: {key} must be {expected}, got {info[key]!r}")
    try:
        check_setting_types({key: value for key, value in info.items() if key != "model"})
    except SplitLBIError as error:
        raise SplitLBIError(f"{path}: {error}") from None


#: config.json entries besides the TrainConfig fields that continuing a run may not change:
#: the dataset facts, the number of processes, and what retrain and the baselines record.
_FIXED_RUN_ENTRIES = {"num_classes": None, "in_channels": None, "image_size": None, "train_size": None,
                      "test_size": None, "world_size": 1, "retrain": None, "baseline": None}


def _same_value(first: Any, second: Any) -> bool:
    """Equal, where two strings naming the same existing file or folder count as equal
    (a run directory given as a relative path once and an absolute one next time)."""
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        return first.keys() == second.keys() and all(_same_value(first[k], second[k]) for k in first)
    if isinstance(first, str) and isinstance(second, str) and first != second:
        return _same_file(Path(first), Path(second))
    return first == second


def run_differences(stored: Mapping[str, Any], current: Mapping[str, Any], *,
                    commands: Sequence[str] = ("retrain", "baseline")) -> List[str]:
    """What the run config ``current`` changes of ``stored`` that continuing a run may not
    (``"model 'lenet5' then, 'resnet20' now"``): every TrainConfig field outside
    ``RESUME_OVERRIDABLE_FIELDS`` and the entries of ``_FIXED_RUN_ENTRIES``; empty when
    ``current`` continues ``stored``. ``commands``: which of the ``retrain`` and
    ``baseline`` entries to compare (a slimming fine-tune is a retrain that the baseline
    amends afterwards)."""
    then, now = train_config_from_info(dict(stored)), train_config_from_info(dict(current))
    changed = [f"{name} {getattr(then, name)!r} then, {getattr(now, name)!r} now"
               for name in changed_settings(then, now)]
    for key, default in _FIXED_RUN_ENTRIES.items():
        if key in ("retrain", "baseline") and key not in commands:
            continue
        changed.extend(_value_differences(key, stored.get(key, default), current.get(key, default)))
    return changed


def _value_differences(name: str, before: Any, after: Any) -> List[str]:
    """``["retrain.epoch 3 then, 2 now"]``: the differing leaves of two config.json values."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        return [line for key in dict.fromkeys([*before, *after])
                for line in _value_differences(f"{name}.{key}", before.get(key), after.get(key))]
    return [] if _same_value(before, after) else [f"{name} {before!r} then, {after!r} now"]


def check_checkpoint_settings(checkpoint: Any, info: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`RunMismatchError` when ``checkpoint`` (the file at ``path``) was
    written with other settings than the run's config.json ``info`` now has
    (:func:`run_differences`). Checkpoints without a copy of config.json pass (their
    fit is checked by :func:`validate_checkpoint` and :func:`check_same_hyperparameters`)."""
    stored = saved_config(checkpoint)
    if stored is None:
        return
    try:
        # The command entries the checkpoint knows (a slimming baseline adds its own to the
        # config.json of its fine-tuning afterwards).
        changed = run_differences(stored, info, commands=[key for key in ("retrain", "baseline") if key in stored])
    except SplitLBIError:  # a copy this version cannot read: its fit is checked as for old checkpoints
        return
    if changed:
        run_dir = path.parent.parent
        raise RunMismatchError(f"{run_dir / CONFIG_FILE} differs from the settings {path.parent.name}/{path.name} was "
                               f"trained with ({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}); "
                               f"continuing would mix two runs. Restore it (or delete it: a resume rebuilds it from "
                               f"the checkpoint) or start a new run; nothing was changed")


def read_or_rebuild_run_config(run_dir: PathLike, say: Callable[[str], None], *, write: bool = True
                               ) -> Dict[str, Any]:
    """:func:`read_run_config`; when ``config.json`` is missing but a checkpoint holds a
    copy of it (:class:`RunHistory`), it is written back from the newest such checkpoint
    first (call under the run directory's lock), or only returned with ``write=False``."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).exists():
        return read_run_config(run_dir)
    for path in checkpoint_candidates(run_dir):
        try:
            stored = saved_config(load_torch_file(path))
        except SplitLBIError:
            continue
        if stored is not None:
            check_run_info(stored, f"the copy of {CONFIG_FILE} in {path}")
            if not write:
                return stored
            write_json(run_dir / CONFIG_FILE, stored)
            say(f"rebuilt {CONFIG_FILE} from {path.parent.name}/{path.name} (the file was missing)")
            return read_run_config(run_dir)
    return read_run_config(run_dir)  # the one-line error of a folder without config.json


def read_train_config(run_dir: PathLike) -> TrainConfig:
    """The :class:`TrainConfig` a run was started with (epochs as extended by resumes)."""
    return train_config_from_info(read_run_config(run_dir))


# Settings whose default changed after runs were written without them: such runs used these values.
_DEFAULTS_OF_OLDER_RUNS = {"linear_penalty": "auto", "couple": "filters", "couple_stem": True, "lam_scale": "none",
                           "lam": 1.0}


def train_config_from_info(info: Dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` in a parsed config.json (settings added since take the values older runs used)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({**_DEFAULTS_OF_OLDER_RUNS, **{key: value for key, value in info.items() if key in names}})


def create_run_model(info: Mapping[str, Any]) -> nn.Module:
    """A new (randomly initialized) network of a run's architecture: ``create_model`` with the
    model, classes, input channels and widths in its parsed config.json."""
    return create_model(info["model"], num_classes=info["num_classes"], in_channels=info["in_channels"],
                        **model_kwargs(info.get("widths")))


def list_checkpoints(run_dir: PathLike) -> Dict[int, Path]:
    """Epoch -> path of each kept ``checkpoints/epoch_XXXX.pt``, in epoch order."""
    found = {}
    for path in (Path(run_dir) / CHECKPOINT_DIR).glob("epoch_*.pt"):
        try:
            found[int(path.stem.split("_", 1)[1])] = path
        except ValueError:
            continue
    return dict(sorted(found.items()))


def torch_load(path: Path, map_location: Any) -> Any:
    """A ``.pt`` file of a run: :func:`splitlbi.utils.io.load_torch_file` (content digest
    checked, ``weights_only=True``), with a one-line error for a missing or damaged file."""
    return load_torch_file(path, map_location)


def load_checkpoint(run_dir: PathLike, epoch: Optional[int] = None, map_location: Any = "cpu") -> Dict[str, Any]:
    """A checkpoint dict: ``epoch``, ``model``, ``optimizer``, ``scheduler``, ``rng``, ``format``.

    ``epoch=None`` loads ``checkpoints/last.pt``; otherwise ``checkpoints/epoch_XXXX.pt``
    (only epochs kept by ``--save-every``, plus the final one, exist).
    """
    name = LAST_CHECKPOINT if epoch is None else epoch_file_name(epoch)
    path = Path(run_dir) / CHECKPOINT_DIR / name
    checkpoint = torch_load(path, map_location)
    if not isinstance(checkpoint, dict) or not {"epoch", "model"} <= checkpoint.keys():
        raise SplitLBIError(f"{path} is not a training checkpoint (no 'epoch' and 'model' entries)")
    return checkpoint


def load_masks(run_dir: PathLike, epoch: int) -> Dict[str, Tensor]:
    """Support of Γ at the end of ``epoch`` (SplitLBI runs): param name -> BoolTensor shaped like W."""
    return torch_load(Path(run_dir) / MASK_DIR / epoch_file_name(epoch), "cpu")


def load_model_from_run(run_dir: PathLike, weights: Union[int, str] = "last", map_location: Any = "cpu") -> nn.Module:
    """Recreate a run's model from ``config.json`` and load weights into it.

    Args:
        weights: ``"last"`` (latest checkpoint), ``"init"`` (``init.pt``) or an epoch
            number with a kept checkpoint.
    """
    info = read_run_config(run_dir)
    model = create_run_model(info)
    if weights == "init":
        state = torch_load(Path(run_dir) / INIT_FILE, map_location)
    elif weights == "last":
        state = load_checkpoint(run_dir, None, map_location)["model"]
    elif isinstance(weights, int):
        state = load_checkpoint(run_dir, weights, map_location)["model"]
    else:
        raise SplitLBIError(f"weights must be 'last', 'init' or an epoch number, got {weights!r}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise SplitLBIError(f"the weights ({weights}) in {run_dir} do not fit its {info['model']}: "
                            f"{' '.join(str(error).split())[:300]}") from None
    return model.to(map_location) if map_location is not None else model


# --------------------------------------------------------------------------- opening; the rule for resuming


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse (one line) a ``--out`` that is a file, busy, or holds a run or anything else."""
    if run_dir.exists() and not run_dir.is_dir():
        raise SplitLBIError(f"--out {run_dir} exists and is not a directory")
    if distributed.is_main_process():  # under torchrun the other ranks would see rank 0's own lock
        check_not_busy(run_dir)  # a writer at work there: name it rather than what it has written so far
    if (run_dir / CONFIG_FILE).exists() or (run_dir / CHECKPOINT_DIR).exists():
        raise SplitLBIError(f"{run_dir} already holds a {_continue_hint(run_dir)} or choose another --out")
    if run_dir.exists() and not is_empty_run_dir(run_dir):
        raise SplitLBIError(f"--out {run_dir} exists and is not empty; choose a new or empty directory")


def check_can_write(run_dir: Path, commands: Sequence[str]) -> None:
    """The early check of a command that writes ``run_dir`` and continues its own
    interrupted runs (retrain, the baselines): refuse (one line) a file, a busy directory,
    a run written by a command outside ``commands``, or a folder holding other things.
    Whether a run there is the same run is :func:`start_or_continue`'s to check."""
    if not os.fspath(run_dir):
        raise SplitLBIError("--out is an empty path; give a folder name")
    if run_dir.exists() and not run_dir.is_dir():
        raise SplitLBIError(f"--out {run_dir} exists and is not a directory")
    check_not_busy(run_dir)
    if (run_dir / CONFIG_FILE).exists():
        if written_by(read_run_config(run_dir)) not in commands:
            raise SplitLBIError(f"{run_dir} already holds a {_continue_hint(run_dir)} or choose another --out")
    elif run_dir.exists() and not is_empty_run_dir(run_dir) and not checkpoint_candidates(run_dir):
        raise SplitLBIError(f"--out {run_dir} exists and is not empty; choose a new or empty directory")


def start_or_continue(
    run_dir: Path, info: Dict[str, Any], config: TrainConfig, model: nn.Module, build: Build, *,
    say: Callable[[str], None], initial: Optional[Mapping[str, Tensor]] = None,
) -> Tuple[torch.optim.Optimizer, Any, int, RunHistory]:
    """Take ``run_dir`` for a command that has no ``--resume`` (retrain, the baselines): a
    new run, or the same run continued when the same command is typed again.

    Holds the directory's lock (until the enclosing :func:`holds_run_dirs` call returns).
    An empty or new directory gets :func:`start_run` (``info`` as config.json, ``model``'s
    weights as init.pt, ``build()``'s optimizer and scheduler). A directory holding a run
    with the same settings (:func:`run_differences` against ``info``, comparing the command's
    own entry; a missing config.json is rebuilt from a checkpoint) continues from its newest
    valid checkpoint (:func:`load_resume_point`, :func:`rewind`) or, with none usable,
    starts again from epoch 0; a run with other settings is refused (one line).
    ``initial``: the weights init.pt should hold (default ``model``'s now).

    Returns ``(optimizer, scheduler, epoch to start from, history)``.
    """
    lock_run_dir(run_dir)
    removed = remove_stale_temporaries(run_dir)
    if removed:
        say(f"removed {len(removed)} temporary file(s) left by an interrupted write in {run_dir}")
    if is_empty_run_dir(run_dir):
        optimizer, scheduler = build()
        return optimizer, scheduler, 0, start_run(run_dir, info, model, optimizer, scheduler, [rng_state()])
    stored = read_or_rebuild_run_config(run_dir, say)
    command = written_by(info)
    changed = run_differences(stored, info, commands=(command,)) if command in stored else [
        f"written by 'splitlbi {written_by(stored)}'"]
    if changed:
        raise SplitLBIError(f"{run_dir} holds another run ({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''})"
                            f"; choose another --out, or give the settings it was started with to continue it")
    initial = dict(initial) if initial is not None else {
        name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    resumed, rejected = load_resume_point(run_dir, stored, model, build, say=say)
    if resumed is None:
        rewind(run_dir, stored, config, None, None, rejected, say)
        optimizer, scheduler = build()
        say(f"no usable checkpoint in {run_dir}: starting it again from epoch 0")
        return optimizer, scheduler, 0, start_run(run_dir, None, model, optimizer, scheduler, [rng_state()])
    optimizer, scheduler, epoch, history = resumed
    if config.epochs < epoch:
        raise SplitLBIError(f"--epochs {config.epochs} is below the {epoch} epochs {run_dir} already has")
    history = rewind(run_dir, stored, config, epoch, history, rejected, say)
    check_run_files(run_dir, initial, epoch, say)
    say(f"continuing {run_dir} from epoch {epoch}/{config.epochs}")
    return optimizer, scheduler, epoch, history  # type: ignore[return-value]


def written_by(info: Mapping[str, Any]) -> str:
    """The command that wrote a run's config.json: ``"train"``, ``"retrain"`` or ``"baseline"``."""
    return next((command for command in ("retrain", "baseline") if command in info), "train")


def _continue_hint(run_dir: Path) -> str:
    """How to continue the run in ``run_dir``, for messages that refuse to write over it."""
    try:
        command = written_by(read_run_config(run_dir))
    except SplitLBIError:
        command = "train"
    if command != "train":
        return f"run of 'splitlbi {command}'; run the same 'splitlbi {command}' command again to continue it,"
    return f"training run; continue it with 'splitlbi train --resume {run_dir}'"


def open_run_dir(run_dir: Path, *, new: bool, say: Callable[[str], None]) -> None:
    """Take ``run_dir`` for writing: its lock (:func:`~splitlbi.train.rundir.lock_run_dir`,
    held until the enclosing command returns), the stale temporaries of killed writes
    removed, and for a new run the check that it is empty. Under torchrun only rank 0
    (the writer) does this."""
    if not distributed.is_main_process():
        return
    had_lock_file = (run_dir / LOCK_FILE).exists()
    # The lock first: a second writer learns who holds the directory, not what is in it.
    lock_run_dir(run_dir, create=new)
    removed = remove_stale_temporaries(run_dir)
    if removed:
        say(f"removed {len(removed)} temporary file(s) left by an interrupted write in {run_dir}")
    if new:
        try:
            check_new_run_dir(run_dir)
        except SplitLBIError:
            if not had_lock_file:  # leave someone else's folder as it was
                (run_dir / LOCK_FILE).unlink(missing_ok=True)
            raise


def changed_settings(stored: TrainConfig, requested: TrainConfig) -> List[str]:
    """The fields that ``requested`` may not change when it continues a run stored with
    ``stored`` and does: every :class:`TrainConfig` field outside ``RESUME_OVERRIDABLE_FIELDS``,
    except, for a baseline optimizer, the SplitLBI-only settings it never reads (one rule for
    ``splitlbi train --resume``, ``compare`` and the reproduce workspace)."""
    # A SplitLBI run stores its coupling made concrete ("auto" resolved for its model): compare the
    # request made concrete the same way (both, so that an SGD run's unresolved fields compare too).
    from splitlbi.models import create_model, is_model
    from splitlbi.train.optimizers import resolve_coupling

    def concrete(config: TrainConfig) -> TrainConfig:
        unresolved = config.couple == "auto" or config.couple_stem is None or config.lam is None
        return resolve_coupling(config, create_model(config.model)) if unresolved and is_model(config.model) \
            else config

    stored, requested = concrete(stored), concrete(requested)
    # A baseline never reads SplitLBI's settings: its run is the same run whatever they say.
    ignored = SPLITLBI_ONLY_FIELDS if stored.optimizer != "splitlbi" and requested.optimizer == stored.optimizer else ()
    return [f.name for f in dataclasses.fields(TrainConfig)
            if f.name not in RESUME_OVERRIDABLE_FIELDS and f.name not in ignored
            and getattr(requested, f.name) != getattr(stored, f.name)]


#: The settings only SplitLBI reads (κ, ν, λ, the penalties and what carries Γ).


def merge_resume_config(run_dir: Path, stored: TrainConfig, requested: Optional[TrainConfig]) -> TrainConfig:
    """The settings a resume runs with: ``stored`` with ``requested``'s overridable fields
    (``requested`` None: ``stored``); any other change is refused (:func:`changed_settings`)."""
    if requested is None:
        return stored
    changed = changed_settings(stored, requested)
    if changed:
        options = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise SplitLBIError(f"cannot change {options} when resuming {run_dir}: its {CONFIG_FILE} fixes them "
                            f"(only {', '.join(sorted(RESUME_OVERRIDABLE_FIELDS))} may change)")
    return dataclasses.replace(stored, **{name: getattr(requested, name) for name in RESUME_OVERRIDABLE_FIELDS})


def check_same_settings(run_dir: Path, requested: TrainConfig) -> None:
    """Refuse (one line) to continue the run in ``run_dir`` with ``requested`` when
    :func:`changed_settings` finds a difference (a batch of runs such as ``compare``
    checks every run this way before it trains any)."""
    stored = read_train_config(run_dir)
    changed = changed_settings(stored, requested)
    if changed:
        details = ", ".join(f"{name.replace('_', '-')} {getattr(stored, name)!r} there, "
                            f"{getattr(requested, name)!r} now" for name in changed)
        raise SplitLBIError(f"{run_dir} was trained with other settings ({details}); "
                            f"use another --out or the original settings")


def completed_epochs(run_dir: Path) -> Optional[int]:
    """Epoch of ``checkpoints/last.pt``; None when the run has none (new or never checkpointed)."""
    if not (run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file():
        return None
    return int(load_checkpoint(run_dir)["epoch"])


# What a run holds when it is killed while being created, before its epoch-0 checkpoint.
_RUN_FILES = {CONFIG_FILE, METRICS_FILE, PATH_FILE, INIT_FILE, CHECKPOINT_DIR, MASK_DIR, LOCK_FILE}


def remove_unstarted_run(run_dir: Path) -> bool:
    """Delete a run directory that was killed while being created (no checkpoint, no epoch).

    Returns whether it did; a directory holding anything else is left alone.
    """
    entries = list(run_dir.iterdir())
    if any(entry.name not in _RUN_FILES and not entry.name.endswith(".tmp") for entry in entries):
        return False
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and any(line.strip() for line in _read_text(metrics).splitlines()[1:]):
        return False
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return True


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SplitLBIError(f"cannot read {path}: {error}") from None


def train_or_resume(config: TrainConfig, run_dir: Path, *, log: Optional[Callable[[str], None]] = None,
                    on_start: Optional[Callable[[str], None]] = None) -> str:
    """Bring the run in ``run_dir`` to ``config.epochs``; return what was done: ``"finished"``
    (it had them: nothing ran), ``"resumed"`` or ``"trained"`` (a new run).

    A run with a checkpoint must have the same settings (:func:`check_same_settings`) and
    is resumed from its newest valid checkpoint (a damaged ``last.pt`` falls back as
    ``splitlbi train --resume`` does); one killed before its first checkpoint is removed
    (:func:`remove_unstarted_run`) and trained anew. ``log`` gets ``run_training``'s
    lines; ``on_start("resume" or "train")`` is called just before training starts.
    """
    # run_training builds on this module: imported here, when a run is to be trained.
    from splitlbi.train.run import run_training

    candidates = checkpoint_candidates(run_dir) if run_dir.is_dir() else []
    if candidates:
        check_same_settings(run_dir, config)
        if _stored_epoch(candidates[0]) >= config.epochs:
            return "finished"
        if on_start is not None:
            on_start("resume")
        run_training(config, run_dir, resume=True, log=log)
        return "resumed"
    if run_dir.is_dir() and (run_dir / CONFIG_FILE).exists():
        remove_unstarted_run(run_dir)  # otherwise run_training explains what is wrong
    if on_start is not None:
        on_start("train")
    run_training(config, run_dir, log=log)
    return "trained"


def _stored_epoch(path: Path) -> int:
    """The epoch in a checkpoint file; -1 when it cannot be read (a resume then falls back)."""
    try:
        epoch = torch_load(path, "cpu").get("epoch")
    except (SplitLBIError, AttributeError):
        return -1
    return epoch if isinstance(epoch, int) else -1


def _versions() -> Dict[str, str]:
    return {"splitlbi": splitlbi.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_info(config: TrainConfig, facts: Dict[str, Any]) -> Dict[str, Any]:
    """A new run's config.json: the settings, the dataset ``facts``, format, versions and time."""
    # Flat on purpose: readers (plots) get model/num_classes/in_channels/image_size/mean/std
    # and the hyperparameters without knowing any nesting.
    # A model registered by the user's own module: the readers import it again (registry.import_model_module).
    module = {"model_module": model_module(config.model)} if model_module(config.model) else {}
    return {"format": RUN_FORMAT, **config.to_dict(), **module, **facts, "versions": _versions(), "created": _now(),
            "resumed": []}


def write_json(path: Path, value: Dict[str, Any]) -> None:
    """Write ``value`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def record_resume(run_dir: Path, info: Dict[str, Any], config: TrainConfig, from_epoch: int) -> None:
    """Rewrite ``config.json`` (``info``, updated in place) with the settings a resume runs
    with and one more ``resumed`` entry (the epoch it starts from, when, which versions)."""
    info.update(config.to_dict())
    info.setdefault("resumed", []).append({"from_epoch": from_epoch, "at": _now(), "versions": _versions()})
    write_json(run_dir / CONFIG_FILE, info)


def save_checkpoint(run_dir: Path, state: Dict[str, Any], keep_epoch_file: bool) -> None:
    """Write ``state`` as ``checkpoints/last.pt`` (and as ``epoch_XXXX.pt`` when ``keep_epoch_file``)."""
    directory = run_dir / CHECKPOINT_DIR
    last = directory / LAST_CHECKPOINT
    if not keep_epoch_file:
        atomic_torch_save(state, last)
        return
    epoch_path = directory / epoch_file_name(state["epoch"])
    atomic_torch_save(state, epoch_path)
    _link_last(epoch_path)


def _link_last(epoch_path: Path) -> None:
    """Make ``last.pt`` a second name of ``epoch_path`` (no second copy on disk), swapped in atomically."""
    directory = epoch_path.parent
    temporary = directory / f".{LAST_CHECKPOINT}.link.tmp"
    temporary.unlink(missing_ok=True)
    try:
        os.link(epoch_path, temporary)
    except OSError:  # file systems without hard links
        shutil.copyfile(epoch_path, temporary)
    os.replace(temporary, directory / LAST_CHECKPOINT)
    fsync_directory(directory)


def _relink_last(directory: Path, epoch: int) -> None:
    """A resume from ``epoch_XXXX.pt`` after ``last.pt`` was set aside: ``last.pt`` names it
    again (a finished run resumed has no epoch left to write one)."""
    epoch_path = directory / epoch_file_name(epoch)
    if not (directory / LAST_CHECKPOINT).exists() and epoch_path.is_file():
        _link_last(epoch_path)


def remove_epoch_files_after(directory: Path, epoch: int) -> None:
    """Delete the ``epoch_XXXX.pt`` files in ``directory`` of epochs after ``epoch``."""
    for path in directory.glob("epoch_*.pt"):
        try:
            if int(path.stem.split("_", 1)[1]) > epoch:
                path.unlink()
        except ValueError:
            continue


def check_same_dataset(run_dir: Path, stored: Dict[str, Any], current: Dict[str, Any]) -> None:
    """Refuse to resume on a dataset whose facts differ from the ones the run recorded."""
    # A different dataset would silently break "same weights as an uninterrupted run".
    for key in ("num_classes", "in_channels", "train_size", "test_size"):
        if key in stored and stored[key] != current[key]:
            raise SplitLBIError(f"the dataset differs from the one {run_dir} was trained on "
                                f"({key}: {stored[key]} then, {current[key]} now)")


def check_same_world(run_dir: Path, stored: Dict[str, Any], config: TrainConfig,
                      context: distributed.DistributedContext) -> None:
    """Refuse to resume with another number of processes, or a cosine run with other ``--epochs``."""
    world_size = int(stored.get("world_size", 1))
    if world_size != context.world_size:
        raise SplitLBIError(f"{run_dir} was trained by {world_size} process(es) and is being resumed by "
                            f"{context.world_size}: use the same number (the global batch is --batch-size "
                            f"x processes)")
    if config.schedule == "cosine" and config.epochs != stored["epochs"]:
        raise SplitLBIError(f"cannot change --epochs of a --schedule cosine run ({stored['epochs']} -> "
                            f"{config.epochs}): the learning rate anneals over the planned epochs")


# --------------------------------------------------------------------------- rows


def _layer_name(parameter_name: str) -> str:
    return parameter_name[: -len(".weight")] if parameter_name.endswith(".weight") else parameter_name


def _number(value: Optional[float], spec: str = ".6g") -> str:
    return "" if value is None else format(value, spec)


def filter_path_rows(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> List[List[str]]:
    """The path.csv rows of one epoch: ``[epoch, layer, filter, w_norm, gamma_norm, in_support, v_norm]``.

    SplitLBI: every coupled parameter, with the ℓ2 norms of each output filter of W and
    of Γ, whether the filter is in the support of Γ, and ``v_norm``, the norm of the
    filter's ``V`` that the penalty compares with ``λ`` (ℓ2 for group/neuron, the largest
    ``|V|`` of the row for l1; ``v_norm / λ`` is the path score of
    :meth:`SplitLBI.path_scores`, written with 9 digits so it reads back exactly in
    float32). Other optimizers: the weights of conv (4-D) and linear (2-D) layers, with
    the Γ and V columns empty.
    """
    rows: List[List[str]] = []
    if isinstance(optimizer, SplitLBI):
        weight_norms = optimizer.filter_norms("weight")
        gamma_norms = optimizer.filter_norms("gamma")
        support = optimizer.filter_support()
        v_norms = {c.name: _penalties.filter_dual_norms(c.v, c.penalty) for c in optimizer.named_coupled()}
        for name, norms in weight_norms.items():
            layer = _layer_name(name)
            columns = zip(norms.tolist(), gamma_norms[name].tolist(), support[name].tolist(), v_norms[name].tolist())
            rows.extend([str(epoch), layer, str(index), _number(w), _number(g), str(int(s)), _number(v, ".9g")]
                        for index, (w, g, s, v) in enumerate(columns))
    else:
        for name, parameter in model.named_parameters():
            if parameter.dim() not in (2, 4):
                continue
            norms = parameter.detach().flatten(1).norm(dim=1).tolist()
            layer = _layer_name(name)
            rows.extend([str(epoch), layer, str(index), _number(w), "", "", ""] for index, w in enumerate(norms))
    return rows


def metrics_row(metrics: Dict[str, Any]) -> List[str]:
    """The metrics.csv row of one epoch's ``metrics`` (METRICS_COLUMNS), as text."""
    return [str(metrics["epoch"]), _number(metrics["lr"]), _number(metrics["train_loss"]),
            _number(metrics["train_acc"], ".4f"), _number(metrics["test_loss"]), _number(metrics["test_acc"], ".4f"),
            _number(metrics["sparse_test_acc"], ".4f"), _number(metrics["gamma_nonzero_share"]),
            _number(metrics["epoch_seconds"], ".3f"), _number(metrics.get("sparse_recal_test_acc"), ".4f"),
            _number(metrics.get("sparse_macs_share"), ".6f")]


def append_rows(path: Path, rows: Iterable[Sequence[str]]) -> str:
    """Append ``rows`` to the CSV file at ``path`` (fsynced); return the text appended."""
    # Values never contain commas or quotes (numbers, module names), so plain joins are valid CSV.
    text = "".join(",".join(row) + "\n" for row in rows)
    append_text(path, text)
    return text


def file_columns(path: Path, default: Sequence[str]) -> Sequence[str]:
    """The columns of a CSV file's header line; ``default`` when it has none (new or empty file)."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline().strip()
    except (FileNotFoundError, UnicodeDecodeError):  # missing or damaged: rebuilt or refused by the caller
        return default
    return tuple(first.split(",")) if first else default


def truncate_rows_after(path: Path, epoch: int, columns: Sequence[str]) -> None:
    """Keep the header and the complete rows of epochs <= ``epoch``: undo a crash's half-epoch."""
    header = ",".join(columns)
    try:
        lines = path.read_text(encoding="utf-8").split("\n") if path.exists() else [""]
    except UnicodeDecodeError:
        raise SplitLBIError(f"{path} is not UTF-8 text; restore it or start a new run") from None
    # The piece after the last newline is empty, or a row cut short by a crash: dropped.
    complete = lines[:-1]
    kept = [header]
    for line in complete[1:]:
        try:
            row_epoch = int(line.split(",", 1)[0])
        except ValueError:
            continue
        if row_epoch <= epoch and line.count(",") == len(columns) - 1:
            kept.append(line)
    atomic_write_text(path, "\n".join(kept) + "\n")


def restore_rows(path: Path, saved: Optional[str], first: int, last: int, columns: Sequence[str],
                  say: Callable[[str], None]) -> str:
    """Bring the CSV file at ``path`` back to epoch ``last`` on resume; return its text.

    From the checkpoint's copy ``saved`` (rebuilding lost rows) unless there is none
    (older checkpoints) or the file keeps an older, narrower header (a run written before
    a column was added, e.g. path.csv's v_norm): then the file's own rows after ``last``
    are dropped and its rows ``first..last`` must all be there.
    """
    if saved is not None:
        saved_columns = saved.split("\n", 1)[0].split(",")
        on_disk = list(file_columns(path, saved_columns))
        older = on_disk != saved_columns and on_disk == saved_columns[:len(on_disk)]
        if not older:
            restore_table(path, saved, say)
            return saved
    # A run written before path.csv had v_norm keeps its six columns.
    truncate_rows_after(path, last, file_columns(path, columns))
    return _require_rows(path, first, last)


def _require_rows(path: Path, first: int, last: int) -> str:
    """The text of ``path`` if it has rows for every epoch ``first..last``; else refuse.

    For checkpoints of older versions, which hold no history to rebuild the file from.
    """
    text = path.read_text(encoding="utf-8")
    missing = sorted(set(range(first, last + 1)) - set(csv_epochs(text)))
    if missing:
        raise SplitLBIError(f"{path} lacks the rows of epoch(s) {', '.join(map(str, missing[:5]))}"
                            f"{' ...' if len(missing) > 5 else ''} and the checkpoint (from an older splitlbi) holds "
                            f"no copy to rebuild it from; restore the file or start a new run")
    return text


# --------------------------------------------------------------------------- checkpoints: what they hold


def rng_state() -> Dict[str, Any]:
    """The torch, Python, NumPy (and CUDA) RNG states of this process, checkpoint-ready (``weights_only``)."""
    numpy_state: Any = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # Stored as plain tensors/numbers so checkpoints load with weights_only=True.
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Set the RNGs back to a :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _as_tuples(value: Any) -> Any:
    # random.setstate needs tuples; be lenient in case a serializer turned them into lists.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(item) for item in value)
    return value


def checkpoint_state(epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, rng_states: List[Dict[str, Any]],
                      history: Optional[RunHistory] = None) -> Dict[str, Any]:
    """``rng_states``: each rank's :func:`rng_state` (one entry in one process);
    ``history``: metrics.csv and path.csv up to ``epoch``, for a resume to rebuild them."""
    state = {"format": RUN_FORMAT, "epoch": epoch, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states[0]}
    if len(rng_states) > 1:
        state["rng_ranks"] = rng_states
    if history is not None:
        state["history"] = history.state()
    return state


# --------------------------------------------------------------------------- writing a run


def start_run(run_dir: Path, info: Optional[Dict[str, Any]], model: nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: Any, rng_states: List[Dict[str, Any]]) -> RunHistory:
    """Write a run's epoch 0 into ``run_dir`` (opened with :func:`open_run_dir`); return its history.

    ``config.json`` (``info``, unless None: a restart keeps the one it has), ``init.pt``
    (``model``'s weights now), ``metrics.csv`` and ``path.csv`` with their headers and
    path.csv's epoch-0 rows, ``checkpoints/`` (``masks/`` for SplitLBI) and the epoch-0
    ``last.pt``, which makes a run killed during its first epoch resumable.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if info is not None:
        write_json(run_dir / CONFIG_FILE, info)
    atomic_torch_save({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
                      run_dir / INIT_FILE)
    history = RunHistory(",".join(METRICS_COLUMNS) + "\n", ",".join(PATH_COLUMNS) + "\n",
                         info if info is not None else read_run_config(run_dir))
    atomic_write_text(run_dir / METRICS_FILE, history.metrics)
    atomic_write_text(run_dir / PATH_FILE, history.path)
    history.path += append_rows(run_dir / PATH_FILE, filter_path_rows(model, optimizer, 0))
    (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
    if isinstance(optimizer, SplitLBI):
        (run_dir / MASK_DIR).mkdir(exist_ok=True)
    save_checkpoint(run_dir, checkpoint_state(0, model, optimizer, scheduler, rng_states, history),
                    keep_epoch_file=False)
    return history


def rewind(run_dir: Path, info: Dict[str, Any], config: TrainConfig, epoch: Optional[int],
           saved: Optional[RunHistory], rejected: List[Path], say: Callable[[str], None]) -> Optional[RunHistory]:
    """Bring a run directory back to the end of ``epoch``, the checkpoint a resume continues
    from (``None``: no usable checkpoint, the run restarts from epoch 0 and :func:`start_run`
    writes its files again); return the history to continue (``None`` on a restart).

    The ``rejected`` checkpoints are set aside; masks and epoch checkpoints written after
    ``epoch`` (an epoch that will be redone) are removed; metrics.csv and path.csv are
    restored from ``saved`` (the checkpoint's copy) or cut back to ``epoch``, with every
    earlier row required (:func:`restore_rows`); config.json records the resume
    (:func:`record_resume`).
    """
    set_aside(rejected)
    if epoch is not None:
        _relink_last(run_dir / CHECKPOINT_DIR, epoch)
    history = None
    if epoch is not None:
        history = RunHistory(
            restore_rows(run_dir / METRICS_FILE, saved.metrics if saved else None, 1, epoch, METRICS_COLUMNS, say),
            restore_rows(run_dir / PATH_FILE, saved.path if saved else None, 0, epoch, PATH_COLUMNS, say))
    remove_epoch_files_after(run_dir / MASK_DIR, epoch or 0)
    remove_epoch_files_after(run_dir / CHECKPOINT_DIR, epoch or 0)
    record_resume(run_dir, info, config, epoch or 0)
    if history is not None:
        history.config = info  # the checkpoints from now on carry config.json as it is now
    return history


def write_epoch(run_dir: Path, history: RunHistory, metrics: Dict[str, Any], model: nn.Module,
                optimizer: torch.optim.Optimizer, scheduler: Any, rng_states: List[Dict[str, Any]], *,
                masks: Optional[Mapping[str, Tensor]] = None, keep: bool) -> None:
    """Write one finished epoch: its metrics.csv row, its path.csv rows (epoch 0 has them
    from :func:`start_run`), ``masks/epoch_XXXX.pt`` (``masks``: SplitLBI's support of Γ)
    and, last, the checkpoint (``epoch_XXXX.pt`` too when ``keep``): once it exists,
    everything of the epoch is on disk. ``history`` is extended in place."""
    epoch = metrics["epoch"]
    # A run written before metrics.csv had its last columns keeps its narrower rows.
    metrics_width = len(file_columns(run_dir / METRICS_FILE, METRICS_COLUMNS))
    history.metrics += append_rows(run_dir / METRICS_FILE, [metrics_row(metrics)[:metrics_width]])
    if epoch > 0:
        # A run written before path.csv had v_norm keeps its narrower rows.
        width = len(file_columns(run_dir / PATH_FILE, PATH_COLUMNS))
        history.path += append_rows(run_dir / PATH_FILE,
                                    [row[:width] for row in filter_path_rows(model, optimizer, epoch)])
    if masks is not None:
        atomic_torch_save(masks, run_dir / MASK_DIR / epoch_file_name(epoch))
    save_checkpoint(run_dir, checkpoint_state(epoch, model, optimizer, scheduler, rng_states, history),
                    keep_epoch_file=keep)


# --------------------------------------------------------------------------- jobs of a workspace

#: Written (atomically) into a run directory of a workspace once its job returned.
JOB_FILE = "job.json"


def job_done(run_dir: Path) -> bool:
    """Whether the workspace job in ``run_dir`` finished (its :data:`JOB_FILE` exists)."""
    return (run_dir / JOB_FILE).is_file()


def mark_job_done(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Write ``run_dir``'s :data:`JOB_FILE` (the job's label and settings): the job is finished."""
    atomic_write_text(run_dir / JOB_FILE, json.dumps(record, indent=2, default=str))


@contextlib.contextmanager
def job_lock(run_dir: Path, say: Callable[[str], None], wait: bool = True) -> Iterator[bool]:
    """Hold ``<run_dir>.lock`` (beside the run directory) while a job runs, waiting for
    another process that holds it; yields True. With ``wait=False`` a lock held elsewhere
    is not waited for: it yields False (the caller does something else first).

    Two reproductions sharing an ``--out`` (e.g. two figures that need the same run) thus
    never train one run twice: the second waits, then finds it finished. Unlike
    :class:`RunDirLock` (one writer, the second refused) this one waits. An OS file lock
    (``flock``): a killed process leaves no stale lock, and the holder removes the file
    when the job ends, however it ends short of a kill (a lock taken on a file removed
    meanwhile is let go and taken again on the new one).
    """
    try:
        import fcntl
    except ImportError:  # not on POSIX: no locking
        yield True
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.with_name(run_dir.name + ".lock")
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                handle.close()
                yield False
                return
            say(f"waiting for another process that is running {run_dir.name}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        # The holder before us removes the file when it is done: a lock on a removed file
        # excludes no one, so take the one now at that path.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(handle.fileno())):
            break
        handle.close()
    try:
        yield True
    finally:
        # Removed while still held, so that no lock file stays behind (also when the job failed).
        path.unlink(missing_ok=True)
        handle.close()
