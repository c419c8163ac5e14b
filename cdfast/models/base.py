"""What every cdfast model is: a classifier that also returns its features."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

FEATURE_MODES = ("pooled", "map")


class FeatureClassifier(nn.Module):
    """Base of the built-in models: ``forward(x) -> (logits [B, K], features)``.

    ``features="pooled"`` returns the pooled penultimate features ``[B, D]``;
    ``features="map"`` returns the last feature map ``[B, C, H, W]``.
    Subclasses implement :meth:`feature_map` and set ``self.fc``.
    """

    def __init__(self, num_classes: int, in_channels: int, features: str):
        super().__init__()
        if features not in FEATURE_MODES:
            raise ValueError(f"features must be one of {FEATURE_MODES}, got {features!r}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
        self.num_classes, self.in_channels, self.features = num_classes, in_channels, features

    def feature_map(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        fmap = self.feature_map(x)
        pooled = fmap.mean((2, 3))  # global average pool (vmap-friendly, unlike adaptive_avg_pool2d)
        return self.fc(pooled), (pooled if self.features == "pooled" else fmap)


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions, unit BatchNorm, small linear layers (the CIFAR ResNet recipe)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def split_output(i: int, out) -> tuple[Tensor, Tensor | None]:
    """``(logits, features)`` of network i's output; features are None for a logits-only network."""
    if isinstance(out, Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0], out[1]
    raise TypeError(f"network {i} must return logits or (logits, features), got {type(out).__name__}")
