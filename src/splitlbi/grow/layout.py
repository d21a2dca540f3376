"""Where a network's widths live: the channel spaces of each growable family.

A *width group* is one number of a factory's ``widths=`` argument (a LeNet-5 conv, a VGG
conv, a CIFAR ResNet stage). It sizes one or more *channel spaces*: sets of feature-map
channels that some modules write (a conv's filters, the BatchNorm after it) and others
read (the next conv's input channels, the classifier's inputs). Widening a group adds
channels to each of its spaces; :mod:`splitlbi.grow.widen` uses the spaces to know which
dimension of which tensor grows and how the new entries must start so that the network
computes the same function.

A *residual* space is a ResNet stage's stream: every block adds into it, so a new channel
cannot be silenced by its readers alone (the identity shortcut carries it on); it is
silenced where it is written, by a BatchNorm scale and shift of zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError
from splitlbi.models.lenet import LENET5_WIDTHS, LeNet5
from splitlbi.models.resnet_cifar import CifarResNet, PadShortcut
from splitlbi.models.vgg import VGG

__all__ = ["ChannelSpace", "GrowthLayout", "layout_of", "uniform_widths", "GROWABLE"]

#: The model families that can grow, as ``splitlbi grow --model`` names them.
GROWABLE = "lenet5, vgg11_bn/vgg13_bn/vgg16_bn/vgg19_bn, resnet20/32/44/56/110"


@dataclass(frozen=True)
class ChannelSpace:
    """Channels whose number is width group ``group``.

    ``convs``: the convs that write them (their filters); ``norms``: the BatchNorms right
    after those convs; ``consumers``: the modules that read them (convs and linears, along
    their input dimension). ``residual``: a residual stream (see the module docstring).
    """

    group: int
    convs: Tuple[str, ...]
    norms: Tuple[str, ...]
    consumers: Tuple[str, ...]
    residual: bool = False

    @property
    def producers(self) -> Tuple[str, ...]:
        """Every module that writes these channels along its output dimension."""
        return self.convs + self.norms


#: ``place(old_widths, new_widths)`` -> for some spaces (by index), the new position of
#: each old channel; spaces left out keep their channels first and get new ones appended.
Placement = Callable[[Sequence[int], Sequence[int]], Dict[int, Tensor]]


def _append(old_widths: Sequence[int], new_widths: Sequence[int]) -> Dict[int, Tensor]:
    return {}


@dataclass(frozen=True)
class GrowthLayout:
    """The width groups of one network and the channel spaces they size.

    ``groups``: a name per width group (the conv, or ``layerK`` for a ResNet stage), in the
    order of the factory's ``widths``; ``standard``: the family's standard widths;
    ``non_decreasing``: widths may not drop from one group to the next (ResNet option A).
    """

    groups: Tuple[str, ...]
    spaces: Tuple[ChannelSpace, ...]
    standard: Tuple[int, ...]
    non_decreasing: bool = False
    place: Placement = field(default=_append, compare=False)

    def convs(self, group: int) -> List[str]:
        """The convs whose filters are group ``group``'s channels (the filters the growth rule counts)."""
        names: List[str] = []
        for space in self.spaces:
            if space.group == group:
                names.extend(name for name in space.convs if name not in names)
        return names

    def norm_of(self, conv: str) -> Optional[str]:
        """The BatchNorm right after the conv ``conv`` (None: it has none)."""
        for space in self.spaces:
            if conv in space.convs and space.norms:
                return space.norms[space.convs.index(conv)]
        return None

    def widths(self, model: nn.Module) -> Tuple[int, ...]:
        """The current widths of ``model`` (the output channels of each group's first conv)."""
        modules = dict(model.named_modules())
        return tuple(_out_channels(modules[self.convs(group)[0]]) for group in range(len(self.groups)))

    def widths_of_state(self, state: Mapping[str, Tensor]) -> Tuple[int, ...]:
        """The widths of a ``state_dict`` of this family (a checkpoint's ``model``)."""
        widths = []
        for group in range(len(self.groups)):
            key = f"{self.convs(group)[0]}.weight"
            if key not in state or not isinstance(state[key], Tensor) or state[key].dim() < 1:
                raise SplitLBIError(f"not a state_dict of this network: it has no {key}")
            widths.append(int(state[key].shape[0]))
        return tuple(widths)

    def limit(self, widths: Sequence[int]) -> Tuple[int, ...]:
        """``widths`` within the family's constraints (option A: each stage at most the next one)."""
        limited = list(widths)
        if self.non_decreasing:
            for index in range(len(limited) - 2, -1, -1):
                limited[index] = min(limited[index], limited[index + 1])
        return tuple(limited)


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    raise SplitLBIError(f"{type(module).__name__} is not a conv layer")


