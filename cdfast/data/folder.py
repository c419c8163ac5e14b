"""ImageNet-layout folders (``root/train/<class>/*.JPEG``, ``root/val/<class>/*``) via torchvision."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def folder_mean_std(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalization of image folders: ImageNet's statistics for RGB, 0.5 / 0.5 for grey."""
    return (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else ((0.5,), (0.5,))


def _transforms(image_size: int, train: bool, in_channels: int):
    from torchvision.transforms import v2 as T

    if in_channels not in (1, 3):
        raise ValueError(f"image folders are read as RGB (3 channels) or grey (1 channel), not {in_channels}")
    mean, std = folder_mean_std(in_channels)
    gray = [T.Grayscale(1)] if in_channels == 1 else [T.RGB()]
    if train:
        geometry = [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(int(round(image_size * 256 / 224)), antialias=True), T.CenterCrop(image_size)]
    return T.Compose([T.PILToTensor(), *gray, *geometry, T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


SKIP_HINT = "remove or replace the file, or pass --skip-bad-images to skip unreadable images with a warning"


class BadImageError(ValueError):
    """An image file cannot be read or decoded; the message names it."""


def _checked_folder(root: Path, transform):
    """An ImageFolder whose unreadable samples come back as ``(None, (path, reason))`` instead of raising
    inside a worker, so the main process can name the file (or skip it, if asked)."""
    from torchvision.datasets import ImageFolder

    class CheckedImageFolder(ImageFolder):
        def __getitem__(self, index):
            path, _ = self.samples[index]
            try:
                return super().__getitem__(index)
            except Exception as e:  # noqa: BLE001 - any decode failure is reported with the file's name
                return None, (path, f"{type(e).__name__}: {e}")

    return CheckedImageFolder(str(root), transform=transform)


def _collate(samples):
    """A batch of the readable samples, and the unreadable ones' (path, reason)."""
    good = [s for s in samples if s[0] is not None]
    bad = [s[1] for s in samples if s[0] is None]
    return (default_collate(good) if good else None), bad


class _RankSeed:
    """A DataLoader worker's seeds offset by the rank: the workers of every rank get the same base seed
    from the shared generator (which also orders the batches), and would augment alike without it."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        import random

        seed = (torch.initial_seed() + 1_000_003 * self.rank) % 2**63
        torch.manual_seed(seed)
        random.seed(seed)


class RankShare(torch.utils.data.Sampler):
    """Batches of indices for one rank of a data-parallel job: every rank draws the same order
    (one seeded generator) and keeps its contiguous share of each global batch; training drops
    the last partial global batch."""

    def __init__(self, n: int, global_batch: int, train: bool, generator: torch.Generator, rank: int, world: int):
        if train and global_batch % world:
            raise ValueError(f"the global batch size {global_batch} must be a multiple of the {world} ranks")
        self.n, self.batch, self.train, self.generator, self.rank, self.world = n, global_batch, train, generator, rank, world

    def __len__(self) -> int:
        return self.n // self.batch if self.train else -(-self.n // self.batch)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator) if self.train else torch.arange(self.n)
        for k in range(len(self)):
            chunk = order[k * self.batch:(k + 1) * self.batch]
            share = -(-chunk.shape[0] // self.world)
            mine = chunk[self.rank * share:(self.rank + 1) * share]
            if mine.numel():
                yield mine.tolist()


class FolderLoader:
    """A seeded DataLoader over an ImageFolder split; its generator state goes into checkpoints.

    Unreadable images stop the run with an error naming the file, or, with
    ``skip_bad_images``, are left out of their batch and counted in a warning.
    Empty files are found before training starts.
    """

    def __init__(self, root: Path, train: bool, batch_size: int, workers: int, image_size: int,
                 in_channels: int, seed: int, subset: int | None = None, skip_bad_images: bool = False,
                 rank: int = 0, world: int = 1):
        self.dataset = _checked_folder(root, _transforms(image_size, train, in_channels))
        self.skip_bad_images, self.skipped = skip_bad_images, set()
        empty = [path for path, _ in self.dataset.samples if os.path.getsize(path) == 0]
        if empty:
            if not skip_bad_images:
                raise BadImageError(f"{len(empty)} empty image file(s) in {root}, e.g. {empty[0]}; {SKIP_HINT}")
            warnings.warn(f"cdfast: skipping {len(empty)} empty image file(s) in {root}, e.g. {empty[0]}", stacklevel=2)
            empty_set = set(empty)
            self.dataset.samples = [s for s in self.dataset.samples if s[0] not in empty_set]
            self.dataset.imgs, self.dataset.targets = self.dataset.samples, [t for _, t in self.dataset.samples]
        dataset = self.dataset
        if subset is not None and subset < len(dataset):
            pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:subset]
            dataset = torch.utils.data.Subset(dataset, pick.tolist())
        self.generator = torch.Generator().manual_seed(seed)
        common = dict(num_workers=workers, generator=self.generator, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, collate_fn=_collate)
        if world > 1:  # data parallel: this rank's share of every global batch, augmented with its own draws
            sampler = RankShare(len(dataset), batch_size, train, self.generator, rank, world)
            self.loader = DataLoader(dataset, batch_sampler=sampler, worker_init_fn=_RankSeed(rank), **common)
        else:
            self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train, **common)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch, bad in self.loader:
            if bad:
                if not self.skip_bad_images:
                    path, reason = bad[0]
                    raise BadImageError(f"cannot read image {path} ({reason}); {SKIP_HINT}")
                new = [(p, why) for p, why in bad if p not in self.skipped]
                self.skipped.update(p for p, _ in new)
                if new:
                    warnings.warn(f"cdfast: skipped unreadable image {new[0][0]} ({new[0][1]}); "
                                  f"{len(self.skipped)} skipped so far", stacklevel=2)
            if batch is not None:
                yield batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def image_folder_splits(root: str | Path | None) -> tuple[Path, Path, list[str]]:
    """Check the layout and return (train dir, val dir, class names)."""
    how = ("pass --data-dir pointing at a folder with train/<class>/<images> and val/<class>/<images> "
           "(the ImageNet layout; val must be sorted into class folders)")
    if root is None:
        raise FileNotFoundError(f"the imagefolder data set needs a local path: {how}")
    root = Path(root)
    train, val = root / "train", root / "val"
    for split in (train, val):
        if not split.is_dir():
            raise FileNotFoundError(f"{split} does not exist; {how}")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    val_classes = sorted(d.name for d in val.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{train} has no class folders; {how}")
    if classes != val_classes:
        raise ValueError(f"{train} and {val} have different class folders "
                         f"({len(classes)} vs {len(val_classes)}); they must match")
    return train, val, classes
