"""The safety core of a run directory: one writer at a time, no stale temporaries, the
newest valid checkpoint, and a history that rebuilds ``metrics.csv`` / ``path.csv``.

Every command that writes a run directory (``splitlbi train``, ``retrain``, ``baseline``,
and the reproduce workspace through them) holds :class:`RunDirLock` while it writes:

* :class:`RunDirLock`: an exclusive OS file lock on ``<run_dir>/.lock`` (``flock``), held
  while the writer works and released by the kernel when the process ends, however it
  ends; a second writer gets a one-line :class:`RunDirBusyError` naming the holder's pid.
  Re-entrant within one process (a baseline that calls ``retrain`` on its own output).
* :func:`remove_stale_temporaries`: the ``.NAME.*.tmp`` files that
  :mod:`splitlbi.utils.io`'s atomic writes leave behind when killed; only safe to call
  under the lock (a live writer's temporary would otherwise be deleted).
* :func:`newest_valid_checkpoint`: ``checkpoints/last.pt``, then ``epoch_XXXX.pt``
  newest first, each loaded and passed to the caller's check; the first one that passes
  is used, each rejected one is named with the reason and moved aside (``.rejected``).
* :class:`RunHistory`: the text of ``metrics.csv`` and ``path.csv`` up to a checkpoint's
  epoch, saved inside it, so that a resume rewrites those files exactly as they were,
  whatever happened to them after the checkpoint (rows cut, lost, or the file deleted).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, TypeVar, Union

import torch
from torch import Tensor

from splitlbi.errors import SplitLBIError
from splitlbi.utils.io import atomic_write_text

__all__ = [
    "LOCK_FILE", "REJECTED_SUFFIX", "RunDirBusyError", "RunDirLock", "check_not_busy", "holds_run_dirs",
    "lock_run_dir",
    "remove_stale_temporaries",
    "is_empty_run_dir", "checkpoint_candidates", "newest_valid_checkpoint", "set_aside", "CheckpointError",
    "validate_checkpoint", "epoch_from_name", "RunHistory", "restore_table", "csv_epochs",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The lock file inside a run directory. It stays after the run (an unlocked file is no
#: lock); removing it while a writer runs would let a second writer in.
LOCK_FILE = ".lock"
#: Suffix given to a checkpoint that a resume found damaged (kept for inspection).
REJECTED_SUFFIX = ".rejected"
#: Keys every training checkpoint has (see ``splitlbi.train.run``).
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng")
_CHECKPOINT_DIR = "checkpoints"
_MASK_DIR = "masks"
_LAST = "last.pt"


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
    for folder in (root, root / _CHECKPOINT_DIR, root / _MASK_DIR):
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


def epoch_from_name(path: Path) -> Optional[int]:
    """7 for ``epoch_0007.pt``; None for other names."""
    try:
        return int(path.stem.split("_", 1)[1])
    except (IndexError, ValueError):
        return None


def checkpoint_candidates(run_dir: PathLike) -> List[Path]:
    """The checkpoints a resume tries, in order: ``last.pt``, then ``epoch_XXXX.pt`` newest first."""
    directory = Path(run_dir) / _CHECKPOINT_DIR
    epochs = [(epoch, path) for path in directory.glob("epoch_*.pt") if (epoch := epoch_from_name(path)) is not None]
    ordered = [path for _, path in sorted(epochs, reverse=True)]
    last = directory / _LAST
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
    if set(weights) != set(model_state):
        extra, lacking = sorted(set(weights) - set(model_state)), sorted(set(model_state) - set(weights))
        detail = f"lacks {lacking[0]!r}" if lacking else f"has an unknown {extra[0]!r}"
        raise CheckpointError(f"its weights are not of this model (it {detail})")
    for name, expected in model_state.items():
        tensor = weights[name]
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != tuple(expected.shape):
            shape = list(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise CheckpointError(f"weight {name!r} has shape {shape}, the model {list(expected.shape)}")
    optimizer = checkpoint["optimizer"]
    if not isinstance(optimizer, Mapping) or "state" not in optimizer or "param_groups" not in optimizer:
        raise CheckpointError("its 'optimizer' is not an optimizer state_dict")
    bad = _first_non_finite(weights, "model") or _first_non_finite(optimizer.get("state"), "optimizer state")
    if bad is not None:
        raise CheckpointError(f"{bad} is not finite (nan or inf)")
    return stored_epoch


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

    Tries :func:`checkpoint_candidates` in order. Each is read with ``torch.load(...,
    weights_only=True)`` and passed to ``accept(checkpoint, path)``, which validates it
    (e.g. :func:`validate_checkpoint`) and loads it into the model and optimizer, raising
    any exception to reject it. A rejected file is reported through ``say`` with the
    reason; :func:`set_aside` renames them so that no later resume trips on them again.
    """
    rejected: List[Path] = []
    found: Optional[Tuple[Path, Dict[str, Any]]] = None
    seen: List[Path] = []
    for path in checkpoint_candidates(run_dir):
        if any(_same_file(path, other) for other in seen):
            continue  # last.pt is a hard link to the newest kept epoch file: tried already
        seen.append(path)
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
            accept(checkpoint, path)
        except Exception as error:  # torch.load raises many types for a damaged file
            say(f"skipping {path.parent.name}/{path.name}: {_reason(error)}")
            rejected.append(path)
            continue
        found = (path, checkpoint)
        break
    return found, rejected


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
    finished epoch. Stored in every checkpoint (:meth:`state`), it lets a resume rebuild
    both files byte for byte (:func:`restore_table`), even when they were cut or deleted.

    ``path.csv`` grows by one row per filter and epoch, so it is kept zlib-compressed in
    the checkpoint (a uint8 tensor: checkpoints still load with ``weights_only=True``).
    """

    def __init__(self, metrics: str, path: str) -> None:
        self.metrics = metrics
        self.path = path

    def state(self) -> Dict[str, Any]:
        compressed = zlib.compress(self.path.encode("utf-8"), 1)
        return {"metrics": self.metrics, "path_zlib": torch.frombuffer(bytearray(compressed), dtype=torch.uint8)}

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
        return cls(state["metrics"], path)


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
