"""CIFAR-10 from its original python-pickle archive, ``cifar-10-python.tar.gz``.

Where it is looked for, for a data directory ``<dir>``, in this order:

- the archive ``<dir>/cifar10/cifar-10-python.tar.gz`` or ``<dir>/cifar-10-python.tar.gz``
  (the latter is where torchvision downloads it);
- the extracted folder ``<dir>/cifar-10-batches-py/`` or ``<dir>/cifar10/cifar-10-batches-py/``
  (torchvision's layout) with ``data_batch_1`` ... ``data_batch_5``, ``test_batch`` and
  ``batches.meta``.

The archive's md5 (or, for an extracted folder, each file's md5) is checked against
:data:`CIFAR10_MD5` *before* anything is unpickled, and only the expected members are
unpickled, with an unpickler that refuses every global but the numpy
constructors that arrays and scalars need. The archive is read as a stream, never extracted to
disk. A missing archive is downloaded to ``<dir>/cifar10/`` unless downloads are disabled.

Each batch pickle holds ``b"data"``, uint8 ``[n, 3072]``, one image per row as 1024 red,
1024 green and 1024 blue values, each channel row-major: a row reshaped to
``[3, 32, 32]`` is the image in CHW order.
"""

from __future__ import annotations

import io
import pickle
import posixpath
import tarfile
import zlib
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from splitlbi.data.download import download_file, file_md5, offline_reason
from splitlbi.errors import DataError

__all__ = [
    "CIFAR10_ARCHIVE",
    "CIFAR10_FOLDER",
    "CIFAR10_URLS",
    "CIFAR10_MD5",
    "CIFAR10_CLASSES",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10_TEST_FILE",
    "CIFAR10_META_FILE",
    "load_cifar10_arrays",
]

