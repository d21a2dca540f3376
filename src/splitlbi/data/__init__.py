"""Datasets as uint8 tensors (MNIST, Fashion-MNIST, scikit-learn digits) and normalization.

>>> from splitlbi.data import load_dataset, normalize
>>> splits = load_dataset("digits")
>>> x = normalize(splits.train.images[:8], splits.mean, splits.std)  # float32 [8, 1, 28, 28]
"""

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

__all__ = [
    "DATA_DIR_ENV",
    "OFFLINE_ENV",
    "DatasetSplits",
    "Split",
    "available_datasets",
    "canonical_dataset_name",
    "channel_stats",
    "encode_idx",
    "load_dataset",
    "normalize",
    "parse_idx",
    "read_idx",
    "resolve_data_dir",
]
