"""Image classification datasets as uint8 tensors: MNIST, Fashion-MNIST, CIFAR-10, digits.

Where the files are looked for, for a data directory ``<dir>`` (see
:func:`resolve_data_dir`), in this order:

- MNIST: ``<dir>/mnist/raw/``, ``<dir>/MNIST/raw/`` (torchvision's layout);
- Fashion-MNIST: ``<dir>/fashion-mnist/raw/``, ``<dir>/FashionMNIST/raw/``, then
  ``/usr/share/datasets/fashion-mnist/`` (Debian's ``dataset-fashion-mnist``);
- CIFAR-10: ``<dir>/cifar10/cifar-10-python.tar.gz``, ``<dir>/cifar-10-python.tar.gz``,
  then the extracted ``<dir>/cifar-10-batches-py/`` (see :mod:`splitlbi.data.cifar`).

Each IDX file may be the original ``<name>.gz`` or its decompressed ``<name>``; its
decompressed content must have the official md5. Missing files are downloaded
into the first folder of the list unless downloads are disabled.

ImageNet-style image folders are too large for memory and are read by DataLoaders
instead: see :mod:`splitlbi.data.imagefolder`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from splitlbi.data.cifar import load_cifar10_arrays
from splitlbi.data.digits import DIGITS_NUM_IMAGES, DIGITS_TRAIN_SIZE, digits_order, load_digits_images
from splitlbi.data.download import download_file, offline_reason
from splitlbi.data.idx import read_idx
from splitlbi.errors import DataError

__all__ = [
    "DATA_DIR_ENV",
    "Split",
    "DatasetSplits",
    "available_datasets",
    "canonical_dataset_name",
    "resolve_data_dir",
    "load_dataset",
    "channel_stats",
    "normalize",
]

#: Environment variable naming the data directory when no ``data_dir`` is given.
DATA_DIR_ENV = "SPLITLBI_DATA"


@dataclass(frozen=True)
class Split:
    """One part of a dataset: uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test parts with what a trainer needs to know about them.

    ``mean``/``std`` are per-channel statistics of the train images in [0, 1]
    units, computed before any ``pad_to`` padding (so they are the usual
    constants, e.g. 0.2860/0.3530 for Fashion-MNIST). ``description`` says how the
    split was made; report it next to any number obtained on it.
    """

    name: str
    classes: list[str]
    train: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


@dataclass(frozen=True)
class _IdxSource:
    """Where and how to find one IDX dataset."""

    name: str
    title: str
    dir_names: tuple[str, ...]  # below the data dir; the first one receives downloads
    system_dirs: tuple[Path, ...]
    mirrors: tuple[str, ...]
    files: dict[str, tuple[str, str]]  # part -> (images file, labels file), without ".gz"
    md5: dict[str, str]  # file -> md5 of its decompressed content
    classes: tuple[str, ...]


_TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

_MNIST = _IdxSource(
    name="mnist",
    title="MNIST",
    dir_names=("mnist/raw", "MNIST/raw"),
    system_dirs=(),
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    files={"train": _TRAIN_FILES, "test": _TEST_FILES},
    md5={
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    classes=tuple(str(digit) for digit in range(10)),
)

_FASHION_MNIST = _IdxSource(
    name="fashion-mnist",
    title="Fashion-MNIST",
    dir_names=("fashion-mnist/raw", "FashionMNIST/raw"),
    system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    files={"train": _TRAIN_FILES, "test": _TEST_FILES},
    md5={
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)

_IDX_SOURCES = {source.name: source for source in (_MNIST, _FASHION_MNIST)}
_DIGITS = "digits"
_CIFAR10 = "cifar10"
_DIGITS_CLASSES = tuple(str(digit) for digit in range(10))

_ALIASES = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "digits": _DIGITS,
    "cifar10": _CIFAR10,
    "cifar-10": _CIFAR10,
    "cifar_10": _CIFAR10,
}


def available_datasets() -> list[str]:
    """Canonical names accepted by :func:`load_dataset`."""
    return sorted(set(_ALIASES.values()))


def canonical_dataset_name(name: str) -> str:
    """Map a dataset name or alias (case-insensitive) to its canonical name."""
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _ALIASES:
        raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(available_datasets())}")
    return _ALIASES[key]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$SPLITLBI_DATA``, else the user cache.

    The user cache is ``$XDG_CACHE_HOME/splitlbi``, or ``~/.cache/splitlbi``.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache_home) if cache_home else Path.home() / ".cache") / "splitlbi"


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images ``[N, C, H, W]``, in [0, 1] units."""
    # A 256-bin histogram per channel gives exact stats without a float copy of the images
    # (60000 Fashion-MNIST images would be 188 MB in float32).
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images ``[..., C, H, W]`` -> float32 ``(x/255 - mean) / std`` per channel, on the images' device."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    if len(mean) != len(std) or len(mean) != images.shape[-3]:
        raise ValueError(f"normalize: {images.shape[-3]} channels but {len(mean)} means and {len(std)} stds")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    # One fused multiply-add per pixel: x * (1 / (255 std)) - mean / std.
    scale, shift = 1.0 / (255.0 * std_t), mean_t / std_t
    return torch.addcmul(-shift, images.to(torch.float32), scale)


