"""David Page's ResNet-9 (myrtle.ai, "How to train your ResNet", 2018), the DAWNBench net that
airbench descends from.

Unlike the CIFAR ResNets of resnet.py it halves the feature map by max pooling, has residual
blocks in two of its three stages only, ends in a global max pool and scales the logits by a
constant (Page: 0.125) so the initial outputs are small without touching the init:

    prep    conv 3->64
    layer1  conv 64->128, max pool 2, residual(conv 128->128, conv 128->128)
    layer2  conv 128->256, max pool 2
    layer3  conv 256->512, max pool 2, residual(conv 512->512, conv 512->512)
    head    global max pool, linear 512->classes (no bias), x logit_scale

Every conv is 3x3, stride 1, padding 1, without bias, then BatchNorm and ReLU; the pool sits
between a layer's conv and its BatchNorm, which Page found as accurate and cheaper (the
BatchNorm and ReLU then see a quarter of the pixels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cifar_run.errors import UserError


class ConvBN(nn.Sequential):
    """conv 3x3 (no bias), optionally max pool 2, BatchNorm, ReLU."""

    def __init__(self, c_in: int, c_out: int, pool: bool = False) -> None:
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class Residual(nn.Module):
    """x + conv_bn(conv_bn(x)), the channel count kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res1 = ConvBN(channels, channels)
        self.res2 = ConvBN(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


class PageResNet9(nn.Module):
    """6,573,120 parameters for 10 classes and the default widths."""

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (64, 128, 256, 512),
        logit_scale: float = 0.125,
    ) -> None:
        super().__init__()
        widths = list(widths)
        if len(widths) != 4 or not all(isinstance(w, int) and w > 0 for w in widths):
            raise UserError(
                f"model.widths={widths}: must be 4 positive channel counts "
                "(prep, layer1, layer2, layer3)"
            )
        if not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(f"model.num_classes={num_classes}: must be a positive integer")
        prep, w1, w2, w3 = widths
        self.prep = ConvBN(3, prep)
        self.layer1 = nn.Sequential(ConvBN(prep, w1, pool=True), Residual(w1))
        self.layer2 = ConvBN(w1, w2, pool=True)
        self.layer3 = nn.Sequential(ConvBN(w2, w3, pool=True), Residual(w3))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(w3, num_classes, bias=False)
        self.logit_scale = float(logit_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.linear(self.flatten(self.pool(x))) * self.logit_scale