#: The original archive's file name.
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
#: The folder inside the archive (and torchvision's extracted folder).
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_URLS: Tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
CIFAR10_TRAIN_FILES: Tuple[str, ...] = tuple(f"data_batch_{index}" for index in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"

#: File name -> official md5: of the archive as stored, and of each extracted file.
#: A module-level dict on purpose: tests that generate archives register theirs here.
CIFAR10_MD5: Dict[str, str] = {
    CIFAR10_ARCHIVE: "c58f30108f718f92721af3b95e74349a",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

#: Class names in label order (batches.meta's ``label_names``).
CIFAR10_CLASSES: Tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

_IMAGE_SHAPE = (3, 32, 32)
_ROW_LENGTH = 3 * 32 * 32

# The globals a pickled numpy array needs: the original (Python 2) archive names
# numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype; numpy scalars (in
# re-pickled label lists) add multiarray.scalar, a Python 3 pickle at protocol 2
# _codecs.encode for bytes. __reduce__ hands us the functions of the installed numpy
# (numpy.core became numpy._core in numpy 2).
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_SCALAR = np.int64(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler for dicts, lists, numbers, bytes, numpy arrays and scalars only."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _unpickle(stream: IO[bytes], source: str) -> Dict[Any, Any]:
    try:
        value = _ArrayUnpickler(stream, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, OSError, zlib.error,
            tarfile.TarError) as exc:
        raise DataError(f"corrupt CIFAR-10 file {source}: cannot unpickle it ({exc}); replace it with the original")
    if not isinstance(value, dict):
        raise DataError(f"corrupt CIFAR-10 file {source}: expected a pickled dict, got {type(value).__name__}")
    return value


def _get(batch: Dict[Any, Any], key: str) -> Any:
    # The original pickles are Python 2 str keys, loaded as bytes; accept str keys too.
    return batch[key.encode()] if key.encode() in batch else batch.get(key)


def _decode_batch(batch: Dict[Any, Any], source: str) -> Tuple[np.ndarray, np.ndarray]:
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_LENGTH:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"unexpected content in CIFAR-10 file {source}: 'data' should be uint8 [N, 3072], got {got}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = np.empty(0)
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(f"unexpected content in CIFAR-10 file {source}: expected {data.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DataError(f"unexpected content in CIFAR-10 file {source}: labels outside 0..9")
    return data.reshape(-1, *_IMAGE_SHAPE), labels


def _decode_classes(meta: Dict[Any, Any], source: str) -> List[str]:
    names = _get(meta, "label_names")
    try:
        classes = [name.decode("utf-8") if isinstance(name, bytes) else str(name) for name in names]
    except (TypeError, UnicodeDecodeError):
        classes = []
    if len(classes) != len(CIFAR10_CLASSES):
        raise DataError(f"unexpected content in CIFAR-10 file {source}: expected 10 label_names")
    return classes


def _check_md5(path: Path, name: str) -> None:
    expected = CIFAR10_MD5.get(name)
    if expected is None:
        raise DataError(f"no checksum registered for CIFAR-10 file {name} (splitlbi.data.cifar.CIFAR10_MD5)")
    try:
        actual = file_md5(path)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if actual != expected:
        raise DataError(f"checksum mismatch for {path}: md5 is {actual}, expected {expected}; "
                        f"replace it with the original {name}")


def _read_archive(path: Path, members: Sequence[str]) -> Dict[str, Dict[Any, Any]]:
    """Unpickle ``members`` (names below cifar-10-batches-py/) straight from the tar.gz stream."""
    _check_md5(path, CIFAR10_ARCHIVE)
    wanted = {f"{CIFAR10_FOLDER}/{name}": name for name in members}
    found: Dict[str, Dict[Any, Any]] = {}
    try:
        # "r|gz": one sequential pass, nothing written to disk, no seeking back.
        with tarfile.open(path, mode="r|gz") as archive:
            for member in archive:
                name = wanted.get(posixpath.normpath(member.name))
                if name is None or name in found or not member.isfile():
                    continue
                stream = archive.extractfile(member)
                assert stream is not None  # a regular file
                found[name] = _unpickle(io.BufferedReader(stream), f"{path}:{member.name}")
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"corrupt archive {path}: {exc}; replace it with the original {CIFAR10_ARCHIVE}") from exc
    missing = [name for name in members if name not in found]
    if missing:
        raise DataError(f"archive {path} lacks {', '.join(f'{CIFAR10_FOLDER}/{name}' for name in missing)}; "
                        f"replace it with the original {CIFAR10_ARCHIVE}")
    return found


def _read_folder(folder: Path, members: Sequence[str]) -> Dict[str, Dict[Any, Any]]:
    missing = [name for name in members if not (folder / name).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}; put the original files there, "
                        f"or the archive {CIFAR10_ARCHIVE} in {folder.parent}/")
    found = {}
    for name in members:
        path = folder / name
        _check_md5(path, name)  # before unpickling anything
        with open(path, "rb") as handle:
            found[name] = _unpickle(handle, str(path))
    return found


def _locate(root: Path, download: bool) -> Tuple[str, Path]:
    """``("archive", path)`` or ``("folder", path)``, downloading the archive if allowed."""
    if root.exists() and not root.is_dir():
        raise DataError(f"data directory {root} is a file; expected a directory holding cifar10/{CIFAR10_ARCHIVE}")
    target = root / "cifar10" / CIFAR10_ARCHIVE
    for archive in (target, root / CIFAR10_ARCHIVE):
        if archive.is_file():
            return "archive", archive
    for folder in (root / CIFAR10_FOLDER, root / "cifar10" / CIFAR10_FOLDER):
        if folder.is_dir():
            return "folder", folder
    problem = offline_reason(download)
    if problem is None:
        try:
            return "archive", download_file(CIFAR10_URLS, target, CIFAR10_MD5[CIFAR10_ARCHIVE], checksum="file")
        except DataError as exc:
            problem = str(exc)
    raise DataError(f"cifar10: missing {CIFAR10_ARCHIVE}: put the original archive ({CIFAR10_URLS[0]}) in "
                    f"{target.parent}/ or {root}/, or its extracted {CIFAR10_FOLDER}/ folder in {root}/ ({problem})")


def load_cifar10_arrays(
    root: Path, *, test_only: bool = False, download: bool = True
) -> Tuple[Optional[Tuple[torch.Tensor, torch.Tensor]], Tuple[torch.Tensor, torch.Tensor], List[str], str]:
    """Read CIFAR-10 below the data directory ``root``.

    Returns ``(train, test, classes, source)``: ``train`` and ``test`` are
    ``(uint8 images [N, 3, 32, 32], int64 labels [N])`` (``train`` is ``None`` when
    ``test_only``), ``classes`` the names from batches.meta, ``source`` the archive or
    folder read. Raises :class:`DataError` for missing, corrupt or unexpected files.
    """
    kind, path = _locate(root, download)
    members = [CIFAR10_META_FILE, CIFAR10_TEST_FILE] + ([] if test_only else list(CIFAR10_TRAIN_FILES))
    pickles = _read_archive(path, members) if kind == "archive" else _read_folder(path, members)
    classes = _decode_classes(pickles[CIFAR10_META_FILE], f"{path}:{CIFAR10_META_FILE}")

    def split(names: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        parts = [_decode_batch(pickles.pop(name), f"{path}:{name}") for name in names]
        # concatenate copies into one fresh, writable array (unpickled arrays may be read-only views).
        images = np.concatenate([images for images, _ in parts])
        labels = np.concatenate([labels for _, labels in parts])
        return torch.from_numpy(images), torch.from_numpy(labels)

    test = split([CIFAR10_TEST_FILE])
    train = None if test_only else split(CIFAR10_TRAIN_FILES)
    return train, test, classes, str(path)
