"""LeNet-5 (LeCun et al. 1998) as used for MNIST in the SplitLBI/DessiLBI paper."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from splitlbi.models.registry import check_widths, register_model

__all__ = ["LENET5_WIDTHS", "LeNet5", "lenet5"]

#: Filters of ``conv1``, ``conv2``, ``conv3`` in the standard LeNet-5.
LENET5_WIDTHS = (6, 16, 120)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling, for 28x28 inputs.

    ``conv1`` 5x5 (padding 2) -> ReLU -> maxpool 2 -> ``conv2`` 5x5 -> ReLU -> maxpool 2
    -> ``conv3`` 16->120 5x5 (the paper's "C5": 1x1 output on 28x28 input, its 120
    filters are the ones of Fig. 1) -> ReLU -> ``fc1`` 120->84 -> ReLU -> ``fc2`` 84->classes.

    Other input sizes: C5's output is reduced to 1x1 by a global max pool, which is
    the identity on 28x28 inputs (so the network there is exactly LeNet-5) and keeps
    the same parameters for e.g. 32x32 inputs, where C5 gives 2x2.

    ``widths``: the filters of ``conv1``, ``conv2``, ``conv3`` (default
    :data:`LENET5_WIDTHS`, the network above); ``fc1`` takes ``widths[2]`` inputs.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 widths: Sequence[int] = LENET5_WIDTHS) -> None:
        super().__init__()
        c1, c2, c3 = check_widths(widths, len(LENET5_WIDTHS), "lenet5")
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=5)
        self.fc1 = nn.Linear(c3, 84)
        self.fc2 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_max_pool2d(F.relu(self.conv3(x)), 1)  # identity on 28x28 input
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


@register_model
def lenet5(num_classes: int = 10, in_channels: int = 1, widths: Optional[Sequence[int]] = None) -> LeNet5:
    """LeNet-5 for 28x28 images (61,706 parameters for 1 channel and 10 classes).

    ``widths``: filters of conv1, conv2, conv3 (default ``(6, 16, 120)``).
    """
    return LeNet5(num_classes=num_classes, in_channels=in_channels, 
                  widths=LENET5_WIDTHS if widths is None else widths)
