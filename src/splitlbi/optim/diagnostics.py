r"""Warnings about a path that is not useful, each given once per optimizer (once per run).

While Γ is empty, ``V`` grows by ``(α/ν)·W`` per step, so a filter of norm ``‖W_g‖`` enters
the support (``‖V_g‖ > λ``) after about

    ``λν / (α‖W_g‖)`` steps,

and a weight outside the support, pulled towards ``Γ = 0`` by ``(W − Γ)/ν`` with step ``κα``,
decays by a factor e in about

    ``ν / (κα)`` steps.

(The release code's update moves ``V`` 100× slower at the start: ``min(1 − ρ, 0.01)``.)
From these, three checks, which :class:`~splitlbi.optim.SplitLBI` and the training loop run:

* :func:`steps_message`: before a run of ``steps`` steps, whether ν is too large for it
  (no filter would enter, or unselected weights would not decay), and which ν would act;
* :func:`empty_gamma_message`: Γ still empty after training (the sparse model is empty);
* :func:`empty_layers_message`: coupled layers with nothing in the support while others
  have some (the sparse model cuts those layers down to nothing).

:func:`warn_once` issues one as a :class:`~splitlbi.errors.SplitLBIWarning` unless the
optimizer has given it before; the command line prints them as ``splitlbi: warning: ...``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from splitlbi.errors import SplitLBIWarning

from . import penalties as _penalties

__all__ = ["SplitLBIWarning", "check_support", "decay_steps", "empty_gamma_message", "empty_layers",
           "empty_layers_message", "entry_steps", "steps_message", "warn_once"]

#: How much slower ``V`` moves at the start of a run under ``update="release"`` (``min(1 − ρ, 0.01)``).
_RELEASE_RATE = 0.01


def entry_steps(norm: float, lr: float, nu: float, lam: float, update: str = "paper") -> float:
    """Steps after which a filter of norm ``norm`` (its dual norm: ``‖W_g‖₂``, or ``max|W_gj|``
    under ``l1``) enters the support of Γ from ``V = 0``: about ``λν/(α‖W_g‖)``."""
    rate = _RELEASE_RATE if update == "release" else 1.0
    return math.inf if norm <= 0 or lr <= 0 else lam * nu / (rate * lr * norm)


def decay_steps(lr: float, kappa: float, nu: float) -> float:
    """Steps in which a weight outside the support decays by a factor e: about ``ν/(κα)``."""
    return math.inf if lr <= 0 else nu / (kappa * lr)


def _hyper(optimizer: Any, param: torch.Tensor) -> Dict[str, Any]:
    """The group of ``param``, its ``lr`` the schedule's initial one where a scheduler set it
    (a cosine schedule ends at 0: the estimates are about the run, not its last step)."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return {**group, "lr": group.get("initial_lr") or group["lr"]}
    raise KeyError("parameter not in the optimizer")


def _largest_filter(c: Any) -> float:
    """The largest dual norm over the filters of a coupled parameter's ``W`` now."""
    norms = _penalties.filter_dual_norms(c.param.detach(), c.penalty)
    return float(norms.max()) if norms.numel() else 0.0


def steps_message(optimizer: Any, steps: int) -> Optional[str]:
    """Why ``steps`` steps are too few for the optimizer's ν (and which ν would act), or None.

    Too few: the filter that enters first (the largest ``‖W_g‖`` now) would need more than
    ``steps`` steps, so Γ would stay empty; or ``ν/(κα)`` exceeds ``steps``, so weights
    outside the support would barely decay and the sparse model would differ from the
    dense one.
    """
    coupled = list(optimizer.named_coupled())
    if not coupled or steps <= 0:
        return None
    first: Optional[Tuple[float, Any, Dict[str, Any], float]] = None
    slowest: Optional[Tuple[float, Dict[str, Any]]] = None
    for c in coupled:
        group = _hyper(optimizer, c.param)
        norm = _largest_filter(c)
        enters = entry_steps(norm, group["lr"], group["nu"], c.lam, c.update)
        if first is None or enters < first[0]:
            first = (enters, c, group, norm)
        decays = decay_steps(group["lr"], group["kappa"], group["nu"])
        if slowest is None or decays > slowest[0]:
            slowest = (decays, group)
    assert first is not None and slowest is not None
    enters, c, group, norm = first
    if enters <= steps and slowest[0] <= steps:
        return None
    rate = _RELEASE_RATE if c.update == "release" else 1.0
    nu_enter = steps * rate * group["lr"] * norm / c.lam if c.lam > 0 else math.inf
    nu_decay = steps * slowest[1]["kappa"] * slowest[1]["lr"]
    nu = group["nu"]
    return (f"SplitLBI: ν = {nu:g} is too large for this run's {steps} steps (lr α = {group['lr']:g}, κ = "
            f"{group['kappa']:g}, λ = {c.lam:g}): a filter of norm ‖W_g‖ enters Γ after about λν/(α‖W_g‖) steps, "
            f"{enters:.0f} for the largest now ({c.name}, ‖W_g‖ = {norm:.3g}), and a weight outside the support "
            f"decays by e in ν/(κα) = {slowest[0]:.0f} steps; ν ≤ {min(nu_enter, nu_decay):.3g} would act within the "
            f"run (or train for more steps)")


