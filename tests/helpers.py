"""Small helpers shared by the tests."""

import gzip
from pathlib import Path

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
    """A stand-in CUDA graph: replay() runs the recorded step body again, with what a real graph
    freezes at capture time put back for the replay: the learning-rate tensor objects, every other
    optimizer setting, the group's loss settings, every layer's train/eval flag, BatchNorm momentum
    and eps, and which parameters take gradients. So a change the engine fails to notice (or
    a number it fails to write into the captured lr tensor) shows up as a difference from eager."""

    GROUP_SETTINGS = ("mode", "teachers", "alpha", "beta", "temperature", "feature_loss", "perturbed_bn",
                      "matched_inputs", "election", "autocast_dtype", "channels_last")

    def __init__(self, group, body):
        self.group, self.body = group, body
        self.frozen_groups = [[dict(pg) for pg in opt.param_groups] for opt in group.optimizers]
        self.frozen_settings = {k: getattr(group, k) for k in self.GROUP_SETTINGS}
        self.frozen_layers = self._layers()

    def _layers(self):
        """Per layer and parameter: train/eval flags, BatchNorm momentum and eps, requires_grad."""
        modules = [m for net in self.group.networks for m in net.modules()]
        return ([(m, "training", m.training) for m in modules]
                + [(m, k, getattr(m, k)) for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for k in ("momentum", "eps")]
                + [(p, "requires_grad", p.requires_grad) for p in self.group.parameters()])

    @staticmethod
    def _set(layers):
        for obj, k, v in layers:
            if k == "requires_grad":
                obj.requires_grad_(v)
            else:
                setattr(obj, k, v)

    def replay(self):
        group = self.group
        live_groups = [[dict(pg) for pg in opt.param_groups] for opt in group.optimizers]
        live_settings = {k: getattr(group, k) for k in self.GROUP_SETTINGS}
        live_layers = self._layers()
        self._set(self.frozen_layers)
        for opt, frozen in zip(group.optimizers, self.frozen_groups):
            for pg, values in zip(opt.param_groups, frozen):
                pg.update(values)
        for k, v in self.frozen_settings.items():
            setattr(group, k, v)
        try:
            for opt in group.optimizers:
                opt.zero_grad(set_to_none=True)  # a captured backward writes its gradients afresh
            self.body()
            for opt in group.optimizers:
                opt.zero_grad(set_to_none=True)  # and leaves p.grad as it was: None
        finally:
            for opt, live in zip(group.optimizers, live_groups):
                for pg, values in zip(opt.param_groups, live):
                    pg.update(values)
            for k, v in live_settings.items():
                setattr(group, k, v)
            self._set(live_layers)


def graph_engine_on_cpu(group):
    """Run a group's graph engine logic on the CPU: its five CUDA parts (can-capture, memory pool,
    side-stream warm-up, record, replay) replaced by a stand-in whose graph re-runs the recorded body."""
    gs = group._graph_step

    def warmup(x, y, r, op):
        result = group._eager_step(x, y, r, op)
        for opt in group.optimizers:
            opt.zero_grad(set_to_none=True)
        return result

    gs._can_capture = lambda device: True
    gs._new_pool = lambda device: None
    gs._warmup_step = warmup
    gs._record = lambda body: _ReplayBody(group, body)
    gs._replay = lambda graph: graph.replay()
    return gs


def synthetic_fashion_mnist(folder: Path, train: int = 512, test: int = 256, seed: int = 0) -> Path:
    """Random 28x28 images with labels i % 10 in Fashion-MNIST's IDX files (gzip), for machines without
    the real data (the GPU machine): tests of the training machinery, not of accuracy."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            with gzip.open(folder / f"{stem}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.numpy().tobytes())
    return folder
