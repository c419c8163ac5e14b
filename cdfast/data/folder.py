"""ImageNet-layout folders (``root/train/<class>/*.JPEG``, ``root/val/<class>/*``) via torchvision."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _transforms(image_size: int, train: bool, in_channels: int):
    from torchvision.transforms import v2 as T

    if in_channels not in (1, 3):
        raise ValueError(f"image folders are read as RGB (3 channels) or grey (1 channel), not {in_channels}")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else ((0.5,), (0.5,))
    gray = [T.Grayscale(1)] if in_channels == 1 else [T.RGB()]
    if train:
        geometry = [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(int(round(image_size * 256 / 224)), antialias=True), T.CenterCrop(image_size)]
    return T.Compose([T.PILToTensor(), *gray, *geometry, T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


class FolderLoader:
    """A seeded DataLoader over an ImageFolder split; its generator state goes into checkpoints."""

    def __init__(self, root: Path, train: bool, batch_size: int, workers: int, image_size: int,
                 in_channels: int, seed: int, subset: int | None = None):
        from torchvision.datasets import ImageFolder

        self.dataset = ImageFolder(str(root), transform=_transforms(image_size, train, in_channels))
        dataset = self.dataset
        if subset is not None and subset < len(dataset):
            pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:subset]
            dataset = torch.utils.data.Subset(dataset, pick.tolist())
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train,
                                 num_workers=workers, generator=self.generator, pin_memory=torch.cuda.is_available(),
                                 persistent_workers=False)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)

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
