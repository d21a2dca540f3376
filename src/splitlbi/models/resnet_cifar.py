"""CIFAR ResNets: the 6n+2-layer networks of He et al. 2016 and a bottleneck ResNet-50.

**ResNet-20/32/44/56/110** (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016, Sec. 4.2): a 3x3 stem conv with 16 filters (no max pool),
three stages of ``n`` BasicBlocks with 16/32/64 filters on 32x32/16x16/8x8 maps,
global average pool, ``fc``; depth ``6n + 2``. Shortcuts where the shape changes:

* ``shortcut="A"`` (default; the paper's CIFAR option and DessiLBI's code):
  parameter-free, the input subsampled with the stride and zero-padded in channels;
* ``shortcut="B"``: a projection ``Sequential(conv1x1, BatchNorm2d)``.

Parameter counts with option A, 3 input channels and 10 classes (BN weights and
biases and the fc bias included): resnet20 269,722 (0.27M), resnet32 464,154,
resnet44 658,586, resnet56 853,018, resnet110 1,727,962.

Parameter names: ``conv1, bn1, layer1.0.conv1, layer1.0.bn1, layer1.0.conv2, ...,
layer3.{n-1}.bn2, fc`` (and ``layerK.0.shortcut.0/1`` with option B).

**Widths.** ``widths=(w1, w2, w3)`` sets the filters of each stage (default ``(16, 32,
64)``): the stem and every conv of stage k have ``wk`` filters (the residual stream of a
stage and its blocks' inner convs share one width), and ``fc`` takes ``w3`` inputs.
Option A pads the stream from ``w(k-1)`` to ``wk`` channels, so it needs
``w1 <= w2 <= w3``; option B has no such limit.

**ResNet-50 for CIFAR** (``resnet50_cifar``): the bottleneck ResNet-50 of pruning
papers (Network Slimming, Liu et al. 2017; lottery tickets / rethinking pruning):
torchvision's ResNet-50 (see ``resnet.py``, same parameter names) with a 3x3/1
stem of 64 filters and no max pool: 23,520,842 parameters for 3 channels and 10
classes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from splitlbi.models import resnet as _imagenet
from splitlbi.errors import SplitLBIError
from splitlbi.models.registry import check_widths, register_model

__all__ = [
    "CifarBasicBlock",
    "CifarResNet",
    "PadShortcut",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet50_cifar",
    "CIFAR_RESNET_WIDTHS",
]

SHORTCUTS = ("A", "B")

#: Filters per stage of the CIFAR ResNets of He et al. 2016.
CIFAR_RESNET_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option A shortcut: ``x[:, :, ::stride, ::stride]`` zero-padded from ``in_planes``
    to ``planes`` channels (half the new channels before, half after, as in the
    reference code). No parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.in_planes = in_planes
        self.pad_before = (planes - in_planes) // 2
        self.pad_after = planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = getattr(self, "in_planes", None)  # modules pickled before it was recorded: unchecked
        if expected is not None and x.shape[1] != expected:
            # Plain Torch-Pruning traces F.pad as element-wise and prunes the stages together; the
            # network it builds would fail later with a shape error that names no cause.
            raise RuntimeError(
                f"option-A shortcut expects {expected} input channels, got {x.shape[1]}: the network "
                f"was pruned without splitlbi's shortcut pruner; build Torch-Pruning pruners with "
                f"customized_pruners=splitlbi.prune.prepare_torch_pruning(model)")
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


def make_shortcut(in_planes: int, planes: int, stride: int, option: str) -> nn.Module:
    """The identity when the shape is kept, else option A (:class:`PadShortcut`) or B
    (``Sequential(conv1x1, BatchNorm2d)``)."""
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if option == "A":
        return PadShortcut(in_planes, planes, stride)
    return nn.Sequential(_imagenet.conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))


class CifarBasicBlock(nn.Module):
    """Two 3x3 convs with BN; ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = _imagenet.conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _imagenet.conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = make_shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def check_depth(depth: int) -> int:
    """Blocks per stage ``n`` for a depth ``6n + 2``; ``ValueError`` otherwise."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
    return (depth - 2) // 6


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet of He et al. 2016 (see the module docstring).

    Init as torchvision's ResNets: Kaiming-normal (fan_out) convs, BN weight 1 bias 0.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A",
                 widths: Sequence[int] = CIFAR_RESNET_WIDTHS) -> None:
        super().__init__()
        option = str(shortcut).upper()
        if option not in SHORTCUTS:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        blocks = check_depth(depth)
        stages = check_widths(widths, len(CIFAR_RESNET_WIDTHS), f"resnet{depth}")
        if option == "A" and list(stages) != sorted(stages):
            # Option A zero-pads the stream into the next stage: it cannot drop channels.
            raise SplitLBIError(f"widths of resnet{depth} with shortcut A must not decrease from stage to stage, "
                                f"got {stages!r} (use shortcut='B' for other widths)")
        self.depth, self.shortcut_type = depth, option
        self.conv1 = _imagenet.conv3x3(in_channels, stages[0])
        self.bn1 = nn.BatchNorm2d(stages[0])
        in_planes = stages[0]
        for index, (planes, stride) in enumerate(zip(stages, (1, 2, 2)), start=1):
            strides = [stride] + [1] * (blocks - 1)
            stage = []
            for s in strides:
                stage.append(CifarBasicBlock(in_planes, planes, s, option))
                in_planes = planes
            setattr(self, f"layer{index}", nn.Sequential(*stage))
        self.fc = nn.Linear(stages[-1], num_classes)
        _imagenet.init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def _cifar_resnet(depth: int, num_classes: int, in_channels: int, widths: Optional[Sequence[int]] = None,
                  **kwargs) -> CifarResNet:
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels,
                       widths=CIFAR_RESNET_WIDTHS if widths is None else widths, **kwargs)


@register_model
def resnet20(num_classes: int = 10, in_channels: int = 1, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016): 269,722 parameters (option A, 3 channels, 10 classes).

    ``kwargs``: ``shortcut="A"`` (zero-padding, default) or ``"B"`` (1x1 conv + BN);
    ``widths=(w1, w2, w3)`` filters per stage (default ``(16, 32, 64)``; every CIFAR ResNet).
    """
    return _cifar_resnet(20, num_classes, in_channels, **kwargs)


