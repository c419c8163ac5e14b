"""Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016), pre-activation blocks."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cdfast.models.base import FeatureClassifier, init_weights


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class WideResNet(FeatureClassifier):
    def __init__(self, depth: int, width: int, num_classes: int = 10, in_channels: int = 3,
                 features: str = "pooled"):
        super().__init__(num_classes, in_channels, features)
        if (depth - 4) % 6 != 0 or depth < 10 or width < 1:
            raise ValueError(f"WRN depth must be 6n+4 >= 10 and width >= 1 (e.g. wrn-16-2, wrn-40-2), got {depth}-{width}")
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers, in_planes = [], 16
        for stage, planes in enumerate(widths):
            for block in range(n):
                layers.append(PreActBlock(in_planes, planes, 2 if (stage > 0 and block == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def feature_map(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.layers(self.stem(x))))