# --------------------------------------------------------------------------- the families


def _lenet_layout(model: LeNet5) -> GrowthLayout:
    spaces = (ChannelSpace(0, ("conv1",), (), ("conv2",)), ChannelSpace(1, ("conv2",), (), ("conv3",)),
              ChannelSpace(2, ("conv3",), (), ("fc1",)))
    return GrowthLayout(("conv1", "conv2", "conv3"), spaces, LENET5_WIDTHS)


def _vgg_layout(model: VGG) -> GrowthLayout:
    # Each conv is followed by its BatchNorm in ``features``; the last one feeds the classifier.
    modules = list(model.features.named_children())
    convs = [(name, modules[index + 1][0]) for index, (name, module) in enumerate(modules)
             if isinstance(module, nn.Conv2d)]
    spaces = []
    for index, (conv, norm) in enumerate(convs):
        reader = f"features.{convs[index + 1][0]}" if index + 1 < len(convs) else "classifier"
        spaces.append(ChannelSpace(index, (f"features.{conv}",), (f"features.{norm}",), (reader,)))
    standard = _vgg_standard(len(convs))
    return GrowthLayout(tuple(f"features.{conv}" for conv, _ in convs), tuple(spaces), standard)


def _vgg_standard(convs: int) -> Tuple[int, ...]:
    from splitlbi.models.vgg import VGG_CFGS

    for cfg in VGG_CFGS.values():
        widths = tuple(int(item) for item in cfg if item != "M")
        if len(widths) == convs:
            return widths
    raise SplitLBIError(f"a VGG with {convs} convs is not one of the VGG-11/13/16/19 configurations")


def _resnet_layout(model: CifarResNet) -> GrowthLayout:
    from splitlbi.models.resnet_cifar import CIFAR_RESNET_WIDTHS

    stages = [getattr(model, f"layer{k}") for k in (1, 2, 3)]
    spaces: List[ChannelSpace] = []
    # Per stage stream: the convs and BatchNorms that write it, the modules that read it.
    streams: List[Tuple[List[str], List[str], List[str]]] = [(["conv1"], ["bn1"], []), ([], [], []), ([], [], [])]
    for k, stage in enumerate(stages):
        convs, norms, readers = streams[k]
        for b, block in enumerate(stage):
            prefix = f"layer{k + 1}.{b}"
            # Block 0 of stages 2 and 3 reads the previous stage's stream.
            (streams[k - 1][2] if b == 0 and k > 0 else readers).append(f"{prefix}.conv1")
            if isinstance(block.shortcut, nn.Sequential):  # option B: a 1x1 projection and its BN
                streams[k - 1][2].append(f"{prefix}.shortcut.0")
                convs.append(f"{prefix}.shortcut.0")
                norms.append(f"{prefix}.shortcut.1")
            convs.append(f"{prefix}.conv2")
            norms.append(f"{prefix}.bn2")
            spaces.append(ChannelSpace(k, (f"{prefix}.conv1",), (f"{prefix}.bn1",), (f"{prefix}.conv2",)))
    streams[2][2].append("fc")
    stream_spaces = [ChannelSpace(k, tuple(convs), tuple(norms), tuple(readers), residual=True)
                     for k, (convs, norms, readers) in enumerate(streams)]
    # The stem first, so that widths() reads a stage's width from conv1 / layerK.0.conv1.
    ordered = (stream_spaces[0], *[s for s in spaces if s.group == 0], stream_spaces[1],
               *[s for s in spaces if s.group == 1], stream_spaces[2], *[s for s in spaces if s.group == 2])
    option_a = any(isinstance(block.shortcut, PadShortcut) for stage in stages for block in stage)
    place = _option_a_placement([ordered.index(s) for s in stream_spaces]) if option_a else _append
    return GrowthLayout(("layer1", "layer2", "layer3"), ordered, CIFAR_RESNET_WIDTHS, non_decreasing=option_a,
                        place=place)


