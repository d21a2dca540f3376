"""One epoch of training and one evaluation pass over in-memory image tensors.

The whole dataset lives on the training device as uint8 ``[N, C, H, W]``; each batch is
converted to float and normalized on the fly, so no DataLoader (and no worker RNG) is
involved and an epoch is fully determined by the permutation generator.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from splitlbi.data import normalize
from splitlbi.errors import SplitLBIError

__all__ = ["Evaluation", "NONFINITE_POLICIES", "NonFiniteError", "epoch_generator", "train_one_epoch", "evaluate"]

#: What :func:`train_one_epoch` does about a batch whose loss is nan or inf: ``stop``
#: (raise :class:`NonFiniteError` at the end of the epoch: one synchronisation, as
#: now), ``skip`` (leave that batch out, no step, as ``torch.amp.GradScaler`` does: one
#: synchronisation per batch) or ``ignore`` (no check at all).
NONFINITE_POLICIES = ("stop", "skip", "ignore")

LossFunction = Callable[[Tensor, Tensor], Tensor]


class Evaluation(NamedTuple):
    """Mean loss per sample and accuracy in percent (training: and batches skipped as non-finite)."""

    loss: float
    accuracy: float
    skipped: int = 0


class NonFiniteError(SplitLBIError):
    """Training produced a non-finite loss or non-finite weights; ``step`` is the first bad
    step of the epoch (1-based; ``None`` when only the weights were found non-finite)."""

    def __init__(self, message: str, step: Optional[int] = None) -> None:
        super().__init__(message)
        self.step = step


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
    shard: Optional[Tuple[int, int]] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    memory_format: Optional[torch.memory_format] = None,
    nonfinite: str = "stop",
) -> Evaluation:
    """Train ``model`` for one pass over ``images`` (uint8 ``[N, C, H, W]``) in shuffled batches.

    Args:
        generator: CPU generator for the shuffle (see :func:`epoch_generator`); the global
            torch RNG when ``None``.
        transform: optional augmentation applied to each normalized float batch.
        progress: show a tqdm bar on stderr (``None``: only on a terminal).
        shard: ``(rank, world_size)`` in a DistributedDataParallel run (``model`` is the
            DDP wrapper, every rank passes the same ``generator``): ``batch_size`` is
            per process and rank ``r``'s k-th batch is ``order[k·G + r·B : k·G + (r+1)·B]``
            with ``G = B·world_size``, so the ranks' k-th batches together are the k-th
            batch of one process with ``batch_size=G``. The ragged last batch of ``n < G``
            images is split as evenly as possible and each rank's mean loss weighted by
            ``n_r·world_size/n``, so the gradient DDP averages is that batch's mean
            gradient, as in one process (a rank left without images, ``n < world_size``,
            runs one image with weight 0). ``transform`` is applied to the whole global
            batch before slicing, so augmentation draws the same as in one process.
            The returned loss and accuracy are over all ranks' images.
        autocast_dtype: run forward and loss under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` for ``--amp``); ``None``: full precision.
        memory_format: convert each input batch (e.g. ``torch.channels_last``).
        nonfinite: one of NONFINITE_POLICIES. ``stop`` and ``skip`` also check, once at
            the end of the epoch, that the parameters are finite.

    Returns:
        The sample-weighted mean training loss and accuracy (percent) over the epoch's
        batches, measured on the fly (before each step), and the number of batches
        skipped (``nonfinite="skip"``).

    Raises:
        NonFiniteError: (``stop``) a batch's loss was nan or inf, naming the first such
            step; (``stop``, ``skip``) the parameters are not finite after the epoch.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    model.train()
    count = images.shape[0]
    rank, world_size = shard if shard is not None else (0, 1)
    global_batch = batch_size * world_size
    order = torch.randperm(count, generator=generator).to(images.device)
    # Sums stay on the device; one synchronisation at the end instead of one per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    seen = 0
    # The first step (1-based) with a non-finite loss, kept on the device: no sync per step.
    first_bad_step = torch.zeros((), dtype=torch.int64, device=images.device)
    skipped = skipped_images = 0
    with _progress_bar((count + global_batch - 1) // global_batch, description, progress) as bar:
        for step, start in enumerate(range(0, count, global_batch), start=1):
            batch = order[start:start + global_batch]
            size = batch.shape[0]
            low, high = _shard_bounds(size, rank, world_size)
            weight = 1.0 if (high - low) * world_size == size else (high - low) * world_size / size
            if high == low:  # n < world_size: stay in step with the others, contribute nothing
                low, high, weight = 0, 1, 0.0
            if transform is not None:
                inputs = transform(normalize(images[batch], mean, std))[low:high]
            else:
                inputs = normalize(images[batch[low:high]], mean, std)
            if memory_format is not None and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=memory_format)
            targets = labels[batch[low:high]]
            optimizer.zero_grad(set_to_none=True)
            with _autocast(inputs.device, autocast_dtype):
                logits = model(inputs)
                loss = loss_function(logits, targets)
            if nonfinite == "skip" and not _finite_everywhere(loss, world_size):
                skipped += 1
                skipped_images += size
                bar.update(1)
                continue
            if nonfinite == "stop":
                bad = (first_bad_step == 0) & ~torch.isfinite(loss.detach())
                first_bad_step = torch.where(bad, step, first_bad_step)
            (loss if weight == 1.0 else loss * weight).backward()
            optimizer.step()
            if weight != 0.0:
                loss_sum += loss.detach().double() * targets.shape[0]
                correct += (logits.detach().argmax(dim=1) == targets).sum()
                seen += targets.shape[0]
            bar.update(1)
            if not bar.disable and (bar.n % 20 == 0 or bar.n == bar.total) and seen:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100.0 * correct.item() / seen:.2f}%")
    loss_sum, correct = _sum_over_ranks(loss_sum, correct, world_size)
    if nonfinite != "ignore":
        _check_finite(model, int(first_bad_step), loss_sum, step if count else 0, description)
    trained = count - skipped_images
    if trained <= 0:
        return Evaluation(float("nan"), float("nan"), skipped)
    return Evaluation(loss_sum / trained, 100.0 * correct / trained, skipped)


def _finite_everywhere(loss: Tensor, world_size: int) -> bool:
    """Whether the loss is finite on every rank (one synchronisation; an all-reduce under DDP,
    so that every rank skips the same batches and the gradient all-reduce stays in step)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _check_finite(model: nn.Module, first_bad_step: int, loss_sum: float, steps: int,
                  description: Optional[str]) -> None:
    where = f"{description}, " if description else ""
    if first_bad_step > 0:
        raise NonFiniteError(f"{where}step {first_bad_step} of {steps}: the training loss is not finite (nan or inf)",
                             first_bad_step)
    if not math.isfinite(loss_sum):  # another rank's loss (DDP): the summed loss is not finite
        raise NonFiniteError(f"{where}the training loss is not finite (nan or inf) on another process")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not bool(torch.isfinite(parameter).all()):
                raise NonFiniteError(f"{where}after step {steps}: parameter {name} is not finite (nan or inf)")


def _shard_bounds(count: int, rank: int, world_size: int) -> Tuple[int, int]:
    # Same as splitlbi.train.distributed.shard_bounds (kept here to avoid an import cycle).
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _sum_over_ranks(loss_sum: Tensor, correct: Tensor, world_size: int) -> Tuple[float, int]:
    """The two per-rank sums added over all ranks (one all-reduce), as Python numbers."""
    if world_size > 1:
        both = torch.stack([loss_sum, correct.double()])
        dist.all_reduce(both)
        return both[0].item(), int(round(both[1].item()))
    return loss_sum.item(), int(correct.item())


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
    shard: Optional[Tuple[int, int]] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    memory_format: Optional[torch.memory_format] = None,
) -> Evaluation:
    """Mean loss and accuracy (percent) of ``model`` in eval mode on uint8 ``images``.

    The model is left in eval mode; :func:`train_one_epoch` switches it back to train.
    With ``shard=(rank, world_size)`` (every rank calls it, with the same weights) each
    rank evaluates its contiguous share of the images and the results are summed over
    the ranks: the whole set's loss and accuracy, on every rank. ``autocast_dtype`` and
    ``memory_format`` act as in :func:`train_one_epoch`.
    """
    model.eval()
    total = images.shape[0]
    if total == 0:
        return Evaluation(float("nan"), float("nan"))
    rank, world_size = shard if shard is not None else (0, 1)
    low, high = _shard_bounds(total, rank, world_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for start in range(low, high, batch_size):
        stop = min(start + batch_size, high)
        inputs = normalize(images[start:stop], mean, std)
        if memory_format is not None and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=memory_format)
        targets = labels[start:stop]
        with _autocast(inputs.device, autocast_dtype):
            logits = model(inputs)
            # Mean loss per batch times its size, like training, so a custom loss_function
            # only needs the standard mean reduction.
            loss_sum += loss_function(logits, targets).double() * targets.shape[0]
        correct += (logits.argmax(dim=1) == targets).sum()
    loss, right = _sum_over_ranks(loss_sum, correct, world_size)
    return Evaluation(loss / total, 100.0 * right / total)
