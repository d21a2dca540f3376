"""Crash-safe file writing: a reader sees either the old file or the new one, never half.

Each writer puts the data in a temporary file in the destination's directory (so the
final rename stays on one file system), fsyncs it, and ``os.replace``s it over the
destination, which POSIX and Windows both perform atomically.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Sequence, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temporary files are created 0600; the final file gets the mode a plain open() would give.
_FILE_MODE = 0o666 & ~_read_umask()

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "fsync_directory"]


def fsync_directory(directory: PathLike) -> None:
    """Flush a directory entry to disk so that a rename inside it survives a power cut.

    A no-op where directories cannot be opened (Windows).
    """
    try:
        descriptor = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(descriptor)


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        mode="wb", dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp", delete=False
    )
    temporary = Path(handle.name)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(handle.fileno(), _FILE_MODE)
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(destination.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_csv(path: PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV file (``header``, then ``rows``; ``\n`` line ends) to ``path`` atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically: a crash never leaves a truncated file at ``path``."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))
