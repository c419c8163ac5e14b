"""MobileNetV2, CIFAR variant: stride 1 in the stem and the first stages (small images)."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from cdfast.models.base import FeatureClassifier, init_weights

# (expansion, out channels, blocks, stride); ImageNet's first two stride-2 steps are 1 here.
CIFAR_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers = [] if expansion == 1 else [_conv_bn(cin, hidden, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(FeatureClassifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, features: str = "pooled",
                 width_mult: float = 1.0):
        super().__init__(num_classes, in_channels, features)
        ch = lambda c: max(8, int(round(c * width_mult / 8)) * 8)  # noqa: E731 - keep widths multiples of 8
        stem = ch(32)
        layers, cin = [_conv_bn(in_channels, stem, 3)], stem
        for expansion, cout, blocks, stride in CIFAR_CONFIG:
            for b in range(blocks):
                layers.append(InvertedResidual(cin, ch(cout), stride if b == 0 else 1, expansion))
                cin = ch(cout)
        last = ch(1280) if width_mult > 1.0 else 1280
        layers.append(_conv_bn(cin, last, 1))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def feature_map(self, x: Tensor) -> Tensor:
        return self.layers(x)
