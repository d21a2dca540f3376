"""ImageNet ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

The architecture and the parameter names are exactly torchvision's
(``torchvision.models.resnet``): ``conv1`` 7x7/2, ``bn1``, ``relu``, ``maxpool``,
``layer1``..``layer4``, ``avgpool``, ``fc``; blocks with ``conv1, bn1, conv2, bn2
[, conv3, bn3]`` and a ``downsample`` = ``Sequential(conv1x1, bn)`` projection
where the shape changes; ResNet v1.5 (the bottleneck's stride sits on its 3x3
conv). A torchvision ``state_dict`` therefore loads as is (for ``in_channels=3``).

Parameter counts with 1000 classes and 3 input channels:
``resnet18`` 11,689,512 and ``resnet50`` 25,557,032.

:class:`BasicBlock`, :class:`Bottleneck`, :func:`make_stage` and
:func:`init_resnet_weights` are reused by the CIFAR ResNet-50 in ``resnet_cifar.py``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from splitlbi.models.registry import register_model

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "conv1x1",
    "conv3x3",
    "init_resnet_weights",
    "make_stage",
    "resnet18",
    "resnet50",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BN follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (a BN follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 (stride here: ResNet v1.5) -> 1x1 (expand x4), each with BN."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[type[BasicBlock], type[Bottleneck]]


def make_stage(block: Block, inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """A stage of ``blocks`` residual blocks; the first one strides and, when the shape
    changes, gets a ``downsample = Sequential(conv1x1, BatchNorm2d)`` projection."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            conv1x1(inplanes, planes * block.expansion, stride),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_resnet_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's ResNet init: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 and
    bias 0; with ``zero_init_residual`` the last BN of every block starts at 0 (each
    block then starts as the identity). Linear layers keep PyTorch's default init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet: 7x7/2 stem, 3x3/2 max pool, four stages of widths
    64/128/256/512 (times the block's expansion) with strides 1/2/2/2, global average
    pool, ``fc``."""

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
        for index, (planes, blocks, stride) in enumerate(zip(widths, layers, strides), start=1):
            setattr(self, f"layer{index}", make_stage(block, self.inplanes, planes, blocks, stride))
            self.inplanes = planes * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_resnet_weights(self, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register_model
def resnet18(num_classes: int = 10, in_channels: int = 1, **kwargs) -> ResNet:
    """ResNet-18 (He et al. 2016), torchvision's layout: BasicBlocks [2, 2, 2, 2].

    11,689,512 parameters for 1000 classes and 3 input channels (BN included).
    ``kwargs``: ``zero_init_residual``.
    """
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def resnet50(num_classes: int = 10, in_channels: int = 1, **kwargs) -> ResNet:
    """ResNet-50 v1.5 (He et al. 2016), torchvision's layout: Bottlenecks [3, 4, 6, 3].

    25,557,032 parameters for 1000 classes and 3 input channels (BN included).
    ``kwargs``: ``zero_init_residual``.
    """
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, **kwargs)
