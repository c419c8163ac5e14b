"""Data sets: Fashion-MNIST (default, from Debian's package), CIFAR-10/100 and ImageNet-layout folders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from cdfast.data.cifar import load_cifar
from cdfast.data.folder import BadImageError, FolderLoader, folder_mean_std, image_folder_splits
from cdfast.data.idx import DEFAULT_ROOT as FASHION_MNIST_ROOT
from cdfast.data.idx import load_fashion_mnist
from cdfast.data.loader import TensorLoader
from cdfast.perturb.pool import pixel_levels

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
LOADERS = ("torch", "dali")

class InMemorySpec(NamedTuple):
    """What the loader needs to know about a data set held in memory."""

    classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int  # crop padding of the standard augmentation


IN_MEMORY = {
    "fashion-mnist": InMemorySpec(10, 1, (0.2860,), (0.3530,), 2),
    "cifar10": InMemorySpec(10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4),
    "cifar100": InMemorySpec(100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4),
}


@dataclass
class DataBundle:
    """What the trainer needs to know about a data set."""

    name: str
    train: Any           # iterable of (x float [B, C, H, W] normalized, y int64 [B]); has state_dict()
    test: Any
    num_classes: int
    input_shape: tuple[int, int, int]
    train_size: int
    test_size: int
    black: tuple[float, ...] | None = None  # a black pixel after normalization (-mean / std), per channel
    white: tuple[float, ...] | None = None  # a white pixel after normalization ((1 - mean) / std)
    # calibration(n): clean (unaugmented) training batches covering about n images, always the same ones
    calibration: Callable[[int], Any] | None = None




def _check_labels(name: str, split: str, labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() == 0:
        raise ValueError(f"{name} {split} split holds no images")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} {split} labels lie in [{lo}, {hi}], outside [0, {num_classes}); the files are corrupt or mislabelled")


# Test subsets come from this fixed seed, not the run's: every seed of a grid is scored on the same images.
TEST_SUBSET_SEED = 0


def _subset(images: torch.Tensor, labels: torch.Tensor, n: int | None, seed: int):
    if n is None or n >= images.shape[0]:
        return images, labels
    if n < 1:
        raise ValueError(f"a subset needs at least 1 image, got {n}")
    pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return images[pick], labels[pick]


def _in_memory_splits(name: str, root, train_subset, test_subset, seed: int):
    """``(train_x, train_y, test_x, test_y)`` of an in-memory set: read, labels checked, subsets drawn."""
    num_classes = IN_MEMORY[name].classes
    splits = load_fashion_mnist(root) if name == "fashion-mnist" else load_cifar(root, num_classes)
    for split, (_, labels) in splits.items():
        _check_labels(name, split, labels, num_classes)
    return (*_subset(*splits["train"], train_subset, seed), *_subset(*splits["test"], test_subset, TEST_SUBSET_SEED))


def load_data(
    name: str,
    root: str | None = None,
    *,
    batch_size: int = 128,
    eval_batch_size: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    train_subset: int | None = None,
    test_subset: int | None = None,
    workers: int = 4,
    image_size: int = 224,
    in_channels: int = 3,
    skip_bad_images: bool = False,
    loader: str = "torch",
    perturb_ops: Sequence[str] = (),
    rank: int = 0,
    world: int = 1,
) -> DataBundle:
    """Load a data set by name with its standard augmentation.

    ``skip_bad_images`` (image folders): leave unreadable or empty images out with a
    counted warning instead of stopping with an error that names the file.

    ``loader="torch"`` (default): Fashion-MNIST and CIFAR are held in memory (on ``device``)
    and batched by :class:`TensorLoader`; ``imagefolder`` streams JPEGs through torchvision.
    ``loader="dali"``: NVIDIA DALI pipelines on ``device`` (:mod:`cdfast.data.dali`) decode
    and augment, and with ``perturb_ops`` also make the perturbed view of every training
    batch (it then yields ``(x, y, Perturbed)``).

    ``rank`` / ``world`` (data parallel): ``batch_size`` and ``eval_batch_size`` stay the global
    batches; this rank gets its share of each (the calibration batches are not sharded: every
    rank recalibrates BatchNorm on the same images).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    if loader == "dali":
        return _load_with_dali(name, root, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
                               device=device, train_subset=train_subset, test_subset=test_subset,
                               image_size=image_size, in_channels=in_channels, skip_bad_images=skip_bad_images,
                               perturb_ops=perturb_ops, rank=rank, world=world)
    if name == "imagefolder":
        train_dir, val_dir, classes = image_folder_splits(root)
        train = FolderLoader(train_dir, True, batch_size, workers, image_size, in_channels, seed, train_subset,
                             skip_bad_images, rank, world)
        test = FolderLoader(val_dir, False, eval_batch_size, workers, image_size, in_channels, TEST_SUBSET_SEED,
                            test_subset, skip_bad_images, rank, world)

        def folder_calibration(n: int):  # the test transform on a fixed subset of the training images
            return FolderLoader(train_dir, False, batch_size, workers, image_size, in_channels, seed + 1, n,
                                skip_bad_images)

        return DataBundle(name, train, test, len(classes), (in_channels, image_size, image_size),
                          len(train.loader.dataset), len(test.loader.dataset),
                          *pixel_levels(*folder_mean_std(in_channels)), calibration=folder_calibration)
    num_classes, _, mean, std, pad = IN_MEMORY[name]
    train_x, train_y, test_x, test_y = _in_memory_splits(name, root, train_subset, test_subset, seed)
    common = dict(mean=mean, std=std, device=device)
    train = TensorLoader(train_x, train_y, batch_size, shuffle=True, drop_last=True,
                         augment_pad=pad, seed=seed, rank=rank, world=world, **common)
    test = TensorLoader(test_x, test_y, eval_batch_size, rank=rank, world=world, **common)

    def calibration(n: int):  # a fixed random subset of the training images, unaugmented
        pick = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:n]
        return TensorLoader(train_x[pick], train_y[pick], batch_size, **common)

    return DataBundle(name, train, test, num_classes, tuple(train_x.shape[1:]), train_x.shape[0], test_x.shape[0],
                      *pixel_levels(mean, std), calibration=calibration)


