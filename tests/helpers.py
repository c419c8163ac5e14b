"""Small helpers shared by the tests."""

import torch
import torch.nn as nn


class TinyNet(nn.Module):
    """A fast stand-in network: conv, pool, linear; returns (logits, features)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, feat_dim: int = 8, feature_map: bool = False):
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.conv = nn.Conv2d(in_channels, feat_dim, 3, padding=1)
        self.fc = nn.Linear(feat_dim, num_classes)
        self.feature_map = feature_map

    def forward(self, x):
        fmap = torch.relu(self.conv(x))
        pooled = fmap.mean((2, 3))
        return self.fc(pooled), (fmap if self.feature_map else pooled)
