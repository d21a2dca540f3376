"""Crash-safe file writing and safe reading of ``.pt`` files.

Writing: each writer puts the data in a temporary file in the destination's directory
(so the final rename stays on one file system), fsyncs it, and ``os.replace``s it over
the destination, which POSIX and Windows both perform atomically. A full disk (or a
quota, or the file-size limit) ends as one :class:`NoSpaceError` naming the folder and
the space the file needs; the temporary file is removed and the destination keeps its
old content.

``.pt`` files (:func:`atomic_torch_save`) carry a content digest: the SHA-256 of the
bytes ``torch.save`` wrote, stored in the ZIP archive's comment (``torch.save`` files
are ZIP archives; the comment is the archive's own field for free text, so the file
stays an ordinary torch file that ``torch.load`` reads as before).

Reading: :func:`load_torch_file` is the one ``torch.load`` of the package. It checks
the digest (a file without one, written before it existed, is accepted as it is:
*legacy*) and unpickles with ``weights_only=True``, so a file can hold tensors,
numbers, strings and containers but never make the loader run code. The digest guards
against damage (a flipped bit, a truncated copy); it is no signature: whoever can write
the file can write a matching digest, which is why the loading is ``weights_only`` in
any case.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Optional, Sequence, Union

import torch

from splitlbi.errors import SplitLBIError

PathLike = Union[str, "os.PathLike[str]"]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temporary files are created 0600; the final file gets the mode a plain open() would give.
_FILE_MODE = 0o666 & ~_read_umask()

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_csv", "atomic_torch_save", "append_text",
           "fsync_directory", "load_torch_file", "check_torch_file", "DamagedFileError", "NoSpaceError",
           "DIGEST_PREFIX"]

#: How a digest comment starts; 64 hex digits of SHA-256 follow.
DIGEST_PREFIX = b"splitlbi-sha256:"
_DIGEST_COMMENT_SIZE = len(DIGEST_PREFIX) + 64
# The ZIP "end of central directory" record: 22 bytes, the last two the comment's length.
_END_RECORD = b"PK\x05\x06"
_END_RECORD_SIZE = 22
_ZIP_START = b"PK\x03\x04"
# What a write fails with when the space runs out: the disk, the user's quota, the file-size limit.
_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file larger than the file-size limit (ulimit -f)"}


class DamagedFileError(SplitLBIError):
    """A file that cannot be read back: its content digest does not match, or it does not
    load (truncated, not a torch file, or holding something other than tensors and plain
    values). ``reason`` says which, without the path."""

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(f"cannot read {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class NoSpaceError(SplitLBIError):
    """A write failed for lack of space; the message names the folder and the space needed."""


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


def _format_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _no_space_cause(error: BaseException) -> Optional[OSError]:
    """The OSError of a full disk behind ``error`` (torch.save wraps it in a RuntimeError), if any."""
    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return current
        current = current.__cause__ or current.__context__
    return None


def _no_space_error(cause: OSError, destination: Path, needed: int) -> NoSpaceError:
    folder = destination.parent
    try:
        free = f", {_format_size(shutil.disk_usage(folder).free)} free there"
    except OSError:
        free = ""
    return NoSpaceError(f"cannot write {destination.name} in {folder}: {_NO_SPACE[cause.errno]}; it needs about "
                        f"{_format_size(needed)}{free}. Free some space there and continue: what is on disk "
                        f"is intact (a run resumes from its last checkpoint)")


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any], needed: Callable[[], int]) -> None:
    destination = Path(path)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(
            mode="wb", dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp", delete=False
        )
    except OSError as error:
        cause = _no_space_cause(error)
        if cause is not None:
            raise _no_space_error(cause, destination, needed()) from None
        raise
    temporary = Path(handle.name)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(handle.fileno(), _FILE_MODE)
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, destination)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        cause = _no_space_cause(error)
        if cause is not None:
            raise _no_space_error(cause, destination, needed()) from None
        raise
    fsync_directory(destination.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    _atomic_write(path, lambda handle: handle.write(data), lambda: len(data))


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


def append_text(path: PathLike, text: str) -> None:
    """Append ``text`` to the file at ``path`` and fsync it (a full disk: :class:`NoSpaceError`)."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        cause = _no_space_cause(error)
        if cause is not None:
            raise _no_space_error(cause, Path(path), len(text.encode("utf-8"))) from None
        raise


