"""Datasets as uint8 tensors (MNIST, Fashion-MNIST, CIFAR-10, scikit-learn digits), normalization,
on-device augmentation, and DataLoaders for ImageNet-style image folders.

>>> from splitlbi.data import load_dataset, normalize, random_crop_flip
>>> splits = load_dataset("digits")
>>> x = normalize(splits.train.images[:8], splits.mean, splits.std)  # float32 [8, 1, 28, 28]
>>> y = random_crop_flip(splits.train.images[:8])  # uint8 [8, 1, 28, 28], padded by 4 and cropped
"""

from splitlbi.data.augment import AUGMENTATIONS, augment_generator, random_crop_flip, train_transform
from splitlbi.data.datasets import (
    DATA_DIR_ENV,
    DatasetSplits,
    Split,
    available_datasets,
    canonical_dataset_name,
    channel_stats,
    load_dataset,
    normalize,
    resolve_data_dir,
)
from splitlbi.data.download import OFFLINE_ENV
from splitlbi.data.idx import encode_idx, parse_idx, read_idx
from splitlbi.data.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    ImageFolderLoaders,
    make_imagenet_loaders,
)

__all__ = [
    "AUGMENTATIONS",
    "DATA_DIR_ENV",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFLINE_ENV",
    "DatasetSplits",
    "ImageFolderDataset",
    "ImageFolderLoaders",
    "Split",
    "augment_generator",
    "available_datasets",
    "canonical_dataset_name",
    "channel_stats",
    "encode_idx",
    "load_dataset",
    "make_imagenet_loaders",
    "normalize",
    "parse_idx",
    "random_crop_flip",
    "read_idx",
    "resolve_data_dir",
    "train_transform",
]
