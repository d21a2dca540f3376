"""VGG-16 with batch norm for CIFAR (Simonyan & Zisserman, ICLR 2015; BN variant as in
Network Slimming, Liu et al., ICCV 2017), and the VGG-11/13/19 of the same family.

Thirteen 3x3 convs ``[64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M,
512, 512, 512, M]``, each followed by BatchNorm and ReLU; after the last max pool
the 512 feature maps (1x1 on 32x32 input) are averaged to 1x1 (so other input
sizes work too) and ``classifier`` is ``nn.Linear(512, num_classes)``, as in the
Network Slimming CIFAR VGG.

Layers sit in ``features`` (an ``nn.Sequential``) with torchvision's indexing:
each conv block takes three slots (conv, bn, relu) and each max pool one, so the
convs are ``features.0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40`` — the
names :meth:`VGG.conv_names` returns.

Parameter count for 3 channels and 10 classes: 14,728,266. This counts the conv
biases (kept as in torchvision's ``vgg16_bn`` and the common CIFAR VGG code);
Network Slimming's convs have none (``conv_bias=False``: 14,724,042).

**Widths.** Every factory takes ``widths``: one number of filters per conv, in order
(13 for VGG-16); the default is the configuration's own, so ``vgg16_bn()`` is the
network above with the same parameter names. ``vgg11_bn``, ``vgg13_bn`` and ``vgg19_bn``
use the configurations A, B and E of the VGG paper with the same BN/classifier layout.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from splitlbi.models.registry import check_widths, register_model

__all__ = ["VGG", "VGG_CFGS", "VGG16_CFG", "cfg_with_widths", "make_features", "vgg11_bn", "vgg13_bn", "vgg16_bn",
           "vgg19_bn"]

VGG16_CFG: tuple[Union[int, str], ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)

#: The VGG paper's configurations A (11 layers), B (13), D (16) and E (19), by depth.
VGG_CFGS: dict[int, tuple[Union[int, str], ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: VGG16_CFG,
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


def cfg_with_widths(cfg: tuple[Union[int, str], ...], widths: Optional[Sequence[int]],
                    model: str = "vgg") -> tuple[Union[int, str], ...]:
    """``cfg`` with its conv widths replaced, in order, by ``widths`` (``None``: ``cfg`` itself)."""
    if widths is None:
        return cfg
    convs = [item for item in cfg if item != "M"]
    values = iter(check_widths(widths, len(convs), model))
    return tuple(item if item == "M" else next(values) for item in cfg)


def make_features(cfg: tuple[Union[int, str], ...], in_channels: int, conv_bias: bool = True) -> nn.Sequential:
    """``nn.Sequential`` of ``Conv2d 3x3 (pad 1) -> BatchNorm2d -> ReLU`` for each number
    in ``cfg`` and ``MaxPool2d(2)`` for each ``"M"``."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [
                nn.Conv2d(channels, int(item), kernel_size=3, padding=1, bias=conv_bias),
                nn.BatchNorm2d(int(item)),
                nn.ReLU(inplace=True),
            ]
            channels = int(item)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """A CIFAR VGG with BN: ``features`` -> adaptive average pool to 1x1 -> ``classifier``
    (one linear layer). Init as torchvision's VGG: Kaiming-normal (fan_out) convs with
    zero bias, BN weight 1 bias 0, linear N(0, 0.01) with zero bias."""

    def __init__(
        self,
        cfg: tuple[Union[int, str], ...] = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        conv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.features = make_features(cfg, in_channels, conv_bias)
        last = [item for item in cfg if item != "M"][-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(int(last), num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def conv_names(self) -> list[str]:
        """Module names of the convs, in order: ``["features.0", "features.3", ...]``."""
        return [name for name, m in self.named_modules() if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def _vgg(depth: int, num_classes: int, in_channels: int, widths: Optional[Sequence[int]], **kwargs) -> VGG:
    cfg = cfg_with_widths(VGG_CFGS[depth], widths, f"vgg{depth}_bn")
    return VGG(cfg, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model
def vgg11_bn(num_classes: int = 10, in_channels: int = 1, widths: Optional[Sequence[int]] = None, **kwargs) -> VGG:
    """VGG-11 (configuration A) with BN for CIFAR; ``widths``: 8 conv widths; ``kwargs`` as :func:`vgg16_bn`."""
    return _vgg(11, num_classes, in_channels, widths, **kwargs)


@register_model
def vgg13_bn(num_classes: int = 10, in_channels: int = 1, widths: Optional[Sequence[int]] = None, **kwargs) -> VGG:
    """VGG-13 (configuration B) with BN for CIFAR; ``widths``: 10 conv widths; ``kwargs`` as :func:`vgg16_bn`."""
    return _vgg(13, num_classes, in_channels, widths, **kwargs)


@register_model
def vgg16_bn(num_classes: int = 10, in_channels: int = 1, widths: Optional[Sequence[int]] = None, **kwargs) -> VGG:
    """VGG-16 with BN for CIFAR (Network Slimming's classifier: ``Linear(512, classes)``).

    14,728,266 parameters for 3 channels and 10 classes (conv biases included).
    ``widths``: the 13 conv widths (default: 64, 64, 128, 128, 256 x3, 512 x6).
    ``kwargs``: ``conv_bias`` (default True; False drops the 4,224 conv biases).
    """
    return _vgg(16, num_classes, in_channels, widths, **kwargs)


@register_model
def vgg19_bn(num_classes: int = 10, in_channels: int = 1, widths: Optional[Sequence[int]] = None, **kwargs) -> VGG:
    """VGG-19 (configuration E) with BN for CIFAR; ``widths``: 16 conv widths; ``kwargs`` as :func:`vgg16_bn`."""
    return _vgg(19, num_classes, in_channels, widths, **kwargs)
