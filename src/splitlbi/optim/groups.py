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

__all__ = ["COUPLINGS", "LAM_SCALES", "param_groups"]

#: What carries Γ in the convolutional part of a network (see the module docstring).
COUPLINGS = ("filters", "bn", "both")
#: λ of each coupled conv layer: ``"none"`` (the same λ everywhere) or ``"norm"`` (λ times the
#: median norm of the layer's filters when the groups are built, so that layers whose filters
#: start small, e.g. a stem with one input channel, are not the last to enter).
LAM_SCALES = ("none", "norm")


def param_groups(
    model: nn.Module,
    *,
    couple: str = "filters",
    stem: bool = True,
    linear_penalty: str = "none",
    lam_scale: str = "none",
    lam: float = 1.0,
    example_input: Optional[Tensor] = None,
) -> List[Dict[str, Any]]:
    """Parameter groups of ``model`` for ``SplitLBI(param_groups(model), lr=...)``.

    Args:
        couple: what carries Γ in the conv layers, one of :data:`COUPLINGS`.
        stem: whether the first conv (and its BatchNorm) carries Γ too; ``False`` leaves it
            dense, as pruning usually does.
        linear_penalty: penalty of the linear layers other than the output layer:
            ``"none"``, ``"l1"`` or ``"neuron"``.
        lam_scale: one of :data:`LAM_SCALES` (for coupled conv filters; needs ``lam``).
        lam: the λ that ``lam_scale="norm"`` scales per layer (the optimizer's own ``lam``
            applies to every other coupled group).
        example_input: one batch, to find each conv's BatchNorm by tracing (exact); without
            it the order of registration is used (:func:`splitlbi.models.structure.conv_batchnorms`).

    Returns:
        A list of dicts with ``"params"`` as ``(name, parameter)`` pairs (so that the
        optimizer reports layers by name) and ``"penalty"``; empty groups are left out.
    """
    if couple not in COUPLINGS:
        raise ValueError(f"couple must be one of {', '.join(COUPLINGS)}, got {couple!r}")
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
    if lam_scale == "norm":
        for name, weight in filters:
            norms_now = weight.detach().flatten(1).norm(dim=1)
            groups.append({"params": [(name, weight)], "penalty": "group", "lam": lam * float(norms_now.median())})
    elif filters:
        groups.append({"params": filters, "penalty": "group"})
    if scales:
        groups.append({"params": scales, "penalty": "l1"})
    if linears:
        groups.append({"params": linears, "penalty": linear_penalty})
    rest = [(name, p) for name, p in model.named_parameters() if id(p) not in coupled]
    if rest:
        groups.append({"params": rest, "penalty": "none"})
    return groups
