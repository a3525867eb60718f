"""ResNet-18/34/50/101/152 (He et al. 2015) in plain torch.

The layout matches the reference ImageNet models (so parameter counts agree:
11,689,512 for ResNet-18 and 25,557,032 for ResNet-50 at 1000 classes).
Small images (<= 64 px by default) get the CIFAR stem: one 3x3 stride-1
convolution and no max-pool, otherwise 32x32 inputs would shrink to 1x1
after the stem.
"""

from __future__ import annotations

import torch
from torch import nn

_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projected) shortcut."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3(planes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * self.expansion, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in "ResNet v1.5"), 1x1 expand."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv1(cin, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3 = _conv1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * self.expansion, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv1(cin, cout, stride), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """Stem, four stages of residual blocks, global average pool, linear head."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int,
        small_input: bool,
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        kind, counts = _DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        if small_input:
            self.stem = nn.Sequential(
                _conv3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        stages, cin = [], width
        for i, n in enumerate(counts):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride=2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # each block starts as identity: helps large-batch training
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))


def resnet(
    num_classes: int,
    image_shape: tuple[int, int, int],
    depth: int = 50,
    width: int = 64,
    small_input: bool | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet of ``depth`` (18/34/50/101/152); ``small_input`` None: CIFAR stem if <= 64 px."""
    if depth not in _DEPTHS:
        raise ValueError(f"depth must be one of {sorted(_DEPTHS)}, got {depth}")
    if small_input is None:
        small_input = max(image_shape[1], image_shape[2]) <= 64
    return ResNet(depth, num_classes, image_shape[0], small_input, width, zero_init_residual)


def resnet18(
    num_classes: int,
    image_shape: tuple[int, int, int],
    width: int = 64,
    small_input: bool | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-18."""
    return resnet(num_classes, image_shape, 18, width, small_input, zero_init_residual)


def resnet50(
    num_classes: int,
    image_shape: tuple[int, int, int],
    width: int = 64,
    small_input: bool | None = None,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50."""
    return resnet(num_classes, image_shape, 50, width, small_input, zero_init_residual)
