"""Standard augmentation as batched tensor ops (random crop with padding, horizontal flip)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without a sync: pinned, then an asynchronous copy."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def pad_crop_flip(x: Tensor, pad: int, gen: torch.Generator, flip: bool = True,
                  part_of: tuple[int, int] | None = None) -> Tensor:
    """Per-sample random ``pad``-pixel translation crop and a coin-flip mirror, batched.

    Random numbers come from ``gen`` (a CPU generator, so the stream is the same on
    every device) and reach ``x``'s device in one asynchronous copy from pinned memory
    (a pageable copy would make the host wait for the GPU every batch).
    ``part_of=(start, total)``: ``x`` is samples ``start:start + len(x)`` of a batch of ``total``
    (a data-parallel rank's share): the draws are those of the whole batch, so every rank's
    stream and crops are what one process would have made, and only the share is transformed.
    """
    b, _, h, w = x.shape
    start, total = part_of if part_of is not None else (0, b)
    # Draw in the same order as always (offsets, then mirror), only what is used: the CPU stream stays the same.
    offsets = torch.randint(0, 2 * pad + 1, (2, total), generator=gen) if pad > 0 else torch.zeros(2, total, dtype=torch.int64)
    mirror = (torch.rand(total, generator=gen) < 0.5).long() if flip else torch.zeros(total, dtype=torch.int64)
    offsets, mirror = offsets[:, start:start + b], mirror[start:start + b]
    draws = _to_device(torch.cat([offsets.reshape(-1), mirror]), x.device)
    offsets, mirror = draws[:2 * b].view(2, b), draws[2 * b:].bool()
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x