def _check_train_split(train_split: int | None) -> None:
    if train_split is None:
        return
    if isinstance(train_split, bool) or not isinstance(train_split, (int, np.integer)) or train_split <= 0:
        raise DataError(f"train_split must be a positive integer number of training images, got {train_split!r}")


def _check_train_split_fits(train_split: int, total: int, what: str) -> None:
    if not 0 < train_split < total:
        raise DataError(f"train_split={train_split} must be between 1 and {total - 1}: {what} has {total} images")


#: The largest ``pad_to``: far above any dataset here (28x28, 32x32), small enough that the
#: padded sizes stay ordinary integers.
MAX_PAD_TO = 4096


def _check_pad_to(pad_to: int | None) -> None:
    if pad_to is None:
        return
    if isinstance(pad_to, bool) or not isinstance(pad_to, (int, np.integer)) or not 0 < pad_to <= MAX_PAD_TO:
        raise DataError(f"pad_to must be an image size from 1 to {MAX_PAD_TO}, got {pad_to!r}")


def _pad_images(images: torch.Tensor, size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    if size < height or size < width:
        raise DataError(f"pad_to={size} is smaller than the images ({height}x{width}); it can only pad")
    top, left = (size - height) // 2, (size - width) // 2
    try:
        return F.pad(images, (left, size - width - left, top, size - height - top))
    except RuntimeError as error:  # the allocator's "can't allocate memory"
        needed = images.shape[0] * images.shape[1] * size * size * images.element_size()
        raise DataError(f"pad_to={size}: the {images.shape[0]} padded images need {needed / 1e9:.1f} GB, more "
                        f"than this machine can allocate ({' '.join(str(error).split())[:120]})") from None


def _split_in_order(split: Split, n_first: int) -> tuple[Split, Split]:
    return (
        Split(split.images[:n_first], split.labels[:n_first]),
        Split(split.images[n_first:], split.labels[n_first:]),
    )


def _find_file(stem: str, search_dirs: Sequence[Path]) -> Path | None:
    for folder in search_dirs:
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    return None


def _locate_files(source: _IdxSource, root: Path, stems: Sequence[str], download: bool, hint: str) -> dict[str, Path]:
    """Path of each file in ``stems``, downloading the missing ones if allowed."""
    if root.exists() and not root.is_dir():
        raise DataError(f"data directory {root} is a file; expected a directory holding {source.dir_names[0]}/")
    search_dirs = [root / name for name in source.dir_names] + list(source.system_dirs)
    target_dir = search_dirs[0]
    found = {stem: _find_file(stem, search_dirs) for stem in stems}
    missing = [stem for stem, path in found.items() if path is None]
    if not missing:
        return found  # type: ignore[return-value]
    problem = offline_reason(download)
    if problem is None:
        for stem in missing:
            urls = [mirror + f"{stem}.gz" for mirror in source.mirrors]
            try:
                found[stem] = download_file(urls, target_dir / f"{stem}.gz", source.md5[stem])
            except DataError as exc:
                problem = str(exc)
                break  # the other files would fail the same way; fail fast
        missing = [stem for stem, path in found.items() if path is None]
        if not missing:
            return found  # type: ignore[return-value]
    names = ", ".join(f"{stem}.gz" for stem in missing)
    raise DataError(f"{source.name}: missing {names}: put the original files in {target_dir}/ ({problem}){hint}")


def _read_split(source: _IdxSource, images_path: Path, labels_path: Path) -> Split:
    images = read_idx(images_path, source.md5.get(_stem(images_path)))
    labels = read_idx(labels_path, source.md5.get(_stem(labels_path)))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"unexpected content in {images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"unexpected content in {labels_path}: expected {images.shape[0]} labels, got shape {labels.shape}"
        )
    if labels.size and int(labels.max()) >= len(source.classes):
        raise DataError(
            f"unexpected content in {labels_path}: label {int(labels.max())} >= {len(source.classes)} classes"
        )
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def _stem(path: Path) -> str:
    return path.name[:-3] if path.name.endswith(".gz") else path.name


