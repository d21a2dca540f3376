"""Parameter groups of a network for :class:`~splitlbi.optim.SplitLBI`: which parameters
carry a structure parameter Γ, under which penalty.

:func:`param_groups` builds them for any ``nn.Module`` from its layers; ``splitlbi train``
uses it, and the README's snippet. What carries Γ (``couple``):

- ``"filters"``: every conv weight, one group-lasso group per output filter (the paper);
- ``"bn"``: the BatchNorm scale of every conv that has one (``l1``: one entry per output
  channel), the filters of convs without one. In a BatchNorm network a filter's norm says
  nothing about what it does (BatchNorm divides it out); its channel's scale does;
- ``"both"``: filters and BatchNorm scales (a channel is selected when both are).

Linear layers carry Γ only under ``linear_penalty`` (``"l1"`` or ``"neuron"``) and never the
output layer (the last ``nn.Linear``): a sparse model without its classifier is at chance.
Biases, BatchNorm shifts and the rest follow plain SGD (``penalty="none"``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch import Tensor, nn

from splitlbi.models.structure import conv_batchnorms, output_layer, stem_conv

__all__ = ["COUPLINGS", "COUPLING_LAM", "LAM_SCALES", "param_groups", "resolve"]

#: What carries Γ in the convolutional part of a network (see the module docstring).
COUPLINGS = ("filters", "bn", "both")
#: λ of each coupling when none is given: the paper's 1 for filters; for BatchNorm scales, which
#: start at 1, a scale enters once its accumulated gradient has pushed it past λ − 1
#: (docs/defaults.md).
COUPLING_LAM = {"filters": 1.0, "bn": 2.0, "both": 2.0}
#: λ of each coupled conv layer: ``"none"`` (the same λ everywhere) or ``"norm"`` (λ times the
#: median norm of the layer's filters when the groups are built, so that layers whose filters
#: start small, e.g. a stem with one input channel, are not the last to enter).
LAM_SCALES = ("none", "norm")


def resolve(model: nn.Module, couple: str = "auto", stem: Optional[bool] = None,
            example_input: Optional[Tensor] = None) -> tuple:
    """``(couple, stem)`` made concrete for ``model``: ``"auto"`` is ``"bn"`` when a conv of the
    model has BatchNorm, else ``"filters"``; ``stem=None`` couples the stem unless its BatchNorm
    scale would carry Γ (``"bn"`` and a stem with BatchNorm): pruning usually leaves it dense (a
    network with no other conv keeps it coupled)."""
    norms = conv_batchnorms(model, example_input)
    if couple == "auto":
        couple = "bn" if norms else "filters"
    if couple not in COUPLINGS:
        raise ValueError(f"couple must be auto or one of {', '.join(COUPLINGS)}, got {couple!r}")
    if stem is None:
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        # A network whose only conv is its stem keeps it coupled: otherwise nothing would carry Γ.
        stem = not (couple == "bn" and stem_conv(model) in norms and len(convs) > 1)
    return couple, bool(stem)


def param_groups(
    model: nn.Module,
    *,
    couple: str = "auto",
    stem: Optional[bool] = None,
    linear_penalty: str = "none",
    lam_scale: str = "none",
    lam: Optional[float] = None,
    example_input: Optional[Tensor] = None,
) -> List[Dict[str, Any]]:
    """Parameter groups of ``model`` for ``SplitLBI(param_groups(model), lr=...)``.

    Args:
        couple: what carries Γ in the conv layers: one of :data:`COUPLINGS`, or ``"auto"``
            (the default): the BatchNorm scales when the model's convs have BatchNorm, the
            filters otherwise.
        stem: whether the first conv (and its BatchNorm) carries Γ too; ``False`` leaves it
            dense, as pruning usually does. ``None``: dense when BatchNorm scales carry Γ.
        linear_penalty: penalty of the linear layers other than the output layer:
            ``"none"``, ``"l1"`` or ``"neuron"``.
        lam_scale: one of :data:`LAM_SCALES` (for coupled conv filters).
        lam: λ of the coupled groups (each group gets it as its ``"lam"``); ``None``: the
            coupling's :data:`COUPLING_LAM` for BatchNorm scales, and the optimizer's own
            ``lam`` for filters (``lam_scale="norm"`` scales 1 then).
        example_input: one batch, to find each conv's BatchNorm by tracing (exact); without
            it the order of registration is used (:func:`splitlbi.models.structure.conv_batchnorms`).

    Returns:
        A list of dicts with ``"params"`` as ``(name, parameter)`` pairs (so that the
        optimizer reports layers by name), ``"penalty"`` and, where set, ``"lam"``; empty
        groups are left out.
    """
    couple, stem = resolve(model, couple, stem, example_input)
    if lam_scale not in LAM_SCALES:
        raise ValueError(f"lam_scale must be one of {', '.join(LAM_SCALES)}, got {lam_scale!r}")
    if linear_penalty not in ("none", "l1", "neuron"):
        raise ValueError(f"linear_penalty must be none, l1 or neuron, got {linear_penalty!r}")
    modules = dict(model.named_modules())
    norms = conv_batchnorms(model, example_input)
    first, last = stem_conv(model), output_layer(model)
    filters: List[tuple] = []
    scales: List[tuple] = []
    linears: List[tuple] = []
    for name, module in modules.items():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if name == first and not stem:
                continue
            norm = norms.get(name)
            if couple in ("bn", "both") and norm is not None:
                scales.append((f"{norm}.weight", modules[norm].weight))
            if couple in ("filters", "both") or norm is None:
                filters.append((f"{name}.weight", module.weight))
        elif isinstance(module, nn.Linear) and name != last and linear_penalty != "none":
            linears.append((f"{name}.weight", module.weight))
    coupled = {id(p) for _, p in filters + scales + linears}
    groups: List[Dict[str, Any]] = []
    own = {} if lam is None else {"lam": float(lam)}
    if lam_scale == "norm":
        for name, weight in filters:
            norms_now = weight.detach().flatten(1).norm(dim=1)
            groups.append({"params": [(name, weight)], "penalty": "group",
                           "lam": (1.0 if lam is None else float(lam)) * float(norms_now.median())})
    elif filters:
        groups.append({"params": filters, "penalty": "group", **own})
    if scales:
        groups.append({"params": scales, "penalty": "l1", "lam": COUPLING_LAM["bn"] if lam is None else float(lam)})
    if linears:
        groups.append({"params": linears, "penalty": linear_penalty})
    rest = [(name, p) for name, p in model.named_parameters() if id(p) not in coupled]
    if rest:
        groups.append({"params": rest, "penalty": "none"})
    return groups