def empty_gamma_message(optimizer: Any) -> Optional[str]:
    """Why Γ is empty after training, with the ν that would have let a filter enter, or None
    (Γ not empty, or nothing trained yet: ``V`` still zero)."""
    best: Optional[Tuple[float, Any, Dict[str, Any]]] = None
    for c in optimizer.named_coupled():
        scores = _penalties.filter_scores_from_v(c.v, c.lam, c.penalty)
        if scores.numel() == 0:
            continue
        top = float(scores.max())
        if top > 1:
            return None
        if best is None or top > best[0]:
            best = (top, c, _hyper(optimizer, c.param))
    if best is None or best[0] <= 0:
        return None
    top, c, group = best
    norm = _largest_filter(c)
    enters = entry_steps(norm, group["lr"], group["nu"], c.lam, c.update)
    return (f"SplitLBI: Γ is still empty: no filter has entered the support (largest path score {top:.2g}, "
            f"1 = entering, in {c.name}), so the sparse model has nothing in it. A filter of norm ‖W_g‖ enters "
            f"after about λν/(α‖W_g‖) steps ({enters:.0f} for ‖W_g‖ = {norm:.3g} at ν = {group['nu']:g}, "
            f"α = {group['lr']:g}, λ = {c.lam:g}); train longer or lower ν (ν = {group['nu'] * top:.3g} would have "
            f"let that filter enter by now)")


def empty_layers(optimizer: Any) -> Tuple[List[str], float]:
    """(coupled conv weights and BatchNorm scales with no filter in the support, share of the
    other coupled filters that are in it) when some other has filters in the support; else
    ([], 0). Linear layers are left out: the sparse model (the compacted network) keeps them."""
    empty, selected, total = [], 0, 0
    for c in optimizer.named_coupled():
        if c.param.dim() == 2:
            continue
        support = _penalties.filter_support_from_v(c.v, c.lam, c.penalty)
        if support.numel() == 0:
            continue
        count = int(support.sum())
        if count == 0:
            empty.append(c.name)
        else:
            selected += count
            total += support.numel()
    if not empty or selected == 0:
        return [], 0.0
    return empty, selected / total


def empty_layers_message(optimizer: Any) -> Optional[str]:
    """Which coupled layers have nothing in the support while others do, or None."""
    empty, share = empty_layers(optimizer)
    if not empty:
        return None
    shown = ", ".join(empty[:6]) + (f" and {len(empty) - 6} more" if len(empty) > 6 else "")
    return (f"SplitLBI: no filter of {shown} is in the support of Γ, while {100 * share:.0f}% of the other "
            f"coupled layers' filters are: the sparse model keeps nothing of these layers (one zeroed channel), so "
            f"almost nothing passes through them. Train longer, lower ν, or give their filters a smaller lambda "
            f"(splitlbi.param_groups(model, lam_scale='norm'), or a parameter group of their own)")


def warn_once(optimizer: Any, key: str, message: Optional[str], stacklevel: int = 3) -> None:
    """Issue ``message`` as a :class:`SplitLBIWarning` unless ``optimizer`` issued the warning
    ``key`` before (or ``message`` is None)."""
    if message is None:
        return
    given = optimizer.__dict__.setdefault("_warnings_given", set())
    if key in given:
        return
    given.add(key)
    warnings.warn(message, SplitLBIWarning, stacklevel=stacklevel)


def check_support(optimizer: Any, stacklevel: int = 4) -> None:
    """Warn (once each) when Γ is empty or a coupled layer has nothing in the support."""
    message = empty_gamma_message(optimizer)
    if message is not None:
        warn_once(optimizer, "empty gamma", message, stacklevel)
        return
    empty, _ = empty_layers(optimizer)
    if empty:
        warn_once(optimizer, "empty layers " + ",".join(empty), empty_layers_message(optimizer), stacklevel)
