"""Batched data augmentation on the images' device: the standard CIFAR crop + flip.

:func:`random_crop_flip` zero-pads a batch by ``padding`` pixels, takes a random crop
of the original size from each image and mirrors each image left-right with
probability 1/2, all with one gather on the batch's device (no per-image Python loop).
The random offsets and flips are drawn from a ``torch.Generator`` (on its device: a
CPU generator draws on the CPU and the few indices move to the images' device), so a
batch's augmentation is reproducible on any device.

Training applies it through :func:`train_transform`, which acts on the *normalized*
float batch that ``train_one_epoch`` hands to its ``transform``: the padding then takes
the normalized value of a black pixel, so the result is bitwise what cropping the
uint8 images and normalizing afterwards gives.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["AUGMENTATIONS", "random_crop_flip", "augment_generator", "train_transform"]

#: Names accepted by ``TrainConfig.augment`` / ``splitlbi train --augment``.
AUGMENTATIONS: Tuple[str, ...] = ("none", "crop-flip")


def _draw(generator: Optional[torch.Generator], count: int, padding: int, flip: bool) -> Tuple[Tensor, Tensor, Tensor]:
    device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (count, 2), generator=generator, device=device)
    if flip:
        flips = torch.randint(0, 2, (count,), generator=generator, device=device).bool()
    else:
        flips = torch.zeros(count, dtype=torch.bool, device=device)
    return offsets[:, 0], offsets[:, 1], flips


def random_crop_flip(
    images: Tensor,
    padding: int = 4,
    generator: Optional[torch.Generator] = None,
    *,
    flip: bool = True,
    fill: Union[float, Sequence[float], Tensor] = 0,
    return_params: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Random ``H x W`` crops of the ``padding``-padded images, mirrored with probability 1/2.

    torchvision's ``RandomCrop(size, padding=4)`` + ``RandomHorizontalFlip()``, batched:
    for each image an offset ``(top, left)`` in ``[0, 2 padding]²`` and a flip are drawn
    (uniformly, from ``generator``; the global CPU RNG when ``None``), and the output
    pixel ``(i, j)`` is the padded input's ``(top + i, left + j)``, or
    ``(top + i, left + W - 1 - j)`` when flipped.

    Args:
        images: ``[B, C, H, W]`` of any dtype (uint8 for raw images), on any device.
        padding: pixels of padding on each side; 0 gives flips only.
        generator: source of the random draws; on its own device (usually the CPU).
        flip: also mirror left-right with probability 1/2.
        fill: the padding value, a scalar or one per channel (0: black for uint8).
        return_params: also return the drawn ``top``, ``left`` (int64 ``[B]``) and
            ``flipped`` (bool ``[B]``), on the generator's device.

    Returns:
        A new tensor with the dtype, shape and device of ``images``.
    """
    if images.dim() != 4:
        raise ValueError(f"random_crop_flip expects images [B, C, H, W], got shape {tuple(images.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    padding = int(padding)
    batch, channels, height, width = images.shape
    top, left, flipped = _draw(generator, batch, padding, flip)
    device = images.device
    padded_height, padded_width = height + 2 * padding, width + 2 * padding
    # Pad once: fill the whole padded batch with the fill value, copy the images in.
    fill_tensor = torch.as_tensor(fill, dtype=images.dtype, device=device).reshape(-1)
    if fill_tensor.numel() not in (1, channels):
        raise ValueError(f"fill must be a scalar or one value per channel ({channels}), got {fill_tensor.numel()}")
    padded = fill_tensor.view(1, -1, 1, 1).expand(batch, channels, padded_height, padded_width).clone()
    padded[:, :, padding:padding + height, padding:padding + width] = images
    # One gather over the flattened padded image: source row top + i, column left + j
    # (or left + W - 1 - j for flipped images, which folds the flip into the same gather).
    rows = top.to(device).view(-1, 1) + torch.arange(height, device=device)  # [B, H]
    columns = torch.arange(width, device=device)
    columns = torch.where(flipped.to(device).view(-1, 1), width - 1 - columns, columns)  # [B, W]
    columns = left.to(device).view(-1, 1) + columns
    index = (rows.view(batch, height, 1) * padded_width + columns.view(batch, 1, width)).view(batch, 1, -1)
    output = padded.view(batch, channels, -1).gather(2, index.expand(batch, channels, -1))
    output = output.view(batch, channels, height, width)
    if return_params:
        return output, top, left, flipped
    return output


def augment_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for epoch ``epoch``'s augmentation, depending only on ``(seed, epoch)``.

    Its stream is independent of the shuffle generator of the same epoch
    (``splitlbi.train.epoch_generator``), and a resumed run redraws the same crops.
    """
    state = np.random.SeedSequence([seed, epoch, 0x617567]).generate_state(2, dtype=np.uint32)  # "aug"
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def train_transform(
    name: str,
    mean: Sequence[float],
    std: Sequence[float],
    generator: Optional[torch.Generator] = None,
    *,
    padding: int = 4,
) -> Optional[Callable[[Tensor], Tensor]]:
    """The ``transform`` for ``train_one_epoch`` that applies augmentation ``name``.

    ``train_one_epoch`` calls its transform on each *normalized* float batch; for
    ``"crop-flip"`` the padding is therefore the normalized value of a black pixel,
    so that ``transform(normalize(x)) == normalize(random_crop_flip(x))`` bitwise for
    uint8 ``x`` drawing from the same generator. ``"none"`` gives ``None``.
    """
    if name == "none":
        return None
    if name != "crop-flip":
        raise ValueError(f"unknown augmentation {name!r} (choose from {', '.join(AUGMENTATIONS)})")
    from splitlbi.data.datasets import normalize  # the same arithmetic as the batches get

    black = normalize(torch.zeros(1, len(mean), 1, 1, dtype=torch.uint8), mean, std).view(-1)
    fills = {}

    def crop_flip(batch: Tensor) -> Tensor:
        key = (batch.device, batch.dtype)
        if key not in fills:
            fills[key] = black.to(device=batch.device, dtype=batch.dtype)
        return random_crop_flip(batch, padding, generator, fill=fills[key])

    return crop_flip
