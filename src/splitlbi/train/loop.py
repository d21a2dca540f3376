"""Training epochs over in-memory image tensors: :func:`run_epochs` (the one epoch loop of
``splitlbi train``, retraining and every baseline), :func:`train_one_epoch`, :func:`evaluate`.

The whole dataset lives on the training device as uint8 ``[N, C, H, W]``; each batch is
converted to float and normalized on the fly, so no DataLoader (and no worker RNG) is
involved and an epoch is fully determined by the permutation generator.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from splitlbi.data import normalize
from splitlbi.data.augment import augment_generator, train_transform
from splitlbi.errors import SplitLBIError
from splitlbi.optim import SplitLBI, diagnostics
from splitlbi.train import distributed, rundir
from splitlbi.train.config import TrainConfig
from splitlbi.train.progress import progress_bar

__all__ = ["Evaluation", "NONFINITE_POLICIES", "NonFiniteError", "SparseEvaluation", "TrainData", "EpochCallback",
           "epoch_generator", "evaluate", "evaluate_sparse", "recalibrate_batchnorm", "run_epochs", "summary_line",
           "train_one_epoch"]

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
    with progress_bar(total=(count + global_batch - 1) // global_batch, description=description,
                      enabled=progress) as bar:
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
            if not bar.disable and (bar.n % 20 == 1 or bar.n == bar.total) and seen:
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
    progress: Optional[bool] = False,
    description: Optional[str] = None,
) -> Evaluation:
    """Mean loss and accuracy (percent) of ``model`` in eval mode on uint8 ``images``.

    The model is left in eval mode; :func:`train_one_epoch` switches it back to train.
    With ``shard=(rank, world_size)`` (every rank calls it, with the same weights) each
    rank evaluates its contiguous share of the images and the results are summed over
    the ranks: the whole set's loss and accuracy, on every rank. ``autocast_dtype`` and
    ``memory_format`` act as in :func:`train_one_epoch`; ``progress`` draws a bar over
    the batches on a terminal (default ``False``: evaluation is often a tiny part of a
    caller's work; the training loop turns it on).
    """
    model.eval()
    total = images.shape[0]
    if total == 0:
        return Evaluation(float("nan"), float("nan"))
    rank, world_size = shard if shard is not None else (0, 1)
    low, high = _shard_bounds(total, rank, world_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for start in progress_bar(range(low, high, batch_size), description=description, enabled=progress,
                              unit="batch"):
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


# --------------------------------------------------------------------------- the sparse network


class SparseEvaluation(NamedTuple):
    """Test accuracy of the network compacted from the support of Γ (percent), of the same with
    recalibrated BatchNorm statistics (None without ``recalibrate_bn``), and its MACs over
    the dense network's."""

    accuracy: Optional[float]
    recalibrated_accuracy: Optional[float]
    macs_share: Optional[float]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: Tensor, *, mean: Sequence[float], std: Sequence[float],
                          batch_size: int = 500, memory_format: Optional[torch.memory_format] = None) -> int:
    """Fresh BatchNorm running statistics from ``images`` (uint8 ``[N, C, H, W]``, no
    augmentation) through ``model``, without gradients: every BatchNorm's statistics are reset
    and re-estimated as the plain average over the batches (``momentum=None``). Returns the
    number of BatchNorm layers recalibrated; the model is left in eval mode.

    After filters are removed, the layers that read their channels see other statistics than
    those recorded in training; this brings the network back in line in seconds.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    try:
        for start in range(0, images.shape[0], batch_size):
            inputs = normalize(images[start:start + batch_size], mean, std)
            if memory_format is not None and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=memory_format)
            model(inputs)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()
    return len(norms)


def evaluate_sparse(model: nn.Module, optimizer: SplitLBI, data: "TrainData", recalibrate_images: int,
                    evaluation: Dict[str, Any], description: str = "") -> SparseEvaluation:
    """Evaluate the network that ``splitlbi compact`` builds from the optimizer's support of Γ
    now (:func:`splitlbi.prune.compact.compact_model`: unselected filters removed for real, the
    constants they emitted folded into their consumers), on the test set; with
    ``recalibrate_images`` > 0 also after :func:`recalibrate_batchnorm` on the first that many
    training images. ``evaluation``: the keyword arguments of :func:`evaluate`."""
    from splitlbi.prune.compact import compact_model

    device = data.train_images.device
    example = normalize(data.test_images[:1], data.mean, data.std).cpu()
    masks = optimizer.masks_by_module(model)
    compact, report = compact_model(model, masks, example, measure=False)
    compact = compact.to(device)
    memory_format = evaluation.get("memory_format")
    if memory_format is not None:
        compact = compact.to(memory_format=memory_format)
    where = f"{description} " if description else ""
    accuracy = evaluate(compact, data.test_images, data.test_labels, **evaluation,
                        description=f"{where}sparse test").accuracy
    recalibrated = None
    if recalibrate_images > 0 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in compact.modules()):
        recalibrate_batchnorm(compact, data.train_images[:recalibrate_images], mean=data.mean, std=data.std,
                              memory_format=memory_format)
        recalibrated = evaluate(compact, data.test_images, data.test_labels, **evaluation,
                                description=f"{where}sparse test (BatchNorm recalibrated)").accuracy
    elif recalibrate_images > 0:
        recalibrated = accuracy  # nothing to recalibrate
    macs_share = report.macs_after / report.macs_before if report.macs_before else None
    return SparseEvaluation(accuracy, recalibrated, macs_share)


def _run_masks(model: nn.Module, optimizer: SplitLBI) -> Dict[str, Tensor]:
    """The support of Γ as saved in ``masks/``: the coupled parameters' masks and, for BatchNorm
    scales, the masks of their convs' filters too (what compaction and retraining read)."""
    from splitlbi.prune.channels import filter_masks

    return filter_masks(model, optimizer.masks_by_module(model))


