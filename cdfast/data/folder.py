"""ImageNet-layout folders (``root/train/<class>/*.JPEG``, ``root/val/<class>/*``) via torchvision."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate

from cdfast.data.loader import saved_order

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


class CheckedSamples(torch.utils.data.Dataset):
    """An ImageFolder whose unreadable samples come back as ``(None, (path, reason))`` instead of raising
    inside a worker, so the main process can name the file (or skip it, if asked). A module-level class:
    DataLoader workers started by spawn or forkserver (macOS; Python 3.14's Linux default) unpickle it."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index):
        try:
            return self.folder[index]
        except Exception as e:  # noqa: BLE001 - any decode failure is reported with the file's name
            return None, (self.folder.samples[index][0], f"{type(e).__name__}: {e}")


def _image_folder(root: Path, transform):
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(root), transform=transform)


def _collate(samples):
    """A batch of the readable samples, and the unreadable ones' (path, reason)."""
    good = [s for s in samples if s[0] is not None]
    bad = [s[1] for s in samples if s[0] is None]
    return (default_collate(good) if good else None), bad


class SeededSamples(torch.utils.data.Dataset):
    """Samples asked for as ``(index, seed)``: the transform's random draws (torch's generator, which
    torchvision's transforms use) come from ``seed`` alone, so a sample's crop and flip depend on its
    place in the epoch, not on which worker reads it, how many workers there are, or whether the epoch
    was resumed part-way. The caller's generator state is left as it was (``seed`` None: no draws)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        if seed is None:
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):  # with workers=0 this runs in the training process
            torch.default_generator.manual_seed(seed)  # the CPU's only: torch.manual_seed would reseed the GPUs too
            return self.dataset[index]


def sample_seed(epoch_seed: int, position: int) -> int:
    """A sample's seed: splitmix64 of the epoch seed and its position, so that nearby positions and epochs
    get unrelated seeds (torch seeds its CPU generator from the low 32 bits only: a plain sum would make
    two epochs' windows of seeds overlap)."""
    z = (epoch_seed + 0x9E3779B97F4A7C15 * (position + 1)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1  # 63 bits: torch.manual_seed takes it as it is


class RankShare(torch.utils.data.Sampler):
    """Batches of ``(index, seed)`` for one rank of a data-parallel job (or the one process): every rank
    draws the same order and epoch seed (one seeded generator) and keeps its contiguous share of each
    global batch; training drops the last partial global batch. A sample's seed mixes the epoch seed and
    its position in the epoch (evaluation: None, it draws nothing). ``resume_at`` makes the next epoch
    the one ``epoch`` describes, from batch ``first`` on."""

    def __init__(self, n: int, global_batch: int, train: bool, generator: torch.Generator, rank: int, world: int):
        if train and global_batch % world:
            raise ValueError(f"the global batch size {global_batch} must be a multiple of the {world} ranks")
        self.n, self.batch, self.train, self.generator, self.rank, self.world = n, global_batch, train, generator, rank, world
        self.epoch: tuple[torch.Tensor, int] | None = None  # the (order, seed) being iterated
        self.pending: tuple[torch.Tensor, int, int] | None = None  # resume_at's (order, seed, first batch)

    def __len__(self) -> int:
        return self.n // self.batch if self.train else -(-self.n // self.batch)

    def resume_at(self, order: torch.Tensor, seed: int, first: int) -> None:
        self.pending = (order, seed, first)

    def __iter__(self):
        resume, self.pending = self.pending, None
        if resume is not None:
            order, seed, first = resume
        elif self.train:
            order = torch.randperm(self.n, generator=self.generator)
            seed, first = int(torch.randint(0, 2**62, (1,), generator=self.generator)), 0
        else:
            order, seed, first = torch.arange(self.n), None, 0
        self.epoch = (order, seed)
        for k in range(first, len(self)):
            start = k * self.batch
            chunk = order[start:start + self.batch]
            share = -(-chunk.shape[0] // self.world)
            lo = start + self.rank * share
            mine = chunk[self.rank * share:(self.rank + 1) * share].tolist()
            if mine:
                yield [(i, None if seed is None else sample_seed(seed, lo + j)) for j, i in enumerate(mine)]


SAMPLING = 2  # the loader's way of drawing orders and crops; 1 (unmarked): before per-sample seeds


class FolderLoader:
    """A seeded DataLoader over an ImageFolder split; its generator state, and within an epoch the
    epoch's order, seed and next batch, go into checkpoints (a resume continues at the next batch with
    the crops and flips an uninterrupted run would have drawn: see :class:`SeededSamples`).

    Unreadable images stop the run with an error naming the file, or, with
    ``skip_bad_images``, are left out of their batch and counted in a warning.
    Empty files are found before training starts.
    """

    def __init__(self, root: Path, train: bool, batch_size: int, workers: int, image_size: int,
                 in_channels: int, seed: int, subset: int | None = None, skip_bad_images: bool = False,
                 rank: int = 0, world: int = 1):
        self.dataset = _image_folder(root, _transforms(image_size, train, in_channels))
        self.skip_bad_images, self.skipped = skip_bad_images, set()
        empty = [path for path, _ in self.dataset.samples if os.path.getsize(path) == 0]
        if empty:
            if not skip_bad_images:
                raise BadImageError(f"{len(empty)} empty image file(s) in {root}, e.g. {empty[0]}; {SKIP_HINT}")
            warnings.warn(f"cdfast: skipping {len(empty)} empty image file(s) in {root}, e.g. {empty[0]}", stacklevel=2)
            empty_set = set(empty)
            self.dataset.samples = [s for s in self.dataset.samples if s[0] not in empty_set]
            self.dataset.imgs, self.dataset.targets = self.dataset.samples, [t for _, t in self.dataset.samples]
        dataset = CheckedSamples(self.dataset)
        if subset is not None and subset < len(dataset):
            pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:subset]
            dataset = torch.utils.data.Subset(dataset, pick.tolist())
        self.generator = torch.Generator().manual_seed(seed)
        # data parallel: this rank's share of every global batch (world 1: the whole batch)
        self.sampler = RankShare(len(dataset), batch_size, train, self.generator, rank, world)
        # The DataLoader draws its workers' base seed from its own generator at every epoch; the samples
        # are seeded one by one (SeededSamples), so it must not draw from ours nor from torch's global one.
        self.loader = DataLoader(SeededSamples(dataset), batch_sampler=self.sampler, num_workers=workers,
                                 generator=torch.Generator().manual_seed(seed), collate_fn=_collate,
                                 pin_memory=torch.cuda.is_available(), persistent_workers=False)
        self._consumed: list[int] | None = None  # [batches the epoch being iterated has handed out]

    def __len__(self) -> int:
        return len(self.loader)

    resumes_mid_epoch = True  # its state_dict() taken between batches continues at the next batch

    def __iter__(self):
        self._consumed = mine = [self.sampler.pending[2] if self.sampler.pending else 0]  # a loaded position
        try:
            yield from self._batches(mine)
        finally:
            if self._consumed is mine:  # not a newer iteration's
                self._consumed = None

    def _batches(self, consumed: list[int]):
        for batch, bad in self.loader:
            consumed[0] += 1  # counted even when none of its images could be read
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
        """The generator; between two batches of an epoch also that epoch's order, seed and next batch.
        (Workers read ahead; what counts is what this loader has handed out.)"""
        state = {"generator": self.generator.get_state(), "sampling": SAMPLING}
        if self._consumed is not None and self.sampler.epoch is not None:  # iterating
            (order, seed), next_batch = self.sampler.epoch, self._consumed[0]
        elif self.sampler.pending is not None:  # loaded, not iterated yet
            order, seed, next_batch = self.sampler.pending
        else:
            return state
        if 0 < next_batch < len(self):
            state.update(epoch_order=saved_order(order), epoch_seed=seed, next_batch=next_batch)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampling") != SAMPLING:
            warnings.warn("cdfast: this checkpoint's image-folder loader predates per-sample seeds (cdfast before "
                          "2026-11-27): the run goes on with the same kind of random crops, but not the ones that "
                          "version would have drawn", stacklevel=2)
        self.sampler.pending = None
        if "next_batch" in state:
            order, seed, first = state["epoch_order"], state["epoch_seed"], state["next_batch"]
            if (not isinstance(order, torch.Tensor) or order.shape != (self.sampler.n,) or not isinstance(first, int)
                    or not 0 <= first < len(self) or not isinstance(seed, int)):
                raise ValueError(f"the saved position within an epoch does not fit this image folder "
                                 f"({self.sampler.n} images, {len(self)} batches): it was saved for other data")
            self.sampler.resume_at(order.long(), seed, first)
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
