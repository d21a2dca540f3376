"""Multi-process training with PyTorch's DistributedDataParallel, launched by ``torchrun``.

``torchrun --nproc-per-node N -m splitlbi train ...`` starts N processes with the
environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`setup` sees ``WORLD_SIZE > 1``, joins the process group
(NCCL on CUDA, each process on ``cuda:LOCAL_RANK``; gloo on the CPU) and
:func:`wrap_model` wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel`.

What the training code relies on (see docs/distributed.md):

* ``--batch-size`` is per process: with global batch ``G = B·W`` the ranks' k-th
  batches together are the k-th batch of one process with batch ``G``
  (:func:`shard_bounds`; the ragged last batch is split as evenly as possible and the
  loss weighted so that the averaged gradient is that batch's mean gradient).
* SplitLBI needs no communication of its own: DDP hands every rank the same averaged
  gradient and the step is a deterministic function of it and of state that starts
  equal everywhere. :func:`check_in_sync` verifies this once per epoch.
* Rank 0 alone writes files and logs; :func:`agreement` makes a failure there (or on
  any rank) stop every rank instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError

__all__ = [
    "DistributedContext", "SINGLE", "world_size_from_env", "is_main_process", "setup", "shutdown",
    "shard_bounds", "rank_seed", "wrap_model", "agreement", "all_gather_objects", "broadcast_buffers",
    "check_in_sync", "resynchronize",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly one-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: The device collectives run on (the training device: cuda:LOCAL_RANK or cpu).
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """Whether there are other processes (and a process group) to talk to."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    @property
    def shard(self) -> Optional[Tuple[int, int]]:
        """``(rank, world_size)`` for ``train_one_epoch``/``evaluate``, or ``None`` alone."""
        return (self.rank, self.world_size) if self.enabled else None


SINGLE = DistributedContext()