# --------------------------------------------------------------------------- the epoch loop


class TrainData(NamedTuple):
    """A run's images on the training device (uint8 ``[N, C, H, W]``), their labels, the
    normalization, and the dataset facts that config.json records."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: Sequence[float]
    std: Sequence[float]
    facts: Dict[str, Any]


#: ``on_epoch_end(epoch, metrics)``: after an epoch's files and checkpoint are written.
EpochCallback = Callable[[int, Dict[str, Any]], None]


def summary_line(metrics: Dict[str, Any], epochs: int, splitlbi: bool = True) -> str:
    """The one line printed after each epoch (``epoch   3/20  lr 0.1  train loss ...``).

    The sparse model and Γ columns are SplitLBI's (``splitlbi``); a run of another optimizer
    with a fixed mask (retraining, baselines) prints the share of weights its mask keeps."""
    parts = [f"epoch {metrics['epoch']:>3}/{epochs}", f"lr {metrics['lr']:.4g}",
             f"train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:6.2f}%",
             f"test loss {metrics['test_loss']:.4f} acc {metrics['test_acc']:6.2f}%"]
    if not splitlbi:
        if metrics["gamma_nonzero_share"] is not None:
            parts.append(f"mask keeps {100.0 * metrics['gamma_nonzero_share']:6.2f}% of the weights")
    elif metrics["gamma_nonzero_share"] is not None:
        parts.append(f"sparse acc {metrics['sparse_test_acc']:6.2f}%")
        if metrics.get("sparse_recal_test_acc") is not None:
            parts.append(f"(BN recalibrated {metrics['sparse_recal_test_acc']:6.2f}%)")
        if metrics.get("sparse_macs_share") is not None:
            parts.append(f"MACs {100.0 * metrics['sparse_macs_share']:5.1f}%")
        parts.append(f"Gamma non-zeros {100.0 * metrics['gamma_nonzero_share']:6.2f}%")
    parts.append(f"{metrics['epoch_seconds']:.1f}s")
    return "  ".join(parts)


def run_epochs(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data: TrainData,
    config: TrainConfig,
    *,
    start_epoch: int,
    until: Optional[int] = None,
    history: rundir.RunHistory,
    say: Callable[[str], None],
    context: Optional[distributed.DistributedContext] = None,
    train_model: Optional[nn.Module] = None,
    eval_model: Optional[nn.Module] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    memory_format: Optional[torch.memory_format] = None,
    description: str = "",
    kept: Optional[float] = None,
    after_epoch: Optional[Callable[[nn.Module, int], Optional[float]]] = None,
    on_epoch_end: Optional[EpochCallback] = None,
    resumable: bool = True,
    train_epoch: Callable[..., Evaluation] = train_one_epoch,
) -> None:
    """Train epochs ``start_epoch + 1 .. config.epochs`` (or ``.. until``) into the run directory
    ``run_dir``: the one epoch loop of ``splitlbi train``, retraining, every baseline and the
    stages of ``splitlbi grow``.

    Each epoch: one pass of :func:`train_one_epoch` (``config``'s batch size, data order
    and augmentation, seeded by ``(config.seed, epoch)``; ``config.nonfinite``), the test
    set, for SplitLBI the sparse model (the support of Γ), the scheduler's step, then
    :func:`splitlbi.train.rundir.write_epoch` (metrics.csv, path.csv, SplitLBI's masks,
    the checkpoint last), the summary line, TensorBoard and ``on_epoch_end``.

    Args:
        model: the plain module (the optimizer's names, checkpoints, path rows).
        until: stop after this epoch (a stage of a longer run: ``splitlbi grow`` changes the
            network between stages); default ``config.epochs``. The summaries still count
            to ``config.epochs``.
        history: metrics.csv and path.csv so far (rank 0; extended in place, saved in
            every checkpoint).
        context: the torchrun process group (default: one process). Rank 0 alone writes,
            says and calls back; every rank trains its shard, and after each epoch the
            ranks' weights and optimizer state are checked to agree.
        train_model, eval_model: what runs the forward passes (DDP, ``torch.compile``
            wrappers of ``model``); default ``model``.
        autocast_dtype, memory_format: ``--amp`` and ``--channels-last``, see :func:`train_one_epoch`.
        description: put before ``epoch k/n`` on the progress bars (e.g. the retrain mode).
        kept: a mask held fixed by the optimizer (MaskedSGD) keeps this share of the
            masked weights: the ``gamma_nonzero_share`` column, and ``sparse_test_acc`` is
            the test accuracy. ``None``: dense (SplitLBI fills both columns from Γ itself).
        after_epoch: ``after_epoch(model, epoch)`` may change the weights after each
            epoch's training, before evaluation, and returns the share its masks keep
            (Soft Filter Pruning), which replaces ``kept``.
        on_epoch_end: ``on_epoch_end(epoch, metrics)`` after the epoch's checkpoint is written.
        resumable: the run can be resumed (``splitlbi train``): a non-finite loss's
            message suggests ``--nonfinite skip`` on resume.
        train_epoch: the function that trains one epoch (:func:`train_one_epoch`).

    Raises:
        SplitLBIError: the training loss or the weights (or the test loss) stopped being
            finite; ``checkpoints/last.pt`` keeps the last good epoch.
    """
    context = context if context is not None else distributed.DistributedContext()
    train_model = train_model if train_model is not None else model
    eval_model = eval_model if eval_model is not None else model
    # The structure parameter Γ exists only under SplitLBI; other optimizers leave its columns empty.
    lbi = optimizer if isinstance(optimizer, SplitLBI) else None
    label = f"{description} " if description else ""
    advice = "lower --lr or --kappa" if lbi is not None or resumable else "lower --lr"
    # Bars on rank 0's terminal only (config.progress False: --no-progress).
    show_progress = None if config.progress and context.is_main else False
    board = None
    if config.tensorboard and context.is_main:
        from splitlbi.train.tensorboard import TENSORBOARD_DIR, TensorBoardLogger

        board = TensorBoardLogger(Path(run_dir) / TENSORBOARD_DIR)
    evaluation = dict(batch_size=config.eval_batch_size, mean=data.mean, std=data.std, shard=context.shard,
                      autocast_dtype=autocast_dtype, memory_format=memory_format, progress=show_progress)
    last = rundir.CHECKPOINT_DIR + "/" + rundir.LAST_CHECKPOINT
    if lbi is not None and start_epoch == 0 and context.is_main:
        # Before the first step: is the run long enough for ν at all (docs: "ν depends on the number of steps")?
        batches = math.ceil(data.train_images.shape[0] / (config.batch_size * context.world_size))
        diagnostics.warn_once(lbi, "steps", diagnostics.steps_message(lbi, config.epochs * batches), stacklevel=2)
    for epoch in range(start_epoch + 1, (config.epochs if until is None else until) + 1):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        where = f"{label}epoch {epoch}/{config.epochs}"
        try:
            train = train_epoch(train_model, optimizer, data.train_images, data.train_labels,
                                batch_size=config.batch_size, mean=data.mean, std=data.std,
                                generator=epoch_generator(config.seed, epoch),
                                transform=train_transform(config.augment, data.mean, data.std,
                                                          augment_generator(config.seed, epoch)),
                                progress=show_progress, description=where, shard=context.shard,
                                autocast_dtype=autocast_dtype, memory_format=memory_format,
                                nonfinite=config.nonfinite)
        except NonFiniteError as error:
            # Nothing of this epoch was written: last.pt still holds the last good epoch.
            skip = ", or resume with --nonfinite skip to leave such batches out" if resumable else ""
            raise SplitLBIError(f"training stopped at {error}; {last} keeps epoch {epoch - 1}, the last good "
                                f"one ({advice}{skip})") from None
        except RuntimeError as error:
            if "overflow" not in str(error):
                raise
            # A step size beyond float32 (lr 1e300, or a product of large settings): as good as a nan.
            raise SplitLBIError(f"training stopped at {where}: a step size overflows float32 "
                                f"({' '.join(str(error).split())}); {last} keeps epoch {epoch - 1}, the last good "
                                f"one ({advice})") from None
        if train.skipped:
            say(f"warning: {label}epoch {epoch}: skipped {train.skipped} batch(es) whose loss was not finite")
        if after_epoch is not None:
            kept = after_epoch(model, epoch)
        distributed.broadcast_buffers(context, model)
        # Every rank evaluates its share of the test set; the results are summed over ranks.
        test = evaluate(eval_model, data.test_images, data.test_labels, **evaluation, description=f"{where} test")
        if not math.isfinite(test.loss) and data.test_images.shape[0] > 0:
            # Finite weights whose outputs overflow: the run has diverged all the same.
            raise SplitLBIError(f"training stopped at {where}, after its last step: the test loss is not finite "
                                f"(nan or inf); {last} keeps epoch {epoch - 1}, the last good one ({advice})")
        sparse_accuracy, nonzero_share = (test.accuracy, kept) if kept is not None else (None, None)
        sparse = SparseEvaluation(None, None, None)
        if lbi is not None:
            sparse = evaluate_sparse(model, lbi, data, config.recalibrate_bn, evaluation, description=where)
            sparse_accuracy = sparse.accuracy
            nonzero_share = float(lbi.nonzero_share().overall)
        scheduler.step()
        metrics = {"epoch": epoch, "lr": lr, "train_loss": train.loss, "train_acc": train.accuracy,
                   "test_loss": test.loss, "test_acc": test.accuracy, "sparse_test_acc": sparse_accuracy,
                   "gamma_nonzero_share": nonzero_share, "epoch_seconds": time.perf_counter() - started,
                   "sparse_recal_test_acc": sparse.recalibrated_accuracy, "sparse_macs_share": sparse.macs_share}

        # DDP averages the gradients; SplitLBI's V and Γ are functions of them and of
        # state that started equal, so the ranks agree with no communication of their own.
        # Checked once per epoch (cheap); a difference would mean a non-deterministic op.
        diverged = distributed.check_in_sync(context, model, optimizer)
        if diverged:
            say(f"warning: after epoch {epoch} the processes differ in {len(diverged)} tensor(s) "
                f"({', '.join(diverged[:3])}); continuing from rank 0's values")
            distributed.resynchronize(context, model, optimizer)
        rng_states = distributed.all_gather_objects(context, rundir.rng_state())

        with distributed.agreement(context):
            if context.is_main:
                rundir.write_epoch(run_dir, history, metrics, model, optimizer, scheduler, rng_states,
                                   masks=_run_masks(model, lbi) if lbi is not None else None,
                                   keep=epoch % config.save_every == 0 or epoch == config.epochs)
                say(summary_line(metrics, config.epochs, splitlbi=lbi is not None))
                if lbi is not None and epoch == config.epochs:
                    diagnostics.check_support(lbi, stacklevel=3)  # Γ empty, or layers empty, at the end
                if board is not None:
                    board.log_epoch(epoch, metrics, model, optimizer)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, metrics)
    if board is not None:  # flushed every epoch: a crash loses nothing, closing is tidiness
        board.close()
