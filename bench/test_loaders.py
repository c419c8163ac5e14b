"""Input-pipeline throughput: the DALI loader vs the torchvision DataLoader on the same image folder.

Both produce what a Competitive Distillation step consumes: the plain training batch
(random resized crop to 224, flip, normalize) and its perturbed view (one op of the
paper's pool per batch). The torch path decodes and augments in DataLoader workers and
perturbs the batch with the pool's torch ops (as the group step does); DALI decodes,
augments and perturbs in one pipeline (:mod:`cdfast.data.dali`). images/s is in each
benchmark's extra_info. The folder holds real Fashion-MNIST images written as 256x256
RGB JPEGs (no other image data exists on these machines); an epoch of 1024 images includes
the DALI pipeline's per-epoch build.
"""

import os

import pytest
import torch

from cdfast.data import load_data
from cdfast.perturb import DEFAULT_OPS, PerturbationPool

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
IMAGES, BATCH, SIZE = 1024, 32, 224
WORKERS = min(8, os.cpu_count() or 1)  # DataLoader workers / DALI threads: the same CPU budget


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    from PIL import Image

    from cdfast.data import FASHION_MNIST_ROOT, load_fashion_mnist

    if not os.path.exists(os.path.join(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz")):
        pytest.skip("real Fashion-MNIST is needed to write the folder")
    x, y = load_fashion_mnist()["train"]
    root = tmp_path_factory.mktemp("loader-bench")
    for split, picks in (("train", range(IMAGES)), ("val", range(100))):
        for i in picks:
            folder = root / split / f"class_{int(y[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(x[i, 0].numpy()).convert("RGB").resize((256, 256), Image.BICUBIC)
            image.save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_two_views_per_batch(benchmark, jpeg_folder, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'cdfast[dali]')")
    data = load_data("imagefolder", str(jpeg_folder), batch_size=BATCH, eval_batch_size=BATCH, workers=WORKERS,
                     image_size=SIZE, loader=loader, perturb_ops=DEFAULT_OPS,
                     device=DEVICE if loader == "dali" else "cpu")
    if loader == "dali":
        data.train.threads = WORKERS
    pool = PerturbationPool(DEFAULT_OPS, seed=0, fill=data.black, white=data.white)

    def epoch():
        seen = 0
        for x, y, *view in data.train:
            x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
            perturbed = view[0].x if view else pool.perturb(x, y)[0].x  # the torch path perturbs here
            assert perturbed.shape == x.shape
            seen += x.shape[0]
        if ON_GPU:
            torch.cuda.synchronize()
        return seen

    epoch()  # warm-up: file cache, worker start, pipeline build
    benchmark.group = f"input pipeline, two views, {SIZE}x{SIZE} ({DEVICE})"
    seen = benchmark.pedantic(epoch, rounds=3, iterations=1)
    benchmark.extra_info.update(loader=loader, device=DEVICE, workers=WORKERS, images=seen,
                                images_per_second=seen / benchmark.stats["mean"])
