"""CIFAR-10/100 in the official python-pickle format, from a local folder."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _how_to_get(num_classes: int) -> str:
    folder = LAYOUT[num_classes][0]
    return (f"Download cifar-{num_classes}-python.tar.gz from the CIFAR site, extract it, and pass "
            f"--data-dir pointing at the extracted '{folder}' folder (or the folder that contains it)")


# What a CIFAR batch may hold besides dicts, lists, str/bytes and numbers: NumPy arrays
# (pickled by numpy 1.x or 2.x, protocol 2 or 5; protocol 2 spells bytes as _codecs.encode
# of a str). Nothing else can be built, so a crafted file cannot run code.
_ALLOWED_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, and nothing more."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused to encode with {encoding!r}: a CIFAR batch holds latin1 bytes only")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 1.x pickles under numpy 2
        if module.startswith("numpy._core.") and int(np.__version__.split(".")[0]) < 2:
            module = "numpy.core." + module[len("numpy._core."):]
        if (module.replace("numpy.core.", "numpy._core."), name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds only dicts, lists, "
                                     "strings and NumPy arrays")


def safe_unpickle(path: Path) -> Any:
    """Unpickle a CIFAR python batch, admitting only what the format holds."""
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="bytes").load()


def _read(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = safe_unpickle(path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, LookupError,
            MemoryError, OverflowError, ImportError) as e:
        raise ValueError(f"{path} is not a readable CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR python batch (it holds a {type(batch).__name__}, not a dict)")
    try:
        data, labels = batch[b"data"], batch[label_key]
    except KeyError as e:
        raise ValueError(f"{path} is not a CIFAR python batch (missing key {e})") from e
    try:
        images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} holds malformed CIFAR data ({e})") from None
    if images.shape[0] == 0 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{path} holds {images.shape[0]} images and {labels.shape[0]} labels; a CIFAR batch "
                         "needs one label per image and at least one image")
    return images, labels


def load_cifar(root: str | Path | None, num_classes: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (images uint8 [50000, 3, 32, 32], labels int64), "test": ...}``."""
    if num_classes not in LAYOUT:
        raise ValueError(f"CIFAR comes with 10 or 100 classes, not {num_classes}")
    folder, train_files, test_files, label_key = LAYOUT[num_classes]
    if root is None:
        raise FileNotFoundError(f"CIFAR-{num_classes} needs a local path. {_how_to_get(num_classes)}")
    root = Path(root)
    base = root / folder if (root / folder).is_dir() else root
    out = {}
    for split, files in (("train", train_files), ("test", test_files)):
        paths = [base / name for name in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"CIFAR-{num_classes} files missing: {', '.join(missing)}. {_how_to_get(num_classes)}")
        parts = [_read(p, label_key) for p in paths]
        out[split] = (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                      torch.from_numpy(np.concatenate([p[1] for p in parts])))
    return out