def _load_with_dali(name, root, *, batch_size, eval_batch_size, seed, device, train_subset, test_subset, image_size,
                    in_channels, skip_bad_images, perturb_ops, rank, world) -> DataBundle:
    from cdfast.data.dali import DaliLoader, require_dali

    require_dali()
    if batch_size % world:
        raise ValueError(f"the global batch size {batch_size} must be a multiple of the {world} ranks")
    # DALI shards by files: each rank reads every world-th one, in batches of its share of the global batch
    shard = dict(rank=rank, world=world)
    batch_size, eval_batch_size = batch_size // world, max(1, -(-eval_batch_size // world))
    if name == "imagefolder":
        train_dir, val_dir, classes = image_folder_splits(root)
        mean, std = folder_mean_std(in_channels)
        common = dict(image_size=image_size, in_channels=in_channels, mean=mean, std=std, seed=seed, device=device)
        train = DaliLoader.from_folder(train_dir, classes, skip_bad_images=skip_bad_images, train=True,
                                       batch_size=batch_size, ops=perturb_ops, subset=train_subset, **common, **shard)
        test = DaliLoader.from_folder(val_dir, classes, skip_bad_images=skip_bad_images, train=False,
                                      batch_size=eval_batch_size, subset=test_subset,
                                      **{**common, "seed": TEST_SUBSET_SEED}, **shard)

        def folder_calibration(n: int):  # the evaluation pipeline on a fixed subset of the training images
            return DaliLoader.from_folder(train_dir, classes, skip_bad_images=skip_bad_images, train=False,
                                          batch_size=batch_size, subset=n, **{**common, "seed": seed + 1})

        return DataBundle(name, train, test, len(classes), (in_channels, image_size, image_size),
                          len(train.samples), len(test.samples), *pixel_levels(mean, std),
                          calibration=folder_calibration)
    num_classes, channels, mean, std, pad = IN_MEMORY[name]
    train_x, train_y, test_x, test_y = _in_memory_splits(name, root, train_subset, test_subset, seed)
    common = dict(image_size=train_x.shape[-1], in_channels=channels, mean=mean, std=std, seed=seed, device=device)
    train = DaliLoader.from_arrays(train_x, train_y, train=True, batch_size=batch_size, ops=perturb_ops, pad=pad,
                                   **common, **shard)
    test = DaliLoader.from_arrays(test_x, test_y, train=False, batch_size=eval_batch_size, **common, **shard)

    def calibration(n: int):  # a fixed random subset of the training images, unaugmented
        pick = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:n]
        return DaliLoader.from_arrays(train_x[pick], train_y[pick], train=False, batch_size=batch_size, **common)

    return DataBundle(name, train, test, num_classes, tuple(train_x.shape[1:]), train_x.shape[0], test_x.shape[0],
                      *pixel_levels(mean, std), calibration=calibration)


__all__ = ["load_data", "DataBundle", "DATASETS", "LOADERS", "TensorLoader", "FolderLoader", "BadImageError",
           "load_fashion_mnist", "load_cifar", "FASHION_MNIST_ROOT"]
