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


class _ReplayBody:
    """A stand-in CUDA graph: replay() runs the recorded step body again."""

    def __init__(self, group, body):
        self.group, self.body = group, body

    def replay(self):
        for opt in self.group.optimizers:
            opt.zero_grad(set_to_none=True)  # a captured backward writes its gradients afresh
        self.body()


def graph_engine_on_cpu(group):
    """Run a group's graph engine logic on the CPU: its four CUDA parts (can-capture, memory pool,
    side-stream warm-up, record) replaced by a stand-in whose graph re-runs the recorded body."""
    gs = group._graph_step
    gs._can_capture = lambda device: True
    gs._new_pool = lambda: None
    gs._warmup_step = lambda x, y, r, op: group._eager_step(x, y, r, op)
    gs._record = lambda body: _ReplayBody(group, body)
    return gs