# Whether setup() created the default process group (then shutdown() destroys it).
_created_group = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SplitLBIError(f"environment variable {name}={value!r} is not an integer") from None


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    """Whether this process is rank 0 (of the live process group, else of ``RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def _distributed_device(name: str, local_rank: int) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise SplitLBIError(f"--device {name} cannot be used with torchrun: each process uses cuda:LOCAL_RANK "
                            f"(--device cuda or auto) or the CPU (--device cpu)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SplitLBIError("--device cuda: CUDA is not available on this machine")
    if local_rank >= torch.cuda.device_count():
        raise SplitLBIError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                            f"visible: start at most that many processes per node")
    return torch.device("cuda", local_rank)


def setup(device_name: str, resolve: Callable[[str], torch.device]) -> Tuple[DistributedContext, torch.device]:
    """Join the process group when launched by torchrun; return the context and the training device.

    One process (``WORLD_SIZE`` unset or 1, and no process group made by the caller):
    ``(SINGLE, resolve(device_name))`` and nothing else happens. Otherwise the device is
    ``cuda:LOCAL_RANK`` (``--device auto|cuda`` with CUDA) or the CPU, and the default
    process group is initialized from the environment (NCCL on CUDA, gloo on the CPU)
    unless the caller already did.
    """
    global _created_group
    already = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if already else world_size_from_env()
    if world_size <= 1:
        return SINGLE, resolve(device_name)
    if not dist.is_available():
        raise SplitLBIError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank = dist.get_rank() if already else _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    device = _distributed_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not already:
        # torch._dynamo, imported on first use by torch.optim (and torch.compile), keeps
        # references to a process group that exists when it is imported, so
        # destroy_process_group() could not free it: gloo's threads then outlived the
        # interpreter and some exits aborted ("terminate called without an active
        # exception"). Importing it before the group exists avoids that.
        import torch._dynamo  # noqa: F401

        backend = "nccl" if device.type == "cuda" else "gloo"
        options: dict = {}
        if device.type == "cuda":
            options["device_id"] = device  # binds the communicator to this GPU up front
        try:
            dist.init_process_group(backend=backend, **options)
        except (RuntimeError, ValueError) as error:
            raise SplitLBIError(f"cannot join the process group ({backend}): {error}") from None
        _created_group = True
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device), device


def shutdown(success: bool = True) -> None:
    """Release the process group if :func:`setup` created it (a caller's group stays).

    After a successful run every rank gets here together: a barrier lets the last
    collective finish everywhere, then the group is destroyed (gloo's worker threads
    must not outlive the interpreter). After an error the group is left alone: the
    other ranks may be inside a collective, where a collective teardown could hang;
    the process exits and the launcher ends the others.
    """
    global _created_group
    if _created_group and success and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _created_group = False


def shard_bounds(count: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``count`` items.

    As even as possible, the first ``count % world_size`` ranks taking one more. For
    ``count = B·W`` rank ``r`` gets ``[r·B, (r+1)·B)``; a rank gets nothing only when
    ``count < world_size``.
    """
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of the global RNGs (dropout) of rank ``rank > 0``; rank 0 keeps ``seed``."""
    # 32 bits: numpy's legacy seeding takes no more.
    return int(np.random.SeedSequence([seed, rank, 0xDD9]).generate_state(1, dtype=np.uint32)[0])


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed, else ``model`` itself.

    The optimizer, checkpoints and path rows keep using ``model`` (names without a
    ``module.`` prefix); only the training forward/backward goes through the wrapper.
    """
    if not context.enabled:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def agreement(context: DistributedContext) -> Iterator[None]:
    """Run a block (often ``if context.is_main:`` file writes) so that all ranks stop together.

    If the block raises on any rank, every rank raises when leaving it: the failing rank
    its own error, the others a :class:`SplitLBIError` pointing to it. Costs one tiny
    all-reduce; a no-op in one process.
    """
    if not context.enabled:
        yield
        return
    error: Optional[BaseException] = None
    try:
        yield
    except Exception as caught:  # KeyboardInterrupt & co. end the process anyway
        error = caught
    failed = torch.tensor([1 if error is not None else 0], dtype=torch.int32, device=context.device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed.item()):
        raise SplitLBIError(f"rank {context.rank}: stopping because another process failed "
                            f"(its error is printed by that process)")


def all_gather_objects(context: DistributedContext, value: Any) -> List[Any]:
    """``[value of rank 0, value of rank 1, ...]`` (picklable values); ``[value]`` alone."""
    if not context.enabled:
        return [value]
    gathered: List[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_buffers(context: DistributedContext, module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts them before each forward, so after the last step of an epoch the
    other ranks hold statistics updated by their own last batch; this makes evaluation
    and :func:`check_in_sync` see rank 0's, the ones that are saved.
    """
    if not context.enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def _tensors_to_check(module: nn.Module, optimizer: torch.optim.Optimizer) -> List[Tuple[str, Tensor]]:
    names = {parameter: name for name, parameter in module.named_parameters()}
    tensors: List[Tuple[str, Tensor]] = [(f"parameter {name}", p.detach()) for name, p in module.named_parameters()]
    tensors += [(f"buffer {name}", b) for name, b in module.named_buffers() if b.is_floating_point()]
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if isinstance(value, Tensor) and value.is_floating_point() and value.dim() > 0:
                    tensors.append((f"optimizer {key} of {names.get(parameter, '?')}", value))
    return tensors


def check_in_sync(context: DistributedContext, module: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """Names of the tensors (weights, buffers, optimizer state: momentum, SplitLBI's V)
    that differ between ranks; empty when all ranks hold the same values.

    Compares per-tensor float64 sums and sums of squares (any change of a bit shows up
    in practice) with two small all-reduces; meant to run once per epoch.
    """
    if not context.enabled:
        return []
    tensors = _tensors_to_check(module, optimizer)
    if not tensors:
        return []
    sums = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for _, t in tensors])
    # A NaN on every rank is "the same"; a NaN on some ranks only still differs.
    sums = torch.nan_to_num(sums, nan=float("inf")).to(context.device)
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differs = (low != high).any(dim=1).tolist()
    return [name for (name, _), bad in zip(tensors, differs) if bad]


def resynchronize(context: DistributedContext, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Copy rank 0's weights, buffers and optimizer state to every rank."""
    if not context.enabled:
        return
    for _, tensor in _tensors_to_check(module, optimizer):
        dist.broadcast(tensor, src=0)

