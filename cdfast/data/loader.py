"""An in-memory batch loader for data sets that fit in memory (Fashion-MNIST, CIFAR).

The whole set stays as uint8; each batch is gathered, converted, augmented and
normalized as one tensor op, with no DataLoader workers. The shuffle and
augmentation draw from one seeded CPU generator whose state is part of the
checkpoint, so a resumed run sees exactly the batches it would have seen.
Pass ``device="cuda"`` to keep the images on the GPU.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from cdfast.data.augment import pad_crop_flip


class TensorLoader:
    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        drop_last: bool = False,
        augment_pad: int | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world: int = 1,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"need one label per image: {images.shape[0]} images, labels {list(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and images.shape[0] < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {images.shape[0]} training images")
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.batch_size, self.shuffle, self.drop_last, self.augment_pad = batch_size, shuffle, drop_last, augment_pad
        c = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1) * 255
        self.generator = torch.Generator().manual_seed(seed)
        # Data parallel: ``batch_size`` is the global batch; every rank draws the same order and
        # augmentation (one generator stream, as in one process) and keeps its contiguous share.
        if not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, world={world}), got {rank}")
        if world > 1 and drop_last and batch_size % world:  # training: equal shares (evaluation may be uneven)
            raise ValueError(f"the global batch size {batch_size} must be a multiple of the {world} ranks")
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.images.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for k in range(len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            total, start = idx.shape[0], 0
            if self.world > 1:  # this rank's contiguous share, the only images it gathers and augments
                share = -(-total // self.world)
                start = min(self.rank * share, total)
                idx = idx[start:start + share]
            x = self.images.index_select(0, idx).float()
            if self.augment_pad is not None:  # on raw pixels, so the padding is black (0), not the mean
                x = pad_crop_flip(x, self.augment_pad, self.generator, part_of=(start, total))
            if x.shape[0] == 0:  # a last evaluation batch smaller than the ranks: nothing for this one
                continue
            yield (x - self.mean) / self.std, self.labels.index_select(0, idx)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
