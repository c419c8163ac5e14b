import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run under Triton's CPU interpreter. It is
# chosen when a kernel is defined, so this must come before cdfast is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cdfast.data import FASHION_MNIST_ROOT  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fmnist_root() -> Path:
    root = Path(os.environ.get("CDFAST_FASHION_MNIST", FASHION_MNIST_ROOT))
    if not (root / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST not found in {root} (make data installs it)")
    return root


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
