r"""The fused SplitLBI step: the whole step in one pass over memory.

Same arithmetic as :func:`~splitlbi.optim.functional.splitlbi_update`, in one kernel
for all parameters of a group: on CPU a C++ kernel (``csrc/fused_step.cpp``, compiled
on first use, see :mod:`._cpu_kernel`), on CUDA a Triton kernel (:mod:`._triton_kernel`,
when Triton is installed). A step reads ``g``, the momentum buffer, ``W`` and ``V`` and
writes the buffer, ``W`` and ``V``: 7 passes, against 8 for ``torch.optim.SGD``'s three
``_foreach`` ops.

Group penalties need the per-filter norms of ``V`` for ``Γ``. The kernel computes the
norms of the new ``V`` while it writes it and keeps them (:class:`NormCache`) for the
next step, so ``V`` is read once. The cache is only trusted while ``V`` is the same
tensor at the same version (``Tensor._version``): after ``load_state_dict`` or any
in-place change of ``V`` outside the step, the kernel computes the norms from ``V``
again, with the same summation order, so the result is the same bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .penalties import GROUPED

KIND = {"none": 0, "group": 1, "neuron": 1, "l1": 2}
FLAG_FRESH, FLAG_STALE_NORMS = 4, 8


class NormCache:
    """Per-filter float32 norms of each grouped ``V``, kept between fused steps."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Tensor, int, Tensor]] = {}

    def lookup(self, vs: list[Tensor]) -> tuple[list[Tensor], list[bool]]:
        """A norms buffer for each ``v`` and whether it must be recomputed from ``v``.
        Entries of tensors not in ``vs`` are dropped (they belong to replaced ``V``\\s)."""
        entries, norms, stale = {}, [], []
        for v in vs:
            entry = self._entries.get(id(v))
            if entry is not None and entry[0] is v and entry[1] == v._version:
                norms.append(entry[2])
                stale.append(False)
            else:
                norms.append(torch.empty(v.shape[0], dtype=torch.float32, device=v.device))
                stale.append(True)
            entries[id(v)] = (v, -1, norms[-1])
        self._entries = entries
        return norms, stale

    def commit(self, vs: list[Tensor], norms: list[Tensor]) -> None:
        """Record that ``norms`` are those of ``vs`` as they are now (after a step)."""
        self._entries = {id(v): (v, v._version, n) for v, n in zip(vs, norms)}


def cpu_kernel_available() -> bool:
    """Whether the C++ kernel is built and loaded (building it on first call)."""
    from . import _cpu_kernel

    return _cpu_kernel.load()


def triton_available() -> bool:
    from . import _triton_kernel

    return _triton_kernel.available()


def default_backend(device: torch.device) -> Optional[str]:
    """The fused kernel for ``device``: ``"cpp"`` on CPU, ``"triton"`` on CUDA, else None."""
    return {"cpu": "cpp", "cuda": "triton"}.get(device.type)


def fused_supported(params: list[Tensor]) -> Optional[str]:
    """None when the fused step can run on ``params`` (one device, one dtype), else the
    reason it cannot."""
    if not params:
        return None
    first = params[0]
    if any(p.device != first.device or p.dtype != first.dtype for p in params):
        return "the parameters span several devices or dtypes"
    backend = default_backend(first.device)
    if backend == "cpp":
        if first.dtype != torch.float32:
            return f"the CPU kernel supports float32 parameters, not {first.dtype}"
        if not cpu_kernel_available():
            return "the CPU kernel could not be built (no C++ compiler?)"
        return None
    if backend == "triton":
        if first.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the Triton kernel supports float32/float16/bfloat16, not {first.dtype}"
        if not triton_available():
            return "Triton is not installed"
        return None
    return f"no fused kernel for device {first.device.type!r}"


def fused_splitlbi(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Optional[Tensor]],
    vs: list[Optional[Tensor]],
    penalties: list[str],
    norm_cache: NormCache,
    *,
    lr: float,
    kappa: float,
    nu: float,
    lam: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    backend: Optional[str] = None,
) -> bool:
    """One fused SplitLBI step on tensors of one device and dtype (see
    :func:`fused_supported`). Creates missing momentum buffers in ``momentum_buffers``
    (laid out like their parameter; the kernel sets them to ``d`` on their first step).

    ``backend`` is ``"cpp"`` (the CPU kernel, default on CPU) or ``"triton"`` (default
    elsewhere; on CPU tensors it needs ``TRITON_INTERPRET=1``, as in the tests).

    Returns False, having changed nothing, when a tensor does not suit the kernel: the
    kernels walk each tensor's memory as one flat array, so a gradient, buffer or ``V``
    laid out unlike its parameter, a non-dense tensor, or a grouped parameter whose
    filters are not blocks of memory sends the step to another path.
    """
    if not params:
        return True
    flags = [KIND[penalty] for penalty in penalties]
    if momentum != 0:
        for i, buf in enumerate(momentum_buffers):
            if buf is None:
                momentum_buffers[i] = torch.empty_like(params[i], memory_format=torch.preserve_format)
                flags[i] |= FLAG_FRESH
        bufs = momentum_buffers
    else:
        bufs = []
    coupled = [v for v in vs if v is not None]
    grouped_vs = [v for v, penalty in zip(vs, penalties) if penalty in GROUPED]
    norms, stale = norm_cache.lookup(grouped_vs)
    if True in stale:
        k = 0
        for i, penalty in enumerate(penalties):
            if penalty in GROUPED:
                if stale[k]:
                    flags[i] |= FLAG_STALE_NORMS
                k += 1
    hyper = (float(lr), float(kappa), float(nu), float(lam), float(momentum), float(dampening),
             bool(nesterov), float(weight_decay))
    if backend is None:
        backend = default_backend(params[0].device)
    if backend == "cpp":
        try:
            if not cpu_kernel_available():
                raise RuntimeError("the CPU kernel is not available")
            torch.ops.splitlbi.fused_step_(params, grads, bufs, coupled, norms, flags, *hyper)
        except RuntimeError:  # the kernel checks every tensor before it writes: nothing changed
            _undo_fresh_buffers(momentum_buffers, flags)
            norm_cache.lookup([])
            return False
    else:
        from . import _triton_kernel

        if not _triton_kernel.fused_step(params, grads, bufs, coupled, norms, flags, *hyper):
            _undo_fresh_buffers(momentum_buffers, flags)
            norm_cache.lookup([])
            return False
    norm_cache.commit(grouped_vs, norms)
    return True


def _undo_fresh_buffers(momentum_buffers: list[Optional[Tensor]], flags: list[int]) -> None:
    for i, flag in enumerate(flags):
        if flag & FLAG_FRESH:
            momentum_buffers[i] = None
