"""The perturbation operations: strong, batched, device-agnostic image transforms.

Every op takes a normalized float batch ``x [B, C, H, W]``, its labels ``y [B]``
and a :class:`PerturbRNG`, and returns a :class:`Perturbed` batch. Every random
number an op uses (per-sample boxes and matrices, and the per-batch noise std,
mixing weight and cut-out box alike) is drawn on the batch's device from the
pool's seeded generator for that device: an op never reads a value back to the
host and never copies one to the device, so it runs without a sync and can be
captured in a CUDA graph (the graph engine registers the generator). An op that
mixes images also mixes labels: the loss is
``lam * CE(z, y_a) + (1 - lam) * CE(z, y_b)``, with ``lam`` a 0-d device tensor.
"""

from __future__ import annotations

import functools
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
    "ClampedNoise",
    "JitterBlur",
    "RandomFlip",
    "RandomRotation",
    "BatchRotation",
    "HorizontalFlip",
    "VerticalFlip",
    "BatchJitterBlur",
]


@dataclass
class Perturbed:
    """A perturbed batch and its (possibly mixed) labels."""

    x: Tensor
    y_a: Tensor
    y_b: Tensor
    lam: float | Tensor  # weight of y_a: 1.0 when labels are not mixed, a 0-d device tensor when drawn
    op: str | None = None  # the op's name, for a view made outside the pool (e.g. by a DALI pipeline)

    @property
    def mixes_labels(self) -> bool:
        """Whether the loss needs ``y_b``: a drawn (tensor) weight, or a number below 1. No sync."""
        return isinstance(self.lam, Tensor) or self.lam < 1.0


