"""One epoch of training and one evaluation pass over in-memory image tensors.

The whole dataset lives on the training device as uint8 ``[N, C, H, W]``; each batch is
converted to float and normalized on the fly, so no DataLoader (and no worker RNG) is
involved and an epoch is fully determined by the permutation generator.
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from splitlbi.data import normalize

__all__ = ["Evaluation", "epoch_generator", "train_one_epoch", "evaluate"]

LossFunction = Callable[[Tensor, Tensor], Tensor]


class Evaluation(NamedTuple):
    """Mean loss per sample and accuracy in percent."""

    loss: float
    accuracy: float


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, epoch)``: epoch ``k`` shuffles the same
    way whether the run got there in one go or was resumed."""
    # SeedSequence mixes the pair properly, so nearby (seed, epoch) pairs share no streams.
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def _progress_bar(total: int, description: Optional[str], progress: Optional[bool]) -> tqdm:
    # progress=None follows tqdm: shown on a terminal, hidden when stderr is a file or pipe.
    return tqdm(total=total, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=True if progress is False else None, unit="batch")


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    generator: Optional[torch.Generator] = None,
    loss_function: LossFunction = F.cross_entropy,
    transform: Optional[Callable[[Tensor], Tensor]] = None,
    progress: Optional[bool] = None,
    description: Optional[str] = None,
) -> Evaluation:
    """Train ``model`` for one pass over ``images`` (uint8 ``[N, C, H, W]``) in shuffled batches.

    Args:
        generator: CPU generator for the shuffle (see :func:`epoch_generator`); the global
            torch RNG when ``None``.
        transform: optional augmentation applied to each normalized float batch.
        progress: show a tqdm bar on stderr (``None``: only on a terminal).

    Returns:
        The sample-weighted mean training loss and accuracy (percent) over the epoch's
        batches, measured on the fly (before each step).
    """
    model.train()
    count = images.shape[0]
    order = torch.randperm(count, generator=generator).to(images.device)
    # Sums stay on the device; one synchronisation at the end instead of one per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    with _progress_bar((count + batch_size - 1) // batch_size, description, progress) as bar:
        for start in range(0, count, batch_size):
            indices = order[start:start + batch_size]
            inputs = normalize(images[indices], mean, std)
            if transform is not None:
                inputs = transform(inputs)
            targets = labels[indices]
            optimizer.zero_grad(set_to_none=True)
            logits = model(inputs)
            loss = loss_function(logits, targets)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * targets.shape[0]
            correct += (logits.detach().argmax(dim=1) == targets).sum()
            bar.update(1)
            if not bar.disable and (bar.n % 20 == 0 or bar.n == bar.total):
                seen = min(start + batch_size, count)
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100.0 * correct.item() / seen:.2f}%")
    return Evaluation(loss_sum.item() / count, 100.0 * correct.item() / count)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 1000,
    mean: Sequence[float],
    std: Sequence[float],
    loss_function: LossFunction = F.cross_entropy,
) -> Evaluation:
    """Mean loss and accuracy (percent) of ``model`` in eval mode on uint8 ``images``.

    The model is left in eval mode; :func:`train_one_epoch` switches it back to train.
    """
    model.eval()
    count = images.shape[0]
    if count == 0:
        return Evaluation(float("nan"), float("nan"))
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for start in range(0, count, batch_size):
        inputs = normalize(images[start:start + batch_size], mean, std)
        targets = labels[start:start + batch_size]
        logits = model(inputs)
        # Mean loss per batch times its size, like training, so a custom loss_function
        # only needs the standard mean reduction.
        loss_sum += loss_function(logits, targets).double() * targets.shape[0]
        correct += (logits.argmax(dim=1) == targets).sum()
    return Evaluation(loss_sum.item() / count, 100.0 * correct.item() / count)
