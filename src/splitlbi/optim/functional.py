r"""Functional core of SplitLBI: one step on lists of tensors.

With ``α`` the learning rate, ``g`` the gradient after weight decay and momentum
(exactly as :class:`torch.optim.SGD`), and ``Γ = κ·prox_Ω(V)``:

.. math::

    W &\leftarrow W - κα\,(g + (W - Γ)/ν) \\
    V &\leftarrow V + (α/ν)\,(W_{old} - Γ) \\
    Γ &\leftarrow κ\,\mathrm{prox}_Ω(V)

``update="release"`` (:func:`splitlbi_update` only) is the variant of the paper's release
code (see :data:`UPDATES` and :func:`release_coupled_step`).

Two implementations, as in ``torch.optim``: :func:`splitlbi_update` is the per-tensor
reference that reads like the equations; the multi-tensor path applies the same
arithmetic with ``torch._foreach_*`` ops. On CPU it walks the parameters in *waves*
of a few hundred thousand elements (whole filters, tensors cut where they are large)
so that the temporaries and the tensors a wave touches stay in cache between the ops
of one step: the step then costs close to the 7 passes over memory that a fused
kernel would need instead of one pass per op.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .penalties import GROUPED, gamma_from_v, shrink_factor

#: The updates of the coupled parameters: ``"paper"`` (the equations above, the reference)
#: and ``"release"`` (the CIFAR pruning example of the paper's release code,
#: :func:`release_coupled_step`; per-tensor path only).
UPDATES = ("paper", "release")

#: Largest factor of the release update's V step, ``min(1 − share of non-zeros of Γ, 0.01)``.
RELEASE_V_STEP_CAP = 0.01

# Elements per wave on CPU: chosen with benchmarks/bench_optimizer.py (a wave's
# tensors, about 5 arrays of this size, stay within the L2/L3 caches).
CPU_WAVE_NUMEL = 262_144


def momentum_direction(
    grad: Tensor,
    weight: Tensor,
    momentum_buffer: Optional[Tensor],
    *,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> tuple[Tensor, Optional[Tensor]]:
    """``g`` of ``torch.optim.SGD``: ``d = grad + wd·W``; ``buf = m·buf + (1−dampening)·d``
    (``buf = d`` on the first step); ``g = buf``, or ``d + m·buf`` with Nesterov.

    Returns ``(g, momentum_buffer)``; the buffer is updated in place.
    """
    d = grad if weight_decay == 0 else grad.add(weight, alpha=weight_decay)
    if momentum == 0:
        return d, momentum_buffer
    if momentum_buffer is None:
        momentum_buffer = torch.clone(d).detach()
    else:
        momentum_buffer.mul_(momentum).add_(d, alpha=1 - dampening)
    g = d.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    return g, momentum_buffer


def splitlbi_update(
    weight: Tensor,
    grad: Tensor,
    momentum_buffer: Optional[Tensor],
    v: Optional[Tensor],
    *,
    lr: float,
    kappa: float,
    nu: float,
    lam: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    penalty: str,
    update: str = "paper",
) -> Optional[Tensor]:
    """One SplitLBI step on one tensor (the reference path). Updates ``weight`` and
    ``v`` in place and returns the momentum buffer (new on the first step).

    ``v`` is ``None`` for penalty ``"none"``: plain SGD(-momentum) with step ``κ·α``.
    ``update`` is one of :data:`UPDATES`; ``"release"`` runs :func:`release_coupled_step`.
    """
    g, momentum_buffer = momentum_direction(
        grad, weight, momentum_buffer,
        momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
    )
    if v is None:
        weight.add_(g, alpha=-kappa * lr)
        return momentum_buffer
    if update == "release":
        release_coupled_step(weight, g, v, lr=lr, kappa=kappa, nu=nu, lam=lam, penalty=penalty)
        return momentum_buffer
    gamma = gamma_from_v(v, kappa, lam, penalty)
    coupling = weight - gamma  # W_old − Γ: drives both updates
    v.add_(coupling, alpha=lr / nu)
    weight.sub_(kappa * lr * (g + coupling / nu))
    return momentum_buffer


def release_scale(weight: Tensor) -> Tensor:
    """``max(|W|, 1)`` elementwise: the release update's normalization (never below 1, so
    it only shrinks the V step and never empties the support of Γ)."""
    return weight.abs().clamp_min(1.0)


def release_gamma(v: Tensor, weight: Tensor, kappa: float, lam: float, penalty: str) -> Tensor:
    """Γ of the release update, ``κ·max(|W|, 1)·prox_Ω(V)``, with ``W`` the current weight.

    The release code computes Γ right after each step from the new ``W``; the weight does
    not change until the next step, so Γ is the same function of ``V`` and ``W`` at any
    time in between and need not be stored (its support is that of ``prox_Ω(V)``).
    """
    return gamma_from_v(v, kappa, lam, penalty).mul_(release_scale(weight))


def release_coupled_step(weight: Tensor, g: Tensor, v: Tensor, *, lr: float, kappa: float, nu: float, lam: float,
                         penalty: str) -> None:
    r"""The coupled step of ``update="release"``, in place on ``weight`` and ``v``.

    With ``s(W) = max(|W|, 1)`` elementwise and ``ρ`` the share of non-zeros of the
    layer's ``Γ_old`` (this tensor's, before the step):

    .. math::

        Γ_{old} &= κ\,s(W_{old})\,\mathrm{prox}_Ω(V_{old}) \\
        W &\leftarrow W_{old} - κα\,(g + (W_{old} - Γ_{old})/ν) \\
        V &\leftarrow V_{old} + (α/ν)\,\min(1 - ρ, 0.01)\,(W_{old} - Γ_{old}) / s(W) \\
        Γ &= κ\,s(W)\,\mathrm{prox}_Ω(V)

    (the division by ``s(W)`` uses the new ``W``). This is the update of
    ``slbi_noconv_with_normalize.py`` in the paper's release code with its ``lr`` = ``κα``
    (for ``κ = 1``, the setting of its script, the two are the same).
    """
    gamma = release_gamma(v, weight, kappa, lam, penalty)
    # 1 − ρ stays on the device (no host sync), in float32 at least (a count in bfloat16 would round);
    # min(1 − ρ, cap) slows V down, and stops it once Γ is full
    dtype = torch.promote_types(v.dtype, torch.float32)
    zero_share = (gamma.numel() - torch.count_nonzero(gamma)).to(dtype) / gamma.numel()
    v_step = zero_share.clamp(max=RELEASE_V_STEP_CAP).to(v.dtype)
    coupling = weight - gamma  # W_old − Γ_old
    weight.sub_(kappa * lr * (g + coupling / nu))
    v.add_(coupling.mul_(v_step).div_(release_scale(weight)), alpha=lr / nu)


Piece = tuple[int, Optional[slice]]  # (parameter index, its rows along dim 0; None = whole)


def _cut(tensor: Tensor, rows: Optional[slice]) -> Tensor:
    """The rows of ``tensor`` (along dim 0) that a piece covers: a view in any memory
    format, and whole filters/neurons, so per-filter factors slice the same way."""
    return tensor if rows is None else tensor[rows]


def plan_waves(numels: list[int], rows: list[int], wave_numel: int) -> list[list[Piece]]:
    """Cut tensors larger than ``wave_numel`` into pieces of whole rows (dim 0) and pack
    consecutive pieces into waves of about ``wave_numel`` elements."""
    waves: list[list[Piece]] = [[]]
    filled = 0
    for index, (numel, out) in enumerate(zip(numels, rows)):
        if numel <= wave_numel:
            pieces: list[tuple[Optional[slice], int]] = [(None, numel)]
        else:
            row = numel // out
            step = max(1, wave_numel // row)
            pieces = [(slice(r, min(r + step, out)), (min(r + step, out) - r) * row) for r in range(0, out, step)]
        for cut, size in pieces:
            if filled and filled + size > wave_numel:
                waves.append([])
                filled = 0
            waves[-1].append((index, cut))
            filled += size
    return [w for w in waves if w]


class _Selection(NamedTuple):
    """Some pieces of a wave: parameter indices, their cuts (None when all are whole)
    and their positions in the wave."""

    indices: list[int]
    cuts: Optional[list[Optional[slice]]]
    positions: list[int]

    def take(self, tensors: list) -> list:
        if self.cuts is None:
            return [tensors[i] for i in self.indices]
        return [_cut(tensors[i], cut) for i, cut in zip(self.indices, self.cuts)]


class _Wave(NamedTuple):
    every: _Selection  # all pieces
    group: _Selection  # pieces of group/neuron-penalised parameters
    l1: _Selection  # pieces of l1-penalised parameters


def _select(wave: list[Piece], keep: Callable[[int], bool]) -> _Selection:
    chosen = [(k, i, cut) for k, (i, cut) in enumerate(wave) if keep(i)]
    cuts = [cut for _, _, cut in chosen]
    return _Selection([i for _, i, _ in chosen], None if all(c is None for c in cuts) else cuts,
                      [k for k, _, _ in chosen])


class StepPlan(NamedTuple):
    """How a multi-tensor step walks a list of parameters: its waves and, per rank of
    the grouped (group/neuron) parameters, their indices and norm dimensions. It depends
    only on the shapes and penalties, so the optimizer builds it once and reuses it."""

    waves: tuple[_Wave, ...]
    grouped: tuple[tuple[list[int], tuple[int, ...]], ...]
    wave_numel: int


def default_wave_numel(device: torch.device) -> int:
    """:data:`CPU_WAVE_NUMEL` on CPU; one wave on accelerators, whose fused multi-tensor
    kernels want long lists."""
    return CPU_WAVE_NUMEL if device.type == "cpu" else 1 << 62


def plan_step(params: list[Tensor], penalties: list[str], wave_numel: Optional[int] = None) -> StepPlan:
    """The :class:`StepPlan` of ``params`` (with their resolved penalties)."""
    if wave_numel is None:
        wave_numel = default_wave_numel(params[0].device) if params else CPU_WAVE_NUMEL
    waves = []
    for wave in plan_waves([p.numel() for p in params], [p.shape[0] if p.dim() else 1 for p in params], wave_numel):
        waves.append(_Wave(
            _select(wave, lambda i: True),
            _select(wave, lambda i: penalties[i] in GROUPED),
            _select(wave, lambda i: penalties[i] == "l1"),
        ))
    grouped = []
    for rank in sorted({p.dim() for p, pen in zip(params, penalties) if pen in GROUPED}):
        indices = [i for i, (p, pen) in enumerate(zip(params, penalties)) if pen in GROUPED and p.dim() == rank]
        grouped.append((indices, tuple(range(1, rank))))
    return StepPlan(tuple(waves), tuple(grouped), wave_numel)


def multi_tensor_splitlbi(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Optional[Tensor]],
    vs: list[Optional[Tensor]],
    penalties: list[str],
    *,
    lr: float,
    kappa: float,
    nu: float,
    lam: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    plan: Optional[StepPlan] = None,
) -> list[Optional[Tensor]]:
    """One SplitLBI step on tensors of one device and dtype, with ``torch._foreach_*``.

    Same arithmetic as :func:`splitlbi_update`. ``vs[i]`` is None for penalty
    ``"none"``. Returns the momentum buffers (new ones created on the first step).
    ``plan`` is :func:`plan_step` of these parameters (made here when not given).
    """
    if not params:
        return momentum_buffers
    if plan is None:
        plan = plan_step(params, penalties)

    # First step of a buffer: buf = d (as torch.optim.SGD); these skip the m·buf update.
    fresh = [False] * len(params)
    if momentum != 0 and any(buf is None for buf in momentum_buffers):
        for i, buf in enumerate(momentum_buffers):
            if buf is None:
                d = grads[i] if weight_decay == 0 else grads[i].add(params[i], alpha=weight_decay)
                momentum_buffers[i] = torch.clone(d).detach()
                fresh[i] = True

    # Γ = κ·prox(V_old) for grouped penalties is a per-filter factor times V: one
    # vectorised norm per layer, and the factors of all layers of one rank computed
    # together (norms kept as [out, 1, ...] so the split pieces broadcast as they are).
    factors: list[Optional[Tensor]] = [None] * len(params)
    low_precision = params[0].dtype in (torch.float16, torch.bfloat16)
    for indices, dims in plan.grouped:
        norms = [torch.linalg.vector_norm(vs[i], dim=dims, keepdim=True,
                                          dtype=torch.float32 if low_precision else None) for i in indices]
        neg_gamma_factor = shrink_factor(torch.cat(norms), lam).mul_(-kappa)
        if low_precision:
            neg_gamma_factor = neg_gamma_factor.to(params[0].dtype)
        for i, factor in zip(indices, neg_gamma_factor.split([n.shape[0] for n in norms])):
            factors[i] = factor

    any_fresh = True in fresh
    for wave in plan.waves:
        weights = wave.every.take(params)
        d = wave.every.take(grads)
        if weight_decay != 0:
            d = torch._foreach_add(d, weights, alpha=weight_decay)
        if momentum != 0:
            bufs = wave.every.take(momentum_buffers)
            old = [k for k, i in enumerate(wave.every.indices) if not fresh[i]] if any_fresh else None
            if old is None:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, d, alpha=1 - dampening)
            elif old:  # the first step of some buffers
                torch._foreach_mul_([bufs[k] for k in old], momentum)
                torch._foreach_add_([bufs[k] for k in old], [d[k] for k in old], alpha=1 - dampening)
            g = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
        else:
            g = d

        # W_old − Γ (grouped: W + V·(−κ·factor); l1: W − κ·softshrink(V)), then V and W
        group_w = [weights[k] for k in wave.group.positions]
        l1_w = [weights[k] for k in wave.l1.positions]
        coupled_v = wave.group.take(vs) + wave.l1.take(vs)
        coupling: list[Tensor] = []
        if group_w:
            coupling = torch._foreach_addcmul(group_w, coupled_v[: len(group_w)], wave.group.take(factors))
        if l1_w:
            l1_v = coupled_v[len(group_w):]
            shrunk = [torch.nn.functional.softshrink(v, lam) for v in l1_v] if lam > 0 else l1_v
            coupling += torch._foreach_add(l1_w, shrunk, alpha=-kappa)
        if coupling:
            torch._foreach_add_(coupled_v, coupling, alpha=lr / nu)
        torch._foreach_add_(weights, g, alpha=-kappa * lr)
        if coupling:
            torch._foreach_add_(group_w + l1_w, coupling, alpha=-kappa * lr / nu)
    return momentum_buffers
