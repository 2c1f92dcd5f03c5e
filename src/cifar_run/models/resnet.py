"""CIFAR ResNets: one family for every depth, plus torchvision's ImageNet ResNet-18.

The CIFAR family follows He, Zhang, Ren and Sun (2016), "Deep Residual Learning for Image
Recognition" (CVPR), section 4.2, and kuangliu/pytorch-cifar (``models/resnet.py``): a 3x3
stem convolution without max pooling, stages of BasicBlocks (two 3x3 convolutions, each with
BatchNorm, ReLU after the addition), the first block of every stage after the first halving
the feature map, then global average pooling and one linear layer.

Two shortcut types are offered for blocks that change the shape:

- ``conv``: a 1x1 convolution with stride plus BatchNorm (projection, He's option B), as in
  kuangliu/pytorch-cifar; ``resnet9`` and ``resnet18`` use it.
- ``pad``: the parameter-free identity of He's option A used for the CIFAR experiments:
  subsample by taking every second pixel, then zero-pad the new channels; ``resnet20``,
  ``resnet32`` and ``resnet56`` use it.

Weights keep PyTorch's default initialisation (as kuangliu/pytorch-cifar does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cifar_run.errors import UserError

BLOCKS = ("basic",)
SHORTCUTS = ("conv", "pad")


class PadShortcut(nn.Module):
    """He et al.'s option A: ``x[:, :, ::stride, ::stride]`` with zero channels added."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, zero channels={self.pad_before}+{self.pad_after}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "conv"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.label = f"{in_planes}->{planes} s{stride}"  # for layer_summary
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "conv":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = PadShortcut(in_planes, planes, stride)
        if not isinstance(self.shortcut, nn.Identity):
            self.label += f", {shortcut} shortcut"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _positive_int_list(key: str, value: object) -> list[int]:
    if isinstance(value, int) or not isinstance(value, Sequence) or isinstance(value, str):
        raise UserError(f"model.{key}={value!r}: must be a list of positive integers")
    if len(value) == 0:
        raise UserError(f"model.{key}=[]: must list at least one stage")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"model.{key}[{i}]={v!r}: must be an integer >= 1")
    return list(value)


class ResNet(nn.Module):
    """A CIFAR ResNet: stem, ``len(depths)`` stages of blocks, global average pool, linear.

    Args:
        num_classes: outputs of the final linear layer.
        depths: blocks per stage, e.g. ``[2, 2, 2, 2]`` (ResNet-18) or ``[5, 5, 5]`` (ResNet-32).
        widths: channels per stage, same length as ``depths``.
        stem_width: channels of the 3x3 stem convolution.
        block: residual block type; only ``basic`` (two 3x3 convolutions).
        shortcut: ``conv`` (1x1 conv + BN projection) or ``pad`` (option A, no parameters)
            for the blocks that change channels or resolution.
        in_channels: input image channels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        depths: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        block: str = "basic",
        shortcut: str = "conv",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        depths = _positive_int_list("depths", depths)
        widths = _positive_int_list("widths", widths)
        if len(depths) != len(widths):
            raise UserError(
                f"model.depths has {len(depths)} stages but model.widths has {len(widths)}; "
                "give one width per stage"
            )
        ints = {"stem_width": stem_width, "in_channels": in_channels, "num_classes": num_classes}
        for key, v in ints.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"model.{key}={v!r}: must be an integer >= 1")
        if block not in BLOCKS:
            raise UserError(f"model.block={block!r}: allowed: {', '.join(BLOCKS)}")
        if shortcut not in SHORTCUTS:
            raise UserError(f"model.shortcut={shortcut!r}: allowed: {', '.join(SHORTCUTS)}")

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
        in_planes = stem_width
        stages = []
        for i, (depth, planes) in enumerate(zip(depths, widths, strict=True)):
            if shortcut == "pad" and planes < in_planes:
                prev = f"model.widths[{i - 1}]" if i else "model.stem_width"
                before = f"{prev}={in_planes}"
                raise UserError(
                    f"model.widths[{i}]={planes}: shortcut=pad can only add channels "
                    f"({before}); use shortcut=conv or a width >= {in_planes}"
                )
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


def torchvision_resnet18(num_classes: int = 10, weights: str | None = None) -> nn.Module:
    """``torchvision.models.resnet18``: ImageNet stem (7x7 stride-2 conv and max pool).

    ``weights=None``: random initialisation (report 000). ``weights="IMAGENET1K_V1"`` (or
    ``"DEFAULT"``): torchvision's ImageNet weights, downloaded once into torch's hub cache,
    with a new randomly initialised classifier for ``num_classes`` outputs (fine-tuning).
    """
    from torchvision.models import ResNet18_Weights, resnet18

    if weights is None:
        return resnet18(weights=None, num_classes=num_classes)
    allowed = ["DEFAULT", *(w.name for w in ResNet18_Weights)]
    if weights not in allowed:
        raise UserError(f"model.weights={weights}: unknown; allowed: null, {', '.join(allowed)}")
    if torch.get_default_device().type == "meta":
        # The config checks build models on the meta device, to look at their layers: that
        # must not download anything.
        return resnet18(weights=None, num_classes=num_classes)
    try:
        model = resnet18(weights=ResNet18_Weights[weights])
    except (OSError, RuntimeError, ValueError) as exc:  # offline, refused, corrupt download
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model.weights={weights}: cannot load torchvision's ImageNet weights ({reason}); "
            f"they download once into {torch.hub.get_dir()}/checkpoints (needs internet), "
            "or use model.weights=null"
        ) from None
    if num_classes != model.fc.out_features:
        # ImageNet's 1000-way head does not fit: a fresh one (seeded like any init).
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model