class PerturbRNG:
    """Seeded randomness of the pool: a host RNG for the choices of network and op (they pick
    which code runs, so they are host values), one generator per device for everything an op draws."""

    def __init__(self, seed: int, rank: int = 0):
        self.seed = seed
        self.rank = rank  # data parallel: the host choices agree across ranks, the device draws differ
        self.host = random.Random(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._seeds: dict[str, int] = {}

    def on(self, device: torch.device) -> torch.Generator:
        key = str(torch.device(device))
        if key not in self._generators:
            gen = torch.Generator(device=device)
            self._seeds[key] = self.seed + 1 + len(self._generators) + (0x9E3779B1 * self.rank) % 2**62
            gen.manual_seed(self._seeds[key])
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
        for key, gen in self._generators.items():
            if key not in state["generators"]:  # made after that state was taken: back to its first draw
                gen.manual_seed(self._seeds[key])  # in place: a CUDA graph may hold this generator
        for key, gen_state in state["generators"].items():
            device = torch.device(key)
            if device.type == "cuda" and not torch.cuda.is_available():
                continue  # a run moved off the GPU (a recorded change): its CPU generator is seeded afresh
            self.on(device).set_state(gen_state)


def _uniform(low: float, high: float, n: int, x: Tensor, rng: PerturbRNG) -> Tensor:
    gen = rng.on(x.device)
    return low + (high - low) * torch.rand(n, generator=gen, device=x.device, dtype=torch.float32)


def _beta(alpha: float, x: Tensor, rng: PerturbRNG) -> Tensor:
    """One draw of Beta(alpha, alpha) as a 0-d float32 tensor on x's device: g1 / (g1 + g2) with
    g1, g2 ~ Gamma(alpha) (the same law as ``random.betavariate(alpha, alpha)``)."""
    g = torch._standard_gamma(torch.full((2,), float(alpha), device=x.device), generator=rng.on(x.device))
    return g[0] / g.sum()


def _randint(high: int, x: Tensor, rng: PerturbRNG) -> Tensor:
    """One uniform integer in [0, high) as a 0-d int64 tensor on x's device (like ``randrange``)."""
    return (_uniform(0.0, float(high), 1, x, rng).floor().long()).clamp(max=high - 1)[0]


def _per_channel(values, x: Tensor) -> Tensor | None:
    """Per-channel values (the pool's black or white level) as a ``[1, C, 1, 1]`` tensor like x; None stays None."""
    return None if values is None else _channel_tensor(tuple(float(v) for v in values), x.dtype, x.device)


@functools.cache  # never evicted: a CUDA graph that read an entry keeps reading its memory
def _channel_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Made once per (values, dtype, device), never written: a host-to-device copy on every batch
    # would sync the step and cannot be captured in a CUDA graph (the warm-up step makes it first).
    # A handful of entries per process (one per pool fill level, dtype and device).
    return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def _sample(x: Tensor, grid: Tensor, fill) -> Tensor:
    """``grid_sample`` whose outside is ``fill`` per channel (the normalized black), not 0 (the mean)."""
    if fill is None:
        return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    f = _per_channel(fill, x)
    return F.grid_sample(x - f, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False) + f


def _warp(x: Tensor, theta: Tensor, fill=None) -> Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return _sample(x, grid, fill)


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
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        # The region lies inside the image, but its outer samples fall up to half an input pixel beyond
        # the outer pixel centres: "border" interpolates them from the edge pixels, as a real crop
        # does, where zero padding would blend black into the crop's edges (up to (1 - w) / 2 of it).
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return _same_labels(out, y)


class GaussianNoise:
    """Add Gaussian noise to the normalized image; the std is drawn per batch from ``std``."""

    name = "noise"

    def __init__(self, std: tuple[float, float] = (0.1, 0.5)):
        self.std = std

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        sigma = _uniform(*self.std, 1, x, rng).to(x.dtype)
        noise = torch.randn(x.shape, generator=rng.on(x.device), device=x.device, dtype=x.dtype)
        return _same_labels(x + sigma * noise, y)


def _partner(x: Tensor, rng: PerturbRNG) -> Tensor:
    """A uniform random permutation of the batch: the order of uniform keys (rand + sort, which a
    CUDA graph captures on every torch version; ties have probability ~0)."""
    return torch.argsort(_uniform(0.0, 1.0, x.shape[0], x, rng))


class Mixup:
    """Image fusion: blend every image with another of the batch, ``lam ~ Beta(a, a)``."""

    name = "mixup"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        lam = _beta(self.alpha, x, rng)
        perm = _partner(x, rng)
        w = lam.to(x.dtype)
        mixed = w * x + (1.0 - w) * x.index_select(0, perm)
        return Perturbed(x=mixed, y_a=y, y_b=y.index_select(0, perm), lam=lam)


class CutMix:
    """Splicing: paste a random box of another image; labels mixed by the pasted area."""

    name = "cutmix"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        h, w = x.shape[-2:]
        # The box: side ratio sqrt(1 - Beta(a, a)), centre uniform over the pixels, clipped to the
        # image; every number stays on the device (a mask, not slicing by host ints).
        ratio = (1.0 - _beta(self.alpha, x, rng)).sqrt()
        half_h, half_w = (h * ratio).floor().long() // 2, (w * ratio).floor().long() // 2
        cy, cx = _randint(h, x, rng), _randint(w, x, rng)
        y0, y1 = (cy - half_h).clamp(min=0), (cy + half_h).clamp(max=h)
        x0, x1 = (cx - half_w).clamp(min=0), (cx + half_w).clamp(max=w)
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        box = ((rows >= y0) & (rows < y1)).unsqueeze(1) & ((cols >= x0) & (cols < x1)).unsqueeze(0)
        perm = _partner(x, rng)
        out = torch.where(box, x.index_select(0, perm), x)
        lam = 1.0 - ((y1 - y0) * (x1 - x0)).float() / (h * w)
        return Perturbed(x=out, y_a=y, y_b=y.index_select(0, perm), lam=lam)


class RandomAffine:
    """Deformation: a random rotation, scale, shear and shift per sample."""

    name = "affine"
    fill = None  # per-channel value outside the image (set by the pool: the normalized black)

    per_batch = False  # one draw for the whole batch (torchvision's transforms on a batch tensor) or one per sample

    def __init__(self, degrees: float = 30.0, scale: tuple[float, float] = (0.8, 1.2),
                 shear: float = 15.0, translate: float = 0.15):
        self.degrees, self.scale, self.shear, self.translate = degrees, scale, shear, translate

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        b = x.shape[0]
        n = 1 if self.per_batch else b

        def draw(low: float, high: float) -> Tensor:
            return _uniform(low, high, n, x, rng).expand(b)

        angle = torch.deg2rad(draw(-self.degrees, self.degrees))
        shear = torch.tan(torch.deg2rad(draw(-self.shear, self.shear)))
        inv_scale = 1.0 / draw(*self.scale)
        tx = draw(-self.translate, self.translate) * 2  # the shift of the output, in [-1, 1] coords
        ty = draw(-self.translate, self.translate) * 2
        cos, sin = angle.cos() * inv_scale, angle.sin() * inv_scale
        # theta maps output to input coordinates: rotation/scale, then a shear along x (the matrix A),
        # and -A t, so that the image moves by exactly t whatever A (a bare t would be a shift of the
        # input, which A turns and scales).
        a, b_, c, d = cos + shear * sin, -sin + shear * cos, sin, cos
        theta = torch.stack([
            torch.stack([a, b_, -(a * tx + b_ * ty)], 1),
            torch.stack([c, d, -(c * tx + d * ty)], 1),
        ], 1)
        return _same_labels(_warp(x, theta, self.fill), y)


class ElasticWarp:
    """Deformation: a smooth random displacement field (coarse noise, upsampled)."""

    name = "elastic"
    fill = None  # per-channel value outside the image (set by the pool: the normalized black)

    def __init__(self, magnitude: float = 0.08, grid: int = 4):
        self.magnitude, self.grid = magnitude, grid

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        b, _, h, w = x.shape
        coarse = torch.randn(b, 2, self.grid, self.grid, generator=rng.on(x.device),
                             device=x.device, dtype=torch.float32)
        flow = F.interpolate(coarse * self.magnitude, size=(h, w), mode="bicubic", align_corners=False)
        identity = torch.eye(2, 3, device=x.device).expand(b, 2, 3)
        grid = F.affine_grid(identity, [b, 1, h, w], align_corners=False) + flow.permute(0, 2, 3, 1)
        return _same_labels(_sample(x, grid, self.fill), y)


# ---- the authors' pool (their code, not the paper's text): noise then clamp, colour jitter and
# blur, flips, rotation; with mixup. ----------------------------------------------------------------

class ClampedNoise:
    """Gaussian noise of std ``std`` on the normalized image, clamped to the valid pixel range."""

    name = "noise-clamp"
    fill = None   # the normalized black per channel (set by the pool); None: no clamp below
    white = None  # the normalized white per channel (set by the pool); None: no clamp above

    def __init__(self, std: float = 1.0):
        self.std = std

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        noisy = x + self.std * torch.randn(x.shape, generator=rng.on(x.device), device=x.device, dtype=x.dtype)
        low, high = _per_channel(self.fill, x), _per_channel(self.white, x)
        if low is not None or high is not None:
            noisy = torch.clamp(noisy, low, high)
        return _same_labels(noisy, y)


class JitterBlur:
    """Colour jitter (brightness and contrast factors in ``[1 - s, 1 + s]``, per sample) then a
    Gaussian blur (``sigma`` uniform in ``blur``, per sample, 5x5 kernel, reflected borders)."""

    name = "jitter-blur"
    fill = None  # the normalized black per channel (set by the pool): brightness scales pixels towards it

    def __init__(self, strength: float = 0.4, blur: tuple[float, float] = (0.1, 2.0), kernel: int = 5):
        self.strength, self.blur, self.kernel = strength, blur, kernel

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        b, c, h, w = x.shape
        black = _per_channel(self.fill if self.fill is not None else [0.0] * c, x)
        bright = _uniform(1 - self.strength, 1 + self.strength, b, x, rng).to(x.dtype).view(b, 1, 1, 1)
        contrast = _uniform(1 - self.strength, 1 + self.strength, b, x, rng).to(x.dtype).view(b, 1, 1, 1)
        x = black + bright * (x - black)  # pixel * factor, in normalized units
        mean = x.mean((1, 2, 3), keepdim=True)
        x = mean + contrast * (x - mean)
        sigma = _uniform(*self.blur, b, x, rng).view(b, 1)
        k = self.kernel
        offsets = torch.arange(k, device=x.device, dtype=torch.float32) - (k - 1) / 2
        g = torch.exp(-offsets.square() / (2 * sigma.square()))
        g = (g / g.sum(1, keepdim=True)).to(x.dtype)  # [b, k]
        weight = (g[:, :, None] * g[:, None, :]).repeat_interleave(c, 0).unsqueeze(1)  # [b*c, 1, k, k]
        padded = F.pad(x.reshape(1, b * c, h, w), (k // 2,) * 4, mode="reflect" if min(h, w) > k // 2 else "replicate")
        return _same_labels(F.conv2d(padded, weight, groups=b * c).view(b, c, h, w), y)


class RandomFlip:
    """Mirror each sample left-right and (independently) upside-down, each with probability 1/2."""

    name = "flip"

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        b = x.shape[0]
        coins = _uniform(0.0, 1.0, 2 * b, x, rng).view(2, b, 1, 1, 1) < 0.5
        x = torch.where(coins[0], x.flip(-1), x)
        return _same_labels(torch.where(coins[1], x.flip(-2), x), y)


class RandomRotation(RandomAffine):
    """Rotation by an angle uniform in ``[-degrees, degrees]`` per sample (nothing else)."""

    name = "rotate"

    def __init__(self, degrees: float = 30.0):
        super().__init__(degrees=degrees, scale=(1.0, 1.0), shear=0.0, translate=0.0)


# ---- the authors' pool as their code applies it: torchvision transforms on the whole batch tensor,
# so one draw per batch; hflip and vflip are two ops of their own. ----------------------------------

class BatchRotation(RandomRotation):
    """Rotation of the whole batch by one angle uniform in ``[-degrees, degrees]`` (torchvision's
    ``RandomRotation(30)`` on a batch tensor, as the authors' code applies it)."""

    name = "rotate-batch"
    per_batch = True


class _WholeBatchFlip:
    """The whole batch mirrored along ``dim`` (no draw: the op itself is the randomness, the pool picks it)."""

    deterministic = True
    dim: int

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        return _same_labels(x.flip(self.dim), y)


class HorizontalFlip(_WholeBatchFlip):
    """The whole batch mirrored left-right (the authors' ``hflip``)."""

    name, dim = "hflip", -1


class VerticalFlip(_WholeBatchFlip):
    """The whole batch turned upside-down (the authors' ``vflip``)."""

    name, dim = "vflip", -2


class BatchJitterBlur:
    """The authors' colour op: torchvision's ``ColorJitter(brightness=0.25, contrast=0.15,
    saturation=0.15, hue=0.15)`` then ``GaussianBlur(kernel_size=(7, 9))`` (sigma uniform in
    [0.1, 2.0]) on the whole batch tensor, as their code applies them: one factor of each kind and
    one sigma per batch, in pixel space (the normalized ``[black, white]`` mapped to [0, 1], clamped
    there like torchvision's float images). The factors are drawn on the device; the four
    adjustments run in torchvision's listed order (it shuffles the order per call). Saturation and
    hue leave 1-channel images unchanged, as torchvision's do. Without the pool's levels the batch
    is taken as pixel values already."""

    name = "jitter-blur-batch"
    fill = None   # the normalized black per channel (set by the pool)
    white = None  # the normalized white per channel (set by the pool)

    def __init__(self, brightness: float = 0.25, contrast: float = 0.15, saturation: float = 0.15,
                 hue: float = 0.15, blur: tuple[float, float] = (0.1, 2.0), kernel: tuple[int, int] = (7, 9)):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.blur, self.kernel = blur, kernel  # kernel: (width, height), torchvision's order

    def __call__(self, x: Tensor, y: Tensor, rng: PerturbRNG) -> Perturbed:
        from torchvision.transforms.v2.functional import rgb_to_grayscale

        b, c, h, w = x.shape
        if c not in (1, 3):
            raise ValueError(f"jitter-blur-batch takes 1- or 3-channel images (torchvision's ColorJitter), got {c} channels")
        xf = x.float()  # the pixel mapping in float32 even for bf16/fp16 batches
        black, white = _per_channel(self.fill, xf), _per_channel(self.white, xf)
        levels = black is not None and white is not None
        p = (xf - black) / (white - black) if levels else xf
        u = _uniform(0.0, 1.0, 5, x, rng)
        factor = lambda k, s: 1.0 - s + 2.0 * s * u[k]  # noqa: E731 - uniform in [1 - s, 1 + s]
        clamp = (lambda t: t.clamp(0.0, 1.0)) if levels else (lambda t: t)  # noqa: E731
        p = clamp(p * factor(0, self.brightness))
        mean = (p if c == 1 else rgb_to_grayscale(p)).mean((1, 2, 3), keepdim=True)  # per image, as torchvision
        p = clamp(mean + factor(1, self.contrast) * (p - mean))
        if c == 3:
            gray = rgb_to_grayscale(p)
            p = clamp(gray + factor(2, self.saturation) * (p - gray))
            p = _shift_hue(p, (u[3] - 0.5) * 2.0 * self.hue)
        p = _blur(p, _uniform(*self.blur, 1, x, rng), self.kernel)
        out = p * (white - black) + black if levels else p
        return _same_labels(out.to(x.dtype), y)


def _shift_hue(p: Tensor, shift: Tensor) -> Tensor:
    """RGB images in [0, 1] with their hue turned by ``shift`` (a fraction of the circle; a device
    tensor): to HSV, turn, back (the standard hexcone formulas, as torchvision's ``adjust_hue``,
    written here with no host tensor, so the op stays capturable in a CUDA graph)."""
    r, g, b = p.unbind(1)
    v, low = p.amax(1), p.amin(1)
    chroma = v - low
    flat = chroma == 0
    s = chroma / torch.where(flat, torch.ones_like(v), v)
    div = torch.where(flat, torch.ones_like(chroma), chroma)
    rc, gc, bc = (v - r) / div, (v - g) / div, (v - b) / div
    hue = torch.where(v == r, bc - gc, torch.where(v == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(flat, torch.zeros_like(hue), hue)
    hue = torch.remainder(hue / 6.0 + shift, 1.0)
    h6 = hue * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sector = torch.remainder(sector, 6.0)
    lo, down, up = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))

    def pick(*values: Tensor) -> Tensor:  # the value of each pixel's sector, 0..5
        out = values[5]
        for k in range(4, -1, -1):
            out = torch.where(sector == k, values[k], out)
        return out

    return torch.stack([pick(v, down, lo, lo, up, v), pick(up, v, v, down, lo, lo), pick(lo, lo, up, v, v, down)], 1)


def _blur(p: Tensor, sigma: Tensor, kernel: tuple[int, int]) -> Tensor:
    """One Gaussian blur for the whole batch, ``sigma`` a device tensor, ``kernel`` (width, height),
    reflected borders (torchvision's ``gaussian_blur``)."""
    b, c, h, w = p.shape
    kx, ky = kernel

    def taps(k: int) -> Tensor:
        offsets = torch.arange(k, device=p.device, dtype=torch.float32) - (k - 1) / 2
        g = torch.exp(-0.5 * (offsets / sigma).square())
        return g / g.sum()

    weight = (taps(ky)[:, None] * taps(kx)[None, :]).expand(c, 1, ky, kx)
    mode = "reflect" if h > ky // 2 and w > kx // 2 else "replicate"
    padded = F.pad(p, (kx // 2, kx // 2, ky // 2, ky // 2), mode=mode)
    return F.conv2d(padded, weight.to(p.dtype), groups=c)
