"""Fashion-MNIST (and MNIST-layout) IDX files, read straight from disk."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "Install Debian's package as root (`apt-get update && apt-get install -y dataset-fashion-mnist`, "
    f"which puts it in {DEFAULT_ROOT}), or pass --data-dir pointing at a folder holding "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {root}. {HOW_TO_GET}")


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} is corrupt or truncated ({e}); download or reinstall it "
                         "(apt-get install --reinstall dataset-fashion-mnist)") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number); is the download complete?")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: its header is incomplete")
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {payload.size} bytes of data")
    if dims[0] == 0:
        raise ValueError(f"{path} holds no items (header says {dims}); it is not a usable data file")
    return payload.reshape(dims)


def load_fashion_mnist(root: str | Path | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (images uint8 [60000, 1, 28, 28], labels int64), "test": ...}``."""
    root = Path(root or DEFAULT_ROOT)
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {root} does not exist. {HOW_TO_GET}")
    out = {}
    for split, (images, labels) in FILES.items():
        x = read_idx(_find(root, images))
        y = read_idx(_find(root, labels))
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"Fashion-MNIST {split} files in {root} disagree: images {x.shape}, labels {y.shape}")
        out[split] = (torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    return out