def _option_a_placement(stream_spaces: List[int]) -> Placement:
    """Where the old channels of each stream go when option-A shortcuts pad stage k-1's
    ``a`` channels into stage k's ``b`` at offset ``(b - a) // 2``: a widened stage moves
    that offset, so stage k's channels that receive the shortcut move with it (the rest
    fill the free places in order). Stage 1's stream keeps its order."""

    def place(old: Sequence[int], new: Sequence[int]) -> Dict[int, Tensor]:
        previous = torch.arange(old[0])
        positions = {stream_spaces[0]: previous}
        for k in (1, 2):
            a, b, a_new, b_new = old[k - 1], old[k], new[k - 1], new[k]
            offset, offset_new = (b - a) // 2, (b_new - a_new) // 2
            moved = torch.full((b,), -1, dtype=torch.long)
            moved[offset:offset + a] = offset_new + previous
            free = [p for p in range(b_new) if p not in set(moved.tolist())]
            rest = (moved < 0).nonzero().flatten()
            moved[rest] = torch.tensor(free[:len(rest)], dtype=torch.long)
            positions[stream_spaces[k]] = previous = moved
        return positions

    return place


def layout_of(model: nn.Module) -> GrowthLayout:
    """The :class:`GrowthLayout` of a network of a growable family; :class:`SplitLBIError` otherwise."""
    if isinstance(model, LeNet5):
        return _lenet_layout(model)
    if isinstance(model, VGG):
        return _vgg_layout(model)
    if isinstance(model, CifarResNet):
        return _resnet_layout(model)
    raise SplitLBIError(f"a {type(model).__name__} cannot grow: the growable models are {GROWABLE}")


def uniform_widths(build: Callable[[Sequence[int]], nn.Module], standard: Sequence[int], target_macs: int,
                   measure: Callable[[nn.Module], int]) -> Tuple[int, ...]:
    """The widths ``round(m * standard)`` (at least 1 each) whose MACs are nearest ``target_macs``
    over multipliers ``m`` in (0, 1] (bisection on ``m``; MACs grow with ``m``): the uniformly
    narrowed network of a given cost. Rounding keeps the order of ``standard``'s widths, so a
    family whose widths may not decrease (ResNet option A) stays valid.

    ``build(widths)`` makes the network, ``measure(network)`` counts its MACs.
    """
    def widths_at(multiplier: float) -> Tuple[int, ...]:
        return tuple(max(1, int(math.floor(multiplier * w + 0.5))) for w in standard)

    cache: Dict[Tuple[int, ...], int] = {}

    def macs(widths: Tuple[int, ...]) -> int:
        if widths not in cache:
            cache[widths] = measure(build(widths))
        return cache[widths]

    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if macs(widths_at(middle)) < target_macs:
            low = middle
        else:
            high = middle
    candidates = {widths_at(low), widths_at(high)}
    return min(candidates, key=lambda widths: (abs(macs(widths) - target_macs), widths))