class _DigestWriter:
    """A write-only stream for ``torch.save`` that hashes what passes through and then seals
    the ZIP archive with the digest as its comment (:meth:`seal`)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.hash = hashlib.sha256()
        self.tail = b""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.tail = (self.tail + view[-_END_RECORD_SIZE:].tobytes())[-_END_RECORD_SIZE:]
        return self.handle.write(view)

    def flush(self) -> None:
        self.handle.flush()

    def seal(self) -> None:
        if not (self.tail.startswith(_END_RECORD) and self.tail.endswith(b"\x00\x00")):
            return  # not a ZIP archive without a comment (no torch.save of this version writes one)
        comment = DIGEST_PREFIX + self.hash.hexdigest().encode("ascii")
        self.handle.seek(-2, io.SEEK_END)
        self.handle.write(struct.pack("<H", len(comment)) + comment)


def _estimated_size(value: Any, seen: set) -> int:
    """About the bytes ``torch.save`` writes for ``value``: each storage once, its record's
    header and alignment, the strings; the pickled structure around them is small."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            return 64
        seen.add(key)
        return storage.nbytes() + 256
    if isinstance(value, dict):
        return sum(_estimated_size(key, seen) + _estimated_size(item, seen) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_estimated_size(item, seen) for item in value)
    if isinstance(value, torch.nn.Module):
        return sum(_estimated_size(tensor, seen) for tensor in value.state_dict().values())
    if isinstance(value, (str, bytes)):
        return len(value)
    return 16


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically, with a content digest in the file (see the module
    doc): a crash never leaves a truncated file at ``path``, and damage later is detected."""

    def write(handle: IO[bytes]) -> None:
        writer = _DigestWriter(handle)
        torch.save(obj, writer)
        writer.seal()

    _atomic_write(path, write, lambda: _estimated_size(obj, set()) + 1024)


def _check_digest(data: bytes) -> Optional[str]:
    """Why ``data`` (a whole .pt file) fails its digest check; None when it passes or has no digest."""
    if not data.startswith(_ZIP_START):
        return None  # torch's legacy (pre-1.6) format: no archive, no digest
    end = len(data) - _END_RECORD_SIZE
    if data[end:end + 4] == _END_RECORD and data[-2:] == b"\x00\x00":
        return None  # no comment: written before digests existed
    end -= _DIGEST_COMMENT_SIZE
    comment = data[-_DIGEST_COMMENT_SIZE:]
    if (end < 0 or data[end:end + 4] != _END_RECORD
            or data[end + _END_RECORD_SIZE - 2:end + _END_RECORD_SIZE] != struct.pack("<H", _DIGEST_COMMENT_SIZE)
            or not comment.startswith(DIGEST_PREFIX)):
        return "the end of the file is damaged (truncated, or not written by torch.save)"
    original = data[:end + _END_RECORD_SIZE - 2] + b"\x00\x00"
    if hashlib.sha256(original).hexdigest().encode("ascii") != comment[len(DIGEST_PREFIX):]:
        return "its content digest does not match (the file was damaged after it was written)"
    return None


def check_torch_file(path: PathLike) -> None:
    """Raise :class:`DamagedFileError` unless the ``.pt`` file at ``path`` passes its digest
    check (a file without a digest passes). Reads the file, does not unpickle it."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DamagedFileError(path, error.strerror or str(error)) from None
    reason = _check_digest(data)
    if reason is not None:
        raise DamagedFileError(path, reason)


def load_torch_file(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` after the digest check: tensors, numbers,
    strings and containers only; never code.

    Raises:
        SplitLBIError: the file does not exist.
        DamagedFileError: the digest does not match, or the file does not load (truncated,
            not a torch file, or an object ``weights_only`` refuses).
    """
    path = Path(path)
    if not path.is_file():
        raise SplitLBIError(f"{path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DamagedFileError(path, error.strerror or str(error)) from None
    reason = _check_digest(data)
    if reason is not None:
        raise DamagedFileError(path, reason)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or refused file
        text = " ".join(str(error).split())
        refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please use| Check the documentation|$)", text)
        if refused or text.startswith("Weights only load failed"):
            # torch's advice to load it with weights_only=False is exactly what must not happen here.
            detail = refused.group(1).rstrip(". ") if refused else "refused by weights_only"
            reason = f"it holds more than tensors and plain values ({detail}); not loaded"
        else:
            reason = f"{text or type(error).__name__} (a damaged or truncated file?)"
        raise DamagedFileError(path, reason) from None
