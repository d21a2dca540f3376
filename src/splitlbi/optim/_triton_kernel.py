"""The fused SplitLBI step as one Triton kernel launch for all tensors of a group.

Used on CUDA when Triton is importable (an optional dependency); with
``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors through Triton's
interpreter, which is how the tests check it without a GPU.

Stores round float32 to bfloat16 to nearest even with integer ops: the same bits as a
GPU's conversion instruction, and correct under Triton's interpreter, which truncates.

Layout: every tensor is seen as a matrix of ``rows × row_len``. A grouped tensor
(group/neuron penalty) has its true rows (one per output filter, ``row_len`` = the
filter's size); any other tensor is cut into rows of ``BLOCK_C`` elements. A program
handles ``ROWS`` rows of one tensor and walks their columns in chunks of ``BLOCK_C``,
so the norms of a grouped row are reduced inside one program: no atomics, and a
deterministic order (the same for the norms of the new ``V`` and for norms recomputed
from ``V``, so resuming from a state dict gives the same bits). Two int64 tables
describe the work: per tensor its pointers, size, row length and flags (rebuilt when a
pointer changes), per program its tensor and first row (rebuilt when shapes change).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except Exception:  # not installed, or a broken install: the optimizer uses another path
    triton = None
    tl = None

ROWS = 4  # rows per program
BLOCK_C = 256  # columns per chunk: a tile is ROWS × BLOCK_C elements
META_FIELDS = 8  # w, grad, buf, v, norms pointers; numel; row_len; flags

_DTYPES = {}
if tl is not None:
    _DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def available() -> bool:
    """Triton is importable and a CUDA device is present (or the interpreter is on)."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _fused_step_kernel(meta, tasks, lr, kappa, nu, lam, momentum, keep, weight_decay,
                           DTYPE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                           HAS_WD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(tasks + 2 * pid)
        row0 = tl.load(tasks + 2 * pid + 1)
        base = meta + t * 8
        w_ptr = tl.load(base + 0).to(tl.pointer_type(DTYPE), bitcast=True)
        g_ptr = tl.load(base + 1).to(tl.pointer_type(DTYPE), bitcast=True)
        buf_ptr = tl.load(base + 2).to(tl.pointer_type(DTYPE), bitcast=True)
        v_ptr = tl.load(base + 3).to(tl.pointer_type(DTYPE), bitcast=True)
        norms_ptr = tl.load(base + 4).to(tl.pointer_type(tl.float32), bitcast=True)
        numel = tl.load(base + 5)
        row_len = tl.load(base + 6)
        flags = tl.load(base + 7)
        kind = flags % 4  # 0 none, 1 group/neuron, 2 l1
        fresh = (flags // 4) % 2 == 1
        stale = (flags // 8) % 2 == 1

        rows = row0 + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        n_rows = (numel + row_len - 1) // row_len
        row_ok = rows < n_rows
        step = kappa * lr
        v_step = lr / nu
        inv_nu = 1.0 / nu

        neg_kappa_factor = tl.zeros([ROWS], dtype=tl.float32)
        if kind == 1:
            if stale:  # norms of V from V itself: same tiles and order as below
                acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
                for c0 in range(0, row_len, BLOCK_C):
                    offs = rows[:, None] * row_len + (c0 + cols)[None, :]
                    mask = row_ok[:, None] & ((c0 + cols) < row_len)[None, :]
                    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    acc += v * v
                norm = tl.sqrt(tl.sum(acc, axis=1))
            else:
                norm = tl.load(norms_ptr + rows, mask=row_ok, other=1.0)
            factor = tl.maximum(1.0 - lam / tl.maximum(norm, 1.1754943508222875e-38), 0.0)
            neg_kappa_factor = -kappa * factor

        acc_new = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, row_len, BLOCK_C):
            offs = rows[:, None] * row_len + (c0 + cols)[None, :]
            mask = row_ok[:, None] & ((c0 + cols) < row_len)[None, :] & (offs < numel)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_WD:
                d = d + weight_decay * w
            g = d
            if HAS_MOMENTUM:
                if fresh:
                    b = d
                else:
                    b = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32) * momentum + keep * d
                if DTYPE == tl.bfloat16:  # round to nearest even with integer ops (see module doc)
                    bits = b.to(tl.uint32, bitcast=True)
                    bits = tl.where(b != b, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
                    b_stored = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
                else:
                    b_stored = b.to(DTYPE)
                tl.store(buf_ptr + offs, b_stored, mask=mask)
                if NESTEROV:
                    g = d + momentum * b_stored.to(tl.float32)
                else:
                    g = b_stored.to(tl.float32)
            if kind == 0:
                w_new = w - step * g
            else:
                v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if kind == 1:
                    c = w + v * neg_kappa_factor[:, None]
                else:
                    shrunk = tl.where(v > lam, v - lam, tl.where(v < -lam, v + lam, 0.0))
                    c = w - kappa * shrunk
                v_new32 = v + v_step * c
                if DTYPE == tl.bfloat16:  # round to nearest even with integer ops (see module doc)
                    bits = v_new32.to(tl.uint32, bitcast=True)
                    bits = tl.where(v_new32 != v_new32, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
                    v_new = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
                else:
                    v_new = v_new32.to(DTYPE)
                tl.store(v_ptr + offs, v_new, mask=mask)
                v_new32 = v_new.to(tl.float32)
                acc_new += v_new32 * v_new32
                w_new = w - step * (g + c * inv_nu)
            if DTYPE == tl.bfloat16:  # round to nearest even with integer ops (see module doc)
                bits = w_new.to(tl.uint32, bitcast=True)
                bits = tl.where(w_new != w_new, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
                w_store = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                w_store = w_new.to(DTYPE)
            tl.store(w_ptr + offs, w_store, mask=mask)
        if kind == 1:
            tl.store(norms_ptr + rows, tl.sqrt(tl.sum(acc_new, axis=1)), mask=row_ok)


class _Plan:
    """The task table of a list of shapes and penalty kinds, and the pointer table last
    built for it (reused while no pointer changes)."""

    def __init__(self, key: tuple, tasks: Tensor, sizes: list[tuple[int, int]]) -> None:
        self.key = key
        self.tasks = tasks
        self.sizes = sizes  # (numel, row_len) per tensor
        self.pointers: Optional[tuple] = None
        self.meta: Optional[Tensor] = None


_plans: dict[tuple, _Plan] = {}


def _row_len(p: Tensor, kind: int) -> int:
    if kind == 1:
        return max(1, p.numel() // max(p.shape[0], 1))
    return BLOCK_C


def _plan(params: list[Tensor], kinds: list[int]) -> _Plan:
    key = (params[0].device, tuple(p.shape for p in params), tuple(kinds))
    plan = _plans.get(key)
    if plan is None:
        tasks, sizes = [], []
        for t, (p, kind) in enumerate(zip(params, kinds)):
            row_len = _row_len(p, kind)
            n_rows = -(-p.numel() // row_len)
            tasks += [(t, r) for r in range(0, n_rows, ROWS)]
            sizes.append((p.numel(), row_len))
        table = torch.tensor(tasks, dtype=torch.int64).reshape(-1, 2).to(params[0].device)
        if len(_plans) > 16:
            _plans.clear()
        plan = _plans[key] = _Plan(key, table, sizes)
    return plan


def _layouts_fit(params, grads, bufs, vs, kinds, device) -> bool:
    """The kernel walks each tensor's memory as one flat array: W, grad, buf and V must be
    dense and laid out alike, and a grouped tensor's filters blocks of memory."""
    dtype = params[0].dtype
    coupled = iter(vs)
    for i, p in enumerate(params):
        strides = p.stride()
        if p.device != device or p.dtype != dtype or not _dense(p):
            return False
        same = [grads[i]] + ([bufs[i]] if bufs else []) + ([next(coupled)] if kinds[i] else [])
        if any(x.device != device or x.dtype != dtype or x.stride() != strides for x in same):
            return False
        if kinds[i] == 1 and p.shape[0] > 1 and strides[0] != p.numel() // p.shape[0]:
            return False
    return True


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) or \
        (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))


def fused_step(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], vs: list[Tensor],
               norms: list[Tensor], flags: list[int], lr: float, kappa: float, nu: float, lam: float,
               momentum: float, dampening: float, nesterov: bool, weight_decay: float) -> bool:
    """The fused step on one device and dtype (arguments as ``torch.ops.splitlbi.fused_step_``:
    ``vs`` for the coupled tensors, ``norms`` for the grouped ones, in order). Returns False,
    having changed nothing, when the tensors do not suit the kernel."""
    if triton is None or not params:
        return triton is not None
    first = params[0]
    dtype = _DTYPES.get(first.dtype)
    if dtype is None or (first.device.type != "cuda" and not interpreting()):
        return False
    device = first.device
    kinds = [flag & 3 for flag in flags]
    plan = _plan(params, kinds)
    if plan.tasks.shape[0] == 0:
        return True
    coupled, grouped = iter(vs), iter(norms)
    no_buffer = [0] * len(params) if not bufs else None
    pointers = []
    rows = zip(params, grads, bufs or no_buffer, kinds, flags, plan.sizes)
    for p, grad, buf, kind, flag, (numel, row_len) in rows:
        pointers += (p.data_ptr(), grad.data_ptr(), buf.data_ptr() if bufs else 0,
                     next(coupled).data_ptr() if kind else 0, next(grouped).data_ptr() if kind == 1 else 0,
                     numel, row_len, flag)
    pointers_key = tuple(pointers)
    if plan.pointers != pointers_key:
        # Layouts are checked whenever an address (or a flag) changes: a step on the same
        # tensors as the last one skips the checks and the copy of the table.
        if not _layouts_fit(params, grads, bufs, vs, kinds, device):
            return False
        # from pinned memory, so the copy does not make the host wait for the GPU
        staged = torch.tensor(pointers, dtype=torch.int64, pin_memory=device.type == "cuda")
        plan.meta = staged.to(device, non_blocking=True)
        plan.pointers = pointers_key
    grid = (plan.tasks.shape[0],)
    _fused_step_kernel[grid](
        plan.meta, plan.tasks, float(lr), float(kappa), float(nu), float(lam), float(momentum),
        1.0 - float(dampening), float(weight_decay),
        DTYPE=dtype, HAS_MOMENTUM=bool(bufs), NESTEROV=bool(nesterov), HAS_WD=weight_decay != 0,
        ROWS=ROWS, BLOCK_C=BLOCK_C,
    )
    return True
