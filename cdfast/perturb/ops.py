"""The perturbation operations: strong, batched, device-agnostic image transforms.

Every op takes a normalized float batch ``x [B, C, H, W]``, its labels ``y [B]``
and a :class:`PerturbRNG`, and returns a :class:`Perturbed` batch. Per-sample
random parameters are drawn on the batch's device, so the ops run on CPU and
GPU tensors alike without copies; scalar choices come from a host RNG. An op
that mixes images also mixes labels: the loss is
``lam * CE(z, y_a) + (1 - lam) * CE(z, y_b)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Perturbed",
    "PerturbRNG",
    "RandomResizedCrop",
    "GaussianNoise",
    "Mixup",
    "CutMix",
    "RandomAffine",
    "ElasticWarp",
]


@dataclass
class Perturbed:
    """A perturbed batch and its (possibly mixed) labels."""

    x: Tensor
    y_a: Tensor
    y_b: Tensor
    lam: float  # weight of y_a; 1.0 when labels are not mixed


class PerturbRNG:
    """Seeded randomness of the pool: a host RNG for scalars, one generator per device for tensors."""

    def __init__(self, seed: int):
        self.seed = seed
        self.host = random.Random(seed)
        self._generators: dict[str, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        key = str(torch.device(device))
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + 1 + len(self._generators))
            self._generators[key] = gen
        return self._generators[key]

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "host": self.host.getstate(),
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.host.setstate(state["host"])
        for key, gen_state in state["generators"].items():
            device = torch.device(key)
            if device.type == "cuda" and not torch.cuda.is_available():
                continue  # a run moved off the GPU (a recorded change): its CPU generator is seeded afresh
            self.on(device).set_state(gen_state)


def _uniform(low: float, high: float, n: int, x: Tensor, rng: PerturbRNG) -> Tensor:
    gen = rng.on(x.device)
    return low + (high - low) * torch.rand(n, generator=gen, device=x.device, dtype=torch.float32)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _same_labels(x: Tensor, y: Tensor) -> Perturbed:
    return Perturbed(x=x, y_a=y, y_b=y, lam=1.0)


class RandomResizedCrop:
    """Crop a random region of ``scale`` of the area (per sample) and resize it back."""

    name = "crop"

    def __init__(self, scale: tuple[float, float] = (0.3, 0.7), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
        self.scale, self.ratio = scale, ratio

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        b = x.shape[0]
        area = _uniform(*self.scale, b, x, rng)
        log_ratio = _uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), b, x, rng)
        aspect = log_ratio.exp()
        w = (area * aspect).sqrt().clamp(max=1.0)  # fraction of the width
        h = (area / aspect).sqrt().clamp(max=1.0)
        cx = (2 * _uniform(0.0, 1.0, b, x, rng) - 1) * (1 - w)  # centre in [-1, 1] coords
        cy = (2 * _uniform(0.0, 1.0, b, x, rng) - 1) * (1 - h)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        return _same_labels(_warp(x, theta), y)


class GaussianNoise:
    """Add Gaussian noise to the normalized image; the std is drawn per batch from ``std``."""

    name = "noise"

    def __init__(self, std: tuple[float, float] = (0.1, 0.5)):
        self.std = std

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        sigma = rng.host.uniform(*self.std)
        noise = torch.randn(x.shape, generator=rng.on(x.device), device=x.device, dtype=x.dtype)
        return _same_labels(x + sigma * noise, y)


def _partner(x: Tensor, rng: PerturbRNG) -> Tensor:
    return torch.randperm(x.shape[0], generator=rng.on(x.device), device=x.device)


class Mixup:
    """Image fusion: blend every image with another of the batch, ``lam ~ Beta(a, a)``."""

    name = "mixup"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        lam = rng.host.betavariate(self.alpha, self.alpha)
        perm = _partner(x, rng)
        mixed = lam * x + (1.0 - lam) * x.index_select(0, perm)
        return Perturbed(x=mixed, y_a=y, y_b=y.index_select(0, perm), lam=lam)


class CutMix:
    """Splicing: paste a random box of another image; labels mixed by the pasted area."""

    name = "cutmix"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        h, w = x.shape[-2:]
        ratio = math.sqrt(1.0 - rng.host.betavariate(self.alpha, self.alpha))
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy, cx = rng.host.randrange(h), rng.host.randrange(w)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        perm = _partner(x, rng)
        out = x.clone()
        out[..., y0:y1, x0:x1] = x.index_select(0, perm)[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        return Perturbed(x=out, y_a=y, y_b=y.index_select(0, perm), lam=lam)


class RandomAffine:
    """Deformation: a random rotation, scale, shear and shift per sample."""

    name = "affine"

    def __init__(self, degrees: float = 30.0, scale: tuple[float, float] = (0.8, 1.2),
                 shear: float = 15.0, translate: float = 0.15):
        self.degrees, self.scale, self.shear, self.translate = degrees, scale, shear, translate

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        b = x.shape[0]
        angle = torch.deg2rad(_uniform(-self.degrees, self.degrees, b, x, rng))
        shear = torch.tan(torch.deg2rad(_uniform(-self.shear, self.shear, b, x, rng)))
        inv_scale = 1.0 / _uniform(*self.scale, b, x, rng)
        tx = _uniform(-self.translate, self.translate, b, x, rng) * 2
        ty = _uniform(-self.translate, self.translate, b, x, rng) * 2
        cos, sin = angle.cos() * inv_scale, angle.sin() * inv_scale
        # theta maps output to input coordinates: rotation/scale, then a shear along x.
        theta = torch.stack([
            torch.stack([cos + shear * sin, -sin + shear * cos, tx], 1),
            torch.stack([sin, cos, ty], 1),
        ], 1)
        return _same_labels(_warp(x, theta), y)


class ElasticWarp:
    """Deformation: a smooth random displacement field (coarse noise, upsampled)."""

    name = "elastic"

    def __init__(self, magnitude: float = 0.08, grid: int = 4):
        self.magnitude, self.grid = magnitude, grid

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        b, _, h, w = x.shape
        coarse = torch.randn(b, 2, self.grid, self.grid, generator=rng.on(x.device),
                             device=x.device, dtype=torch.float32)
        flow = F.interpolate(coarse * self.magnitude, size=(h, w), mode="bicubic", align_corners=False)
        identity = torch.eye(2, 3, device=x.device).expand(b, 2, 3)
        grid = F.affine_grid(identity, [b, 1, h, w], align_corners=False) + flow.permute(0, 2, 3, 1)
        out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
        return _same_labels(out, y)
