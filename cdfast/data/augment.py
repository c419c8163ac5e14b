"""Standard augmentation as batched tensor ops (random crop with padding, horizontal flip)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pad_crop_flip(x: Tensor, pad: int, gen: torch.Generator, flip: bool = True) -> Tensor:
    """Per-sample random ``pad``-pixel translation crop and a coin-flip mirror, batched.

    Random numbers come from ``gen`` (a CPU generator, so the stream is the same on
    every device) and are moved to ``x``'s device.
    """
    b, _, h, w = x.shape
    if pad > 0:
        offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=gen).to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        mirror = (torch.rand(b, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(mirror, x.flip(-1), x)
    return x
