"""LeNet-5 (LeCun et al., 1998, "Gradient-based learning applied to document recognition"),
adapted to 3x32x32 colour input as in reference report 000: ReLU and max pooling, the
modern reading of the original's squashing non-linearity and sub-sampling layers."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """conv 6@5x5, pool, conv 16@5x5, pool, FC 120, 84, classes: 62,006 parameters for 10."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        # Pooling before the ReLU: the two commute, relu(max(a)) == max(relu(a)), with the same
        # gradients bit for bit (the same element wins where the maximum is positive, and
        # elsewhere the gradient is zero either way), and the ReLU then touches a quarter of
        # the values, which shortens a CPU training step (docs/speed.md). The state dict is
        # the same as in the usual order.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