@register_model
def resnet32(num_classes: int = 10, in_channels: int = 1, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016): 464,154 parameters (option A, 3 channels, 10 classes)."""
    return _cifar_resnet(32, num_classes, in_channels, **kwargs)


@register_model
def resnet44(num_classes: int = 10, in_channels: int = 1, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR (He et al. 2016): 658,586 parameters (option A, 3 channels, 10 classes)."""
    return _cifar_resnet(44, num_classes, in_channels, **kwargs)


@register_model
def resnet56(num_classes: int = 10, in_channels: int = 1, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016): 853,018 parameters (option A, 3 channels, 10 classes)."""
    return _cifar_resnet(56, num_classes, in_channels, **kwargs)


@register_model
def resnet110(num_classes: int = 10, in_channels: int = 1, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR (He et al. 2016): 1,727,962 parameters (option A, 3 channels, 10 classes)."""
    return _cifar_resnet(110, num_classes, in_channels, **kwargs)


@register_model
def resnet50_cifar(num_classes: int = 10, in_channels: int = 1, **kwargs) -> _imagenet.ResNet:
    """Bottleneck ResNet-50 for CIFAR, as in pruning papers (Network Slimming, Liu et al.
    2017; Frankle & Carbin 2019; Liu et al. 2019 "Rethinking the value of pruning").

    torchvision's ResNet-50 (Bottlenecks [3, 4, 6, 3], widths 64/128/256/512 x4,
    strides 1/2/2/2, projection shortcuts named ``downsample``, v1.5) with ``conv1``
    a 3x3/1 conv of 64 filters and no max pool (``maxpool`` is an ``nn.Identity``).
    23,520,842 parameters (≈23.5M) for 3 channels and 10 classes.
    ``kwargs``: ``zero_init_residual``.
    """
    model = _imagenet.ResNet(
        _imagenet.Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, **kwargs
    )
    model.conv1 = _imagenet.conv3x3(in_channels, 64)
    model.maxpool = nn.Identity()
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
