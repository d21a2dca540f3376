"""AlexNet (Krizhevsky, Sutskever & Hinton, NeurIPS 2012), torchvision's single-GPU
variant ("One weird trick", Krizhevsky 2014), with torchvision's parameter names.

``features``: conv 64 11x11/4 pad 2, ReLU, max pool 3/2, conv 192 5x5 pad 2, ReLU,
max pool 3/2, conv 384 3x3, ReLU, conv 256 3x3, ReLU, conv 256 3x3, ReLU, max pool
3/2 (convs at ``features.0, 3, 6, 8, 10``); ``avgpool``: adaptive average pool to
6x6; ``classifier``: Dropout, Linear 9216->4096, ReLU, Dropout, Linear 4096->4096,
ReLU, Linear 4096->classes (linears at ``classifier.1, 4, 6``).

Parameter count for 3 channels and 1000 classes: 61,100,840. PyTorch's default init,
as torchvision. Inputs of at least 63x63 pixels (224x224 for the reference).
"""

from __future__ import annotations

import torch
from torch import nn

from splitlbi.models.registry import register_model

__all__ = ["AlexNet", "alexnet"]


class AlexNet(nn.Module):
    """torchvision's AlexNet (see the module docstring); ``dropout`` is the drop probability."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


@register_model
def alexnet(num_classes: int = 10, in_channels: int = 1, **kwargs) -> AlexNet:
    """AlexNet as in torchvision: 61,100,840 parameters for 3 channels and 1000 classes.

    ``kwargs``: ``dropout`` (default 0.5).
    """
    return AlexNet(num_classes=num_classes, in_channels=in_channels, **kwargs)
