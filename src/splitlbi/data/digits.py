"""scikit-learn's bundled handwritten digits as a 28x28 MNIST-like set (no download needed).

``sklearn.datasets.load_digits`` ships 1797 8x8 images with values 0..16 (UCI
"Optical Recognition of Handwritten Digits", test part). We upsample them
bilinearly to 28x28 so MNIST models run on them unchanged, and scale to uint8
0..255. The split is deterministic: the 1797 images are shuffled with
``numpy.random.RandomState(0)`` (whose stream numpy keeps frozen across
versions), the first 1437 train, the remaining 360 test.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DIGITS_IMAGE_SIZE",
    "DIGITS_NUM_IMAGES",
    "DIGITS_TRAIN_SIZE",
    "DIGITS_SEED",
    "load_digits_images",
    "digits_order",
]

DIGITS_IMAGE_SIZE = 28
DIGITS_NUM_IMAGES = 1797
DIGITS_TRAIN_SIZE = 1437
DIGITS_SEED = 0
_DIGITS_MAX_VALUE = 16.0


def load_digits_images(image_size: int = DIGITS_IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits in sklearn's order: uint8 images ``[1797, 1, S, S]``, int64 labels ``[1797]``."""
    from sklearn.datasets import load_digits  # lazy: importing sklearn takes about a second

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / _DIGITS_MAX_VALUE
    resized = F.interpolate(small, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (resized * 255.0).round().clamp_(0, 255).to(torch.uint8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images, labels


def digits_order() -> torch.Tensor:
    """The fixed shuffle of the 1797 digits (int64 indices); train = first 1437."""
    return torch.from_numpy(np.random.RandomState(DIGITS_SEED).permutation(DIGITS_NUM_IMAGES).astype(np.int64))
