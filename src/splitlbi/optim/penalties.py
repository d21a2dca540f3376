"""Sparsity penalties Ω of SplitLBI and their proximal maps.

``Γ = κ · prox_Ω(V)``. Each penalty is a function of ``V`` alone, so ``Γ`` is never
stored: it is formed from ``V`` when it is needed (SPEC, "Implementation notes").

- ``"group"``: one group per output filter ``V[o, ...]`` of a conv weight,
  ``prox(V)_g = max(0, 1 − λ/‖V_g‖₂) · V_g``.
- ``"neuron"``: the same with one group per output row of a linear weight.
- ``"l1"``: elementwise soft threshold ``sign(V) · max(|V| − λ, 0)``.
- ``"none"``: no ``Γ``; the parameter follows plain SGD(-momentum) with step ``κ·α``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

PENALTIES = ("auto", "group", "neuron", "l1", "none")
GROUPED = ("group", "neuron")


def resolve_penalty(penalty: str, shape: torch.Size | tuple[int, ...], name: str = "parameter") -> str:
    """The concrete penalty of a tensor of ``shape``: ``"auto"`` means 4-D (and other
    conv weights, 3-D to 5-D) → group, 2-D → l1, anything else → none.

    Raises ``ValueError`` naming the parameter when the penalty does not fit its shape.
    """
    ndim = len(shape)
    if penalty == "auto":
        if ndim >= 3:
            return "group"
        return "l1" if ndim == 2 else "none"
    if penalty == "group" and ndim < 3:
        raise ValueError(
            f"penalty 'group' needs a conv weight (3-D to 5-D), but {name} has shape {tuple(shape)}; "
            "use 'neuron' for a linear weight or 'l1'/'none'"
        )
    if penalty == "neuron" and ndim != 2:
        raise ValueError(f"penalty 'neuron' needs a 2-D linear weight, but {name} has shape {tuple(shape)}")
    if penalty == "l1" and ndim == 0:
        raise ValueError(f"penalty 'l1' needs at least one dimension, but {name} is a scalar")
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {penalty!r} for {name}")
    return penalty


@functools.lru_cache(maxsize=None)
def penalty_for_rank(penalty: str, ndim: int) -> str:
    """:func:`resolve_penalty` for a tensor of ``ndim`` dimensions, cached (the step asks
    for every parameter; the optimizer validated the shapes when it was built)."""
    return resolve_penalty(penalty, (1,) * ndim)


def group_norms(v: Tensor, keepdim: bool = False) -> Tensor:
    """ℓ2 norm of each output group ``v[o, ...]`` in float32 at least: shape ``[out]``,
    or ``[out, 1, ...]`` (broadcasting over ``v``) with ``keepdim``."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    if v.dim() == 1:  # one entry per output channel (a BatchNorm scale): its absolute value
        return v.abs().to(dtype)
    return torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=keepdim, dtype=dtype)


def shrink_factor(norms: Tensor, lam: float) -> Tensor:
    """Group soft-threshold factor ``max(0, 1 − λ/‖V_g‖)`` from the group norms.

    A zero group gives 0 (and λ = 0 gives 1): the clamp keeps ``0/0`` out.
    """
    tiny = torch.finfo(norms.dtype).tiny
    return (1.0 - lam / norms.clamp_min(tiny)).clamp_min_(0.0)


def broadcast_shape(v: Tensor) -> tuple[int, ...]:
    """Shape ``(out, 1, 1, ...)`` that broadcasts a per-group factor over ``v``."""
    return (v.shape[0],) + (1,) * (v.dim() - 1)


def prox(v: Tensor, lam: float, penalty: str) -> Tensor:
    """``prox_Ω(V)`` for a resolved penalty (a new tensor)."""
    if penalty in GROUPED:
        return v * shrink_factor(group_norms(v), lam).to(v.dtype).view(broadcast_shape(v))
    if penalty == "l1":
        return torch.nn.functional.softshrink(v, lam) if lam > 0 else v.clone()
    raise ValueError(f"penalty {penalty!r} has no proximal map")


def gamma_from_v(v: Tensor, kappa: float, lam: float, penalty: str) -> Tensor:
    """``Γ = κ · prox_Ω(V)``."""
    return prox(v, lam, penalty).mul_(kappa)


def support_from_v(v: Tensor, lam: float, penalty: str) -> Tensor:
    """Boolean mask of ``Γ ≠ 0`` (same shape as ``v``) without forming ``Γ``."""
    if penalty in GROUPED:
        selected = group_norms(v) > lam
        return selected.view(broadcast_shape(v)).expand_as(v).clone()
    if penalty == "l1":
        return v.abs() > lam
    raise ValueError(f"penalty {penalty!r} has no support")


def filter_support_from_v(v: Tensor, lam: float, penalty: str) -> Tensor:
    """One boolean per output filter/neuron: is any of its entries in the support of Γ."""
    if penalty in GROUPED:
        return group_norms(v) > lam
    return support_from_v(v, lam, penalty).reshape(v.shape[0], -1).any(dim=1)


def filter_dual_norms(v: Tensor, penalty: str) -> Tensor:
    """Per output filter/neuron, the norm of ``V`` that the penalty thresholds at ``λ``:
    ``‖V_g‖₂`` for ``"group"``/``"neuron"``, ``max_j |V_gj|`` for ``"l1"`` (float32 at least)."""
    if penalty in GROUPED:
        return group_norms(v)
    if penalty == "l1":
        dtype = torch.promote_types(v.dtype, torch.float32)
        return v.detach().reshape(v.shape[0], -1).abs().amax(dim=1).to(dtype)
    raise ValueError(f"penalty {penalty!r} has no support")


def filter_scores_from_v(v: Tensor, lam: float, penalty: str) -> Tensor:
    """Path score per output filter: :func:`filter_dual_norms` / ``λ``; ``> 1`` exactly
    where :func:`filter_support_from_v` is True."""
    norms = filter_dual_norms(v, penalty)
    if lam <= 0:
        return torch.where(norms > 0, torch.full_like(norms, float("inf")), torch.zeros_like(norms))
    scores = norms / lam
    # Rounding of the division must not move a score across 1 against the support test.
    one = torch.ones_like(scores)
    inside = norms > lam
    scores = torch.where(inside & (scores <= 1), torch.nextafter(one, one + 1), scores)
    return torch.where(~inside & (scores > 1), one, scores)
