"""Which conv filters a support selects, whatever carries Γ: the conv filters themselves
(group lasso on the weight) or the BatchNorm scales of their output channels (``l1`` on
the BatchNorm weight, one entry per channel).

Masks and path scores come keyed by the coupled parameter (``SplitLBI.masks()``,
``SplitLBI.path_scores()``): ``"layer1.0.conv1.weight"`` or ``"layer1.0.bn1.weight"``.
Compaction, budgets and the sparse model think in conv filters, so they read both through
:func:`filter_masks` and :func:`filter_scores`: a BatchNorm entry becomes the entry of the
conv whose output it normalizes (:func:`splitlbi.models.structure.conv_batchnorms`). Where
both carry Γ, a filter is selected only when both select it (masks: and; scores: the
smaller of the two, which is above 1 exactly then).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from splitlbi.models.structure import conv_batchnorms

__all__ = ["batchnorm_convs", "filter_masks", "filter_scores"]


def batchnorm_convs(model: nn.Module, example_input: Optional[Tensor] = None) -> Dict[str, str]:
    """``{BatchNorm weight name: weight name of the conv it normalizes}``."""
    return {f"{norm}.weight": f"{conv}.weight" for conv, norm in conv_batchnorms(model, example_input).items()}


def _translated(model: nn.Module, values: Mapping[str, Tensor], example_input: Optional[Tensor]):
    """(conv-keyed entries from BatchNorm entries, the other entries) — BatchNorm weights
    that normalize no conv stay as they are."""
    norms = {name for name, value in values.items() if isinstance(value, Tensor) and value.dim() == 1}
    if not norms:
        return {}, dict(values)
    convs = batchnorm_convs(model, example_input)
    moved = {convs[name]: values[name] for name in norms if name in convs}
    rest = {name: value for name, value in values.items() if name not in convs or name not in norms}
    return moved, rest


def filter_masks(model: nn.Module, masks: Mapping[str, Tensor],
                 example_input: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """``masks`` with every BatchNorm-scale mask replaced by the mask of its conv's filters
    (a filter is kept where its channel is), and-ed with a mask the conv already has.
    Other entries are returned unchanged."""
    moved, out = _translated(model, masks, example_input)
    if not moved:
        return out
    parameters = dict(model.named_parameters())
    for conv_weight, channels in moved.items():
        weight = parameters[conv_weight]
        channels = channels.to(torch.bool).reshape((-1,) + (1,) * (weight.dim() - 1)).expand(weight.shape)
        existing = out.get(conv_weight)
        out[conv_weight] = channels.cpu() & existing.to(torch.bool).cpu() if existing is not None else channels.cpu()
    return out


def filter_scores(model: nn.Module, scores: Mapping[str, Tensor],
                  example_input: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """``scores`` (one per output filter/channel) with every BatchNorm-scale entry moved to
    its conv (the smaller of the two where the conv has its own)."""
    moved, out = _translated(model, scores, example_input)
    for conv_weight, channel_scores in moved.items():
        existing = out.get(conv_weight)
        out[conv_weight] = channel_scores if existing is None else torch.minimum(existing, channel_scores)
    return out
