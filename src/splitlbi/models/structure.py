"""What a network is made of, as far as SplitLBI's coupling needs to know: which BatchNorm
normalizes which conv's output channels, which conv is the stem, which linear layer is the
output layer.

Two ways to find a conv's BatchNorm:

* with an example input (exact): a forward pass with hooks records the BatchNorm2d that
  reads a conv's output tensor directly;
* without one (the optimizer is often built before any data is at hand): the order in
  which the modules were registered, the convention of torchvision, timm and ours: a
  ``BatchNorm2d`` registered right after a ``Conv2d`` (no other conv, linear or norm
  layer between them) with as many features as the conv has output channels.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["conv_batchnorms", "output_layer", "stem_conv"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def conv_batchnorms(model: nn.Module, example_input: Optional[Tensor] = None) -> Dict[str, str]:
    """``{conv module name: name of the BatchNorm that normalizes its output}`` for every
    conv followed directly by an affine BatchNorm (see the module docstring for how)."""
    if example_input is not None:
        return _traced_pairs(model, example_input)
    pairs: Dict[str, str] = {}
    previous: Optional[tuple] = None  # (name, conv) of the last conv/linear/norm module seen
    for name, module in model.named_modules():
        if isinstance(module, _NORMS):
            if (previous is not None and isinstance(previous[1], _CONVS) and module.affine
                    and module.num_features == previous[1].out_channels):
                pairs[previous[0]] = name
            previous = None
        elif isinstance(module, _CONVS + (nn.Linear,)):
            previous = (name, module)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            previous = None
    return pairs


def _traced_pairs(model: nn.Module, example_input: Tensor) -> Dict[str, str]:
    convs = {module: name for name, module in model.named_modules() if isinstance(module, _CONVS)}
    norms = {module: name for name, module in model.named_modules() if isinstance(module, _NORMS) and module.affine}
    produced: Dict[int, str] = {}  # id(conv output) -> conv name
    outputs: List[Tensor] = []     # keep the outputs alive so their ids stay unique
    found: Dict[str, str] = {}

    def conv_hook(module: nn.Module, inputs, output) -> None:
        produced[id(output)] = convs[module]
        outputs.append(output)

    def norm_hook(module: nn.Module, inputs, output) -> None:
        conv = produced.get(id(inputs[0]))
        if conv is not None:
            found.setdefault(conv, norms[module])

    handles = [m.register_forward_hook(conv_hook) for m in convs]
    handles += [m.register_forward_hook(norm_hook) for m in norms]
    forward_once(model, example_input, handles)
    return found


def forward_once(model: nn.Module, example_input: Tensor, handles: list) -> None:
    """One forward pass of ``example_input`` in eval mode without gradients (for the hooks behind
    ``handles``), then the hooks removed and the training mode restored."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def stem_conv(model: nn.Module) -> Optional[str]:
    """The name of the first conv module registered (the one that reads the image), or None."""
    return next((name for name, module in model.named_modules() if isinstance(module, _CONVS)), None)


def output_layer(model: nn.Module) -> Optional[str]:
    """The name of the last ``nn.Linear`` registered (the classifier of the usual CNN), or None."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last
