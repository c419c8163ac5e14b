"""Learnable adapters that map a student's features to a teacher's feature shape.

When the networks of a group return features of different shapes, student i
cannot be compared with teacher j directly. For every ordered pair (i, j)
whose per-sample shapes differ, student i owns an adapter ``A_ij``; the feature
loss is ``mean((A_ij(F_i) - F_j)^2)`` and ``A_ij`` is trained by student i's
optimizer. The choice per shape:

- pooled vectors ``[D_i] -> [D_j]``: a linear layer;
- feature maps ``[C_i, H_i, W_i] -> [C_j, H_j, W_j]``: a 1x1 convolution
  (C_i -> C_j), then adaptive average pooling or bilinear resizing to (H_j, W_j);
- anything else (e.g. a map against a vector): flatten, then a linear layer.

Because the teacher changes every step and is only known on the device,
every student evaluates its adapters towards every other network and the loss
keeps the term of the elected teacher; the other adapters get a zero gradient
that step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cdfast.models.base import split_output


class MapAdapter(nn.Module):
    def __init__(self, src: tuple[int, ...], dst: tuple[int, ...]):
        super().__init__()
        self.proj = nn.Conv2d(src[0], dst[0], 1, bias=False)
        self.size = tuple(dst[1:])

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        if tuple(x.shape[-2:]) == self.size:
            return x
        if x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


class FlatAdapter(nn.Module):
    def __init__(self, src: tuple[int, ...], dst: tuple[int, ...]):
        super().__init__()
        self.proj = nn.Linear(math.prod(src), math.prod(dst))
        self.dst = dst

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.flatten(1)).view(x.shape[0], *self.dst)


def make_adapter(src: tuple[int, ...], dst: tuple[int, ...]) -> nn.Module:
    if len(src) == 3 and len(dst) == 3:
        return MapAdapter(src, dst)
    return FlatAdapter(src, dst)


class FeatureAdapters(nn.Module):
    """All adapters of a group, built from the per-sample feature shapes of its networks."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        self.pairs = nn.ModuleDict({
            f"{i}_{j}": make_adapter(si, sj)
            for i, si in enumerate(self.shapes) for j, sj in enumerate(self.shapes)
            if i != j and si != sj
        })

    @property
    def needed(self) -> bool:
        return len(self.pairs) > 0

    def adapt(self, i: int, j: int, feats: Tensor) -> Tensor:
        key = f"{i}_{j}"
        return self.pairs[key](feats) if key in self.pairs else feats

    def parameters_of(self, student: int) -> list[nn.Parameter]:
        return [p for key, m in self.pairs.items() if int(key.split("_")[0]) == student for p in m.parameters()]


def probe_feature_shapes(networks: Sequence[nn.Module], input_shape: Sequence[int]) -> list[tuple[int, ...]] | None:
    """Run every network once on a tiny dummy batch to learn its per-sample feature shape.

    None when a network returns logits only. BatchNorm statistics are untouched (eval mode).
    """
    shapes = []
    for i, net in enumerate(networks):
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        was_training = net.training
        net.eval()  # keeps BatchNorm statistics untouched
        try:
            with torch.no_grad():
                out = net(torch.zeros(2, *input_shape, device=device, dtype=dtype))
        except Exception as e:  # noqa: BLE001 - re-raised with the context users need
            raise ValueError(
                f"network {i} ({type(net).__name__}) cannot take images of shape {list(input_shape)}: {e}"
            ) from e
        finally:
            net.train(was_training)
        _, feats = split_output(i, out)
        shapes.append(tuple(feats.shape[1:]) if feats is not None else None)
    if any(s is None for s in shapes):
        return None
    return shapes
