"""An in-memory batch loader for data sets that fit in memory (Fashion-MNIST, CIFAR).

The whole set stays as uint8; each batch is gathered, converted, augmented and
normalized as one tensor op, with no DataLoader workers. The shuffle and
augmentation draw from one seeded CPU generator whose state is part of the
checkpoint, with the order and position of an epoch in progress, so a run resumed
at any batch sees exactly the batches it would have seen.
Pass ``device="cuda"`` to keep the images on the GPU.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from cdfast.data.augment import pad_crop_flip


def saved_order(order: Tensor) -> Tensor:
    """An epoch's order as a checkpoint keeps it: int32 (half the bytes) where the indices fit."""
    return order.to(torch.int32 if order.numel() < 2**31 else torch.int64)


class TensorLoader:
    resumes_mid_epoch = True  # its state_dict() taken between batches continues at the next batch

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
        self._progress: list | None = None  # the epoch being iterated: [its order (CPU), the next batch]
        self._resume: tuple[Tensor, int] | None = None  # from load_state_dict: where the next iteration starts

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.images.shape[0]
        resume, self._resume = self._resume, None
        if resume is not None:  # an epoch a checkpoint saved mid-way: its order, from its next batch
            order, first = resume
        else:
            order, first = (torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)), 0
        self._progress = mine = [order, first]
        on_device = order.to(self.device)
        try:
            for k in range(first, len(self)):
                idx = on_device[k * self.batch_size:(k + 1) * self.batch_size]
                total, start = idx.shape[0], 0
                if self.world > 1:  # this rank's contiguous share, the only images it gathers and augments
                    share = -(-total // self.world)
                    start = min(self.rank * share, total)
                    idx = idx[start:start + share]
                x = self.images.index_select(0, idx).float()
                if self.augment_pad is not None:  # on raw pixels, so the padding is black (0), not the mean
                    x = pad_crop_flip(x, self.augment_pad, self.generator, part_of=(start, total))
                mine[1] = k + 1  # batch k's draws are made: a state taken now continues after it
                if x.shape[0] == 0:  # a last evaluation batch smaller than the ranks: nothing for this one
                    continue
                yield (x - self.mean) / self.std, self.labels.index_select(0, idx)
        finally:  # finished or abandoned: the next iteration is a new epoch (unless one has begun already)
            if self._progress is mine:
                self._progress = None

    def state_dict(self) -> dict:
        """The generator; between two batches of an epoch also that epoch's order and its next batch."""
        state = {"generator": self.generator.get_state()}
        position = self._progress if self._progress is not None else self._resume  # iterating, or loaded
        if position is not None and 0 < position[1] < len(self):
            order, next_batch = position
            state["epoch_order"] = saved_order(order)
            state["next_batch"] = next_batch
        return state

    def load_state_dict(self, state: dict) -> None:
        if "next_batch" in state:
            order, next_batch = state["epoch_order"], state["next_batch"]
            n = self.images.shape[0]
            if (not isinstance(order, Tensor) or order.shape != (n,) or not isinstance(next_batch, int)
                    or not 0 <= next_batch < len(self)):
                raise ValueError(f"the saved position within an epoch does not fit this data ({n} images, "
                                 f"{len(self)} batches of {self.batch_size}): it was saved for another data set")
            self._resume = (order.long(), next_batch)
        else:
            self._resume = None
        self.generator.set_state(state["generator"])
