"""ImageNet-style image folders, decoded in DataLoader workers into uint8 tensors.

Layout (the usual one for ImageNet-2012; its validation images must first be sorted
into one folder per class, e.g. with the common ``valprep.sh``)::

    root/train/<class>/*.JPEG|*.jpg|*.jpeg|*.png     (subfolders are searched too)
    root/val/<class>/...

Classes are the sorted folder names of ``root/train`` (label = index). Unlike the
datasets of :func:`splitlbi.data.load_dataset`, these images do not fit in memory: each
sample is read, decoded and transformed in a DataLoader worker and comes out as a uint8
``[3, S, S]`` tensor. Normalization happens on the training device, as for the other
datasets::

    loaders = make_imagenet_loaders("/data/imagenet", batch_size=256, workers=8)
    for images, labels in loaders.train:
        inputs = normalize(images.to(device, non_blocking=True), IMAGENET_MEAN, IMAGENET_STD)

Transforms (those of the reference PyTorch ImageNet recipe), implemented with Pillow
and torch's RNG (so DataLoader seeding makes them reproducible):

- train: RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3)), bilinear, then a
  horizontal flip with probability 1/2;
- val: resize the shorter side to ``round(S * 256 / 224)`` (256 for S = 224), bilinear,
  then a centre crop of S x S.

Needs Pillow (``pip install pillow``), imported only when images are read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from splitlbi.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "ImageFolderLoaders",
    "make_imagenet_loaders",
    "random_resized_crop_box",
]

#: File name endings (case-insensitive) taken as images.
IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpeg", ".jpg", ".png")
#: The usual ImageNet channel statistics (RGB, in [0, 1] units), for :func:`splitlbi.data.normalize`.
IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

_SPLITS = ("train", "val")


def _pil_image():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataError("reading image folders needs Pillow: pip install pillow") from None
    return Image


def _bilinear(Image):
    return getattr(Image, "Resampling", Image).BILINEAR


def random_resized_crop_box(
    height: int,
    width: int,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: Optional[torch.Generator] = None,
) -> Tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` of a RandomResizedCrop, as torchvision draws it.

    Up to 10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect
    ratio in ``ratio``; if none fits, the largest centred crop with a ratio in range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator).item())
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_height, crop_width = height, int(round(height * max(ratio)))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def _to_tensor(image) -> Tensor:
    """A PIL RGB image -> uint8 ``[3, H, W]``."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def _scan_classes(folder: Path) -> List[str]:
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; expected {folder}/<class>/<image>.JPEG")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {folder} has no class folders; expected {folder}/<class>/<image>.JPEG")
    return classes


def _scan_images(folder: Path) -> List[str]:
    found = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        found.extend(os.path.join(directory, name) for name in sorted(files)
                     if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS))
    return found


