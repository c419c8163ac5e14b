"""CIFAR-style ResNets (He et al. 2016): depth 6n+2, three stages, and the 4x-wide variants."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cdfast.models.base import FeatureClassifier, init_weights


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(FeatureClassifier):
    """``depth = 6n + 2``; ``widths`` = (stem, stage1, stage2, stage3) channels."""

    def __init__(self, depth: int, widths=(16, 16, 32, 64), num_classes: int = 10,
                 in_channels: int = 3, features: str = "pooled"):
        super().__init__(num_classes, in_channels, features)
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 >= 8 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, in_planes = [], widths[0]
        for stage, planes in enumerate(widths[1:]):
            for block in range(n):
                layers.append(BasicBlock(in_planes, planes, 2 if (stage > 0 and block == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def feature_map(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x))


def cifar_resnet(depth: int, wide: bool = False, **kw) -> CifarResNet:
    return CifarResNet(depth, (32, 64, 128, 256) if wide else (16, 16, 32, 64), **kw)