def _load_idx_dataset(
    source: _IdxSource, data_dir: str | os.PathLike | None, train_split: int | None, download: bool
) -> tuple[Split, Split, str]:
    root = resolve_data_dir(data_dir)
    test_images, test_labels = source.files["test"]
    if train_split is not None:
        paths = _locate_files(source, root, (test_images, test_labels), download, hint="")
        full_test = _read_split(source, paths[test_images], paths[test_labels])
        _check_train_split_fits(train_split, len(full_test), f"the {source.title} test set")
        train, test = _split_in_order(full_test, train_split)
        description = (
            f"{source.title} official test set split in order: first {len(train)} images train, "
            f"last {len(test)} held out for evaluation"
        )
        return train, test, description
    train_images, train_labels = source.files["train"]
    hint = ""
    if _find_file(test_images, [root / name for name in source.dir_names] + list(source.system_dirs)):
        hint = (
            "; or train on the first N test images and evaluate on the rest "
            "(--train-split N on the command line, train_split=N in Python)"
        )
    paths = _locate_files(source, root, (train_images, train_labels, test_images, test_labels), download, hint)
    train = _read_split(source, paths[train_images], paths[train_labels])
    test = _read_split(source, paths[test_images], paths[test_labels])
    description = f"{source.title} official split: {len(train)} train images, {len(test)} test images"
    return train, test, description


def _load_digits(train_split: int | None) -> tuple[Split, Split, str]:
    n_train = DIGITS_TRAIN_SIZE if train_split is None else train_split
    _check_train_split_fits(n_train, DIGITS_NUM_IMAGES, "scikit-learn's digits set")
    images, labels = load_digits_images()
    order = digits_order()
    train, test = _split_in_order(Split(images[order], labels[order]), n_train)
    description = (
        f"scikit-learn digits (8x8, resized to 28x28), shuffled with seed 0: "
        f"first {len(train)} train, last {len(test)} test"
    )
    return train, test, description


def _load_cifar10(
    data_dir: str | os.PathLike | None, train_split: int | None, download: bool
) -> tuple[Split, Split, str, list[str]]:
    root = resolve_data_dir(data_dir)
    train, test, classes, source = load_cifar10_arrays(root, test_only=train_split is not None, download=download)
    if train_split is not None:
        full_test = Split(*test)
        _check_train_split_fits(train_split, len(full_test), "the CIFAR-10 test set")
        train_part, test_part = _split_in_order(full_test, train_split)
        description = (
            f"CIFAR-10 official test set split in order: first {len(train_part)} images train, "
            f"last {len(test_part)} held out for evaluation"
        )
        return train_part, test_part, description, classes
    train_part, test_part = Split(*train), Split(*test)
    description = f"CIFAR-10 official split: {len(train_part)} train images, {len(test_part)} test images"
    return train_part, test_part, description, classes


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    train_split: int | None = None,
    download: bool = True,
    pad_to: int | None = None,
) -> DatasetSplits:
    """Load a dataset's train and test parts as uint8 tensors.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"`` (also ``"fashion_mnist"``, ``"fashionmnist"``),
            ``"cifar10"`` (also ``"cifar-10"``, ``"cifar_10"``) or ``"digits"``
            (scikit-learn's bundled digits, needs no files).
        data_dir: folder holding ``mnist/raw/``, ``fashion-mnist/raw/`` and
            ``cifar10/cifar-10-python.tar.gz`` (or torchvision's ``MNIST/raw/``,
            ``FashionMNIST/raw/``, ``cifar-10-batches-py/``); default ``$SPLITLBI_DATA``,
            else ``$XDG_CACHE_HOME/splitlbi`` or ``~/.cache/splitlbi``. Ignored for digits.
        train_split: if given, use only the official TEST set: its first ``train_split``
            images train, the rest are held out for evaluation (no train files needed).
            For digits: the first ``train_split`` of the shuffled 1797 images train
            (default 1437).
        download: fetch missing files from public mirrors (also disabled by
            ``SPLITLBI_OFFLINE=1``).
        pad_to: zero-pad the images (centred) to ``pad_to x pad_to``, e.g. 32 for ResNets;
            a no-op for images that already have that size (CIFAR-10 with 32).

    Raises:
        DataError: unknown name, bad argument, or files missing, corrupt or not downloadable.
    """
    canonical = canonical_dataset_name(name)
    _check_train_split(train_split)
    _check_pad_to(pad_to)
    if canonical == _DIGITS:
        train, test, description = _load_digits(train_split)
        classes = _DIGITS_CLASSES
    elif canonical == _CIFAR10:
        train, test, description, classes = _load_cifar10(data_dir, train_split, download)
    else:
        source = _IDX_SOURCES[canonical]
        train, test, description = _load_idx_dataset(source, data_dir, train_split, download)
        classes = source.classes
    mean, std = channel_stats(train.images)
    if pad_to is not None and tuple(train.images.shape[-2:]) != (pad_to, pad_to):
        train = Split(_pad_images(train.images, pad_to), train.labels)
        test = Split(_pad_images(test.images, pad_to), test.labels)
        description += f", zero-padded to {pad_to}x{pad_to}"
    return DatasetSplits(
        name=canonical, classes=list(classes), train=train, test=test, mean=mean, std=std, description=description
    )