class ImageFolderDataset(Dataset):
    """``root/<split>/<class>/<image>`` as ``(uint8 [3, S, S] tensor, int label)`` samples.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        split: ``"train"`` (random resized crop + flip) or ``"val"`` (resize + centre crop).
        image_size: S, the side of the output images (224 for ImageNet).
        classes: the class names, in label order; default the sorted folder names of
            ``root/<split>``. Pass the train set's classes to the val set so labels agree.

    Attributes:
        classes: class names in label order; ``samples``: ``(path, label)`` pairs, sorted.

    Raises:
        DataError: a missing folder, a class folder without images, an unreadable image.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: str = "train",
        image_size: int = 224,
        *,
        classes: Optional[Sequence[str]] = None,
    ) -> None:
        if split not in _SPLITS:
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise DataError(f"image_size must be a positive integer, got {image_size!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder root {self.root} does not exist; expected {self.root}/train/<class>/*.JPEG "
                            f"and {self.root}/val/<class>/*.JPEG")
        self.split = split
        self.image_size = image_size
        self.resize_size = int(round(image_size * 256 / 224))
        folder = self.root / split
        found_classes = _scan_classes(folder)
        self.classes = list(classes) if classes is not None else found_classes
        if classes is not None and sorted(set(found_classes) - set(self.classes)):
            extra = sorted(set(found_classes) - set(self.classes))
            raise DataError(f"{folder} has class folders that the train set lacks: {', '.join(extra[:5])}")
        self.class_to_index = {name: index for index, name in enumerate(self.classes)}
        samples: List[Tuple[str, int]] = []
        for name in found_classes:
            images = _scan_images(folder / name)
            if not images:
                raise DataError(f"class folder {folder / name} holds no images "
                                f"({', '.join('*' + ext for ext in IMAGE_EXTENSIONS)})")
            samples.extend((path, self.class_to_index[name]) for path in images)
        self.samples = samples
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int):
        """The sample's image as a PIL RGB image."""
        path = self.samples[index][0]
        Image = _pil_image()
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None

    def transform(self, image, generator: Optional[torch.Generator] = None) -> Tensor:
        """The split's transform of a PIL RGB image -> uint8 ``[3, S, S]``."""
        Image = _pil_image()
        size = self.image_size
        if self.split == "train":
            top, left, crop_height, crop_width = random_resized_crop_box(image.height, image.width,
                                                                         generator=generator)
            image = image.resize((size, size), _bilinear(Image), box=(left, top, left + crop_width, top + crop_height))
            tensor = _to_tensor(image)
            if torch.rand(1, generator=generator).item() < 0.5:
                tensor = tensor.flip(-1)
            return tensor
        # val: shorter side -> resize_size (longer side scaled and truncated, as torchvision), centre crop.
        short, long = sorted((image.width, image.height))
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        new_size = (new_short, new_long) if image.width <= image.height else (new_long, new_short)
        if new_size != image.size:
            image = image.resize(new_size, _bilinear(Image))
        top = int(round((image.height - size) / 2.0))
        left = int(round((image.width - size) / 2.0))
        return _to_tensor(image.crop((left, top, left + size, top + size)))

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return self.transform(self.load_image(index)), self.samples[index][1]


class ImageFolderLoaders(NamedTuple):
    """The train and val DataLoaders of an image folder (unpacks as a pair)."""

    train: DataLoader
    val: DataLoader


def make_imagenet_loaders(
    root: Union[str, os.PathLike],
    batch_size: int,
    workers: int,
    distributed: bool = False,
    *,
    image_size: int = 224,
    num_replicas: Optional[int] = None,
    rank: Optional[int] = None,
    seed: int = 0,
    pin_memory: Optional[bool] = None,
) -> ImageFolderLoaders:
    """DataLoaders over ``root/train`` (shuffled, augmented) and ``root/val`` (in order).

    Images are decoded and transformed in ``workers`` worker processes (0: in the main
    process) and arrive as uint8 ``[B, 3, S, S]`` batches with int64 labels; normalize
    them on the device with ``IMAGENET_MEAN`` / ``IMAGENET_STD``.

    Args:
        distributed: use a :class:`DistributedSampler` for both loaders (train shuffled
            with ``seed``, val in order); ``num_replicas``/``rank`` default to those of the
            initialized process group. Call ``loaders.train.sampler.set_epoch(epoch)``
            each epoch, as usual.
        seed: seeds the shuffle and the workers' augmentation RNG.
        pin_memory: default: when CUDA is available.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise DataError(f"workers must be an integer >= 0, got {workers!r}")
    train_set = ImageFolderDataset(root, "train", image_size)
    val_set = ImageFolderDataset(root, "val", image_size, classes=train_set.classes)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    common = dict(batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                  persistent_workers=workers > 0)
    generator = torch.Generator()
    generator.manual_seed(seed)
    if distributed:
        train_sampler = DistributedSampler(train_set, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        val_sampler = DistributedSampler(val_set, num_replicas=num_replicas, rank=rank, shuffle=False)
        train = DataLoader(train_set, sampler=train_sampler, generator=generator, **common)
        val = DataLoader(val_set, sampler=val_sampler, **common)
    else:
        train = DataLoader(train_set, shuffle=True, generator=generator, **common)
        val = DataLoader(val_set, shuffle=False, **common)
    return ImageFolderLoaders(train, val)
