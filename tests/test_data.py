"""Data sets from disk (real Fashion-MNIST; CIFAR and ImageFolder files written from it) and the loader."""

import gzip
import pickle

import pytest
import torch

from cdfast.data import TensorLoader, load_data, load_fashion_mnist
from cdfast.data.augment import pad_crop_flip


def test_real_fashion_mnist(fmnist_root):
    splits = load_fashion_mnist(fmnist_root)
    x, y = splits["train"]
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert splits["test"][0].shape == (10000, 1, 28, 28)
    assert y.min() == 0 and y.max() == 9 and torch.bincount(y).tolist() == [6000] * 10


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_data("fashion-mnist", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_data("fashion-mnist", str(tmp_path))


def test_corrupt_idx_is_reported(tmp_path, fmnist_root):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / f"{name}.gz").write_bytes((fmnist_root / f"{name}.gz").read_bytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x27\x10" + bytes(100))  # header says 10000 labels, holds 100
    with pytest.raises(ValueError, match="truncated"):
        load_data("fashion-mnist", str(tmp_path))


def fmnist_as_cifar(fmnist_root, n):
    x, y = load_fashion_mnist(fmnist_root)["train"]
    rgb = torch.nn.functional.pad(x[:n], (2, 2, 2, 2)).expand(n, 3, 32, 32)
    return rgb.reshape(n, -1).numpy(), y[:n].tolist()


def test_cifar10_and_100_from_pickles(tmp_path, fmnist_root):
    data, labels = fmnist_as_cifar(fmnist_root, 60)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    for i in range(1, 6):
        with open(c10 / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data[(i - 1) * 10:i * 10], b"labels": labels[(i - 1) * 10:i * 10]}, f)
    with open(c10 / "test_batch", "wb") as f:
        pickle.dump({b"data": data[50:], b"labels": labels[50:]}, f)
    bundle = load_data("cifar10", str(tmp_path), batch_size=8, eval_batch_size=4)
    assert bundle.num_classes == 10 and bundle.input_shape == (3, 32, 32)
    assert bundle.train_size == 50 and bundle.test_size == 10
    x, y = next(iter(bundle.train))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64

    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    for split, sl in (("train", slice(0, 50)), ("test", slice(50, 60))):
        with open(c100 / split, "wb") as f:
            pickle.dump({b"data": data[sl], b"fine_labels": [v * 10 + 3 for v in labels[sl]]}, f)
    bundle = load_data("cifar100", str(tmp_path / "c100"), batch_size=8)
    assert bundle.num_classes == 100
    with pytest.raises(FileNotFoundError, match="cifar-10-python"):
        load_data("cifar10", str(tmp_path / "c100"))
    with pytest.raises(FileNotFoundError, match="local path"):
        load_data("cifar100", None)


def test_image_folder(tmp_path, fmnist_root):
    from PIL import Image

    x, y = load_fashion_mnist(fmnist_root)["test"]
    for split, rng in (("train", range(0, 40)), ("val", range(40, 60))):
        for i in rng:
            folder = tmp_path / split / f"class_{int(y[i]) % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, 0].numpy()).save(folder / f"{i}.png")
    for cls in range(3):  # make sure every class exists in both splits
        for split in ("train", "val"):
            (tmp_path / split / f"class_{cls}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[100 + cls, 0].numpy()).save(tmp_path / split / f"class_{cls}" / "extra.png")
    bundle = load_data("imagefolder", str(tmp_path), batch_size=8, eval_batch_size=8, workers=0, image_size=24)
    assert bundle.num_classes == 3 and bundle.input_shape == (3, 24, 24)
    xb, yb = next(iter(bundle.train))
    assert xb.shape == (8, 3, 24, 24) and yb.max() < 3
    (tmp_path / "val" / "class_2").rename(tmp_path / "val" / "other")
    with pytest.raises(ValueError, match="different class folders"):
        load_data("imagefolder", str(tmp_path), workers=0)
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        load_data("imagefolder", str(tmp_path / "missing"))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set"):
        load_data("mnist-but-better")


def test_tensor_loader_is_seeded_and_resumable():
    images = torch.randint(0, 255, (50, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    make = lambda: TensorLoader(images, labels, 8, mean=(0.5,), std=(0.25,), shuffle=True,  # noqa: E731
                                drop_last=True, augment_pad=1, seed=3)
    a, b = make(), make()
    assert len(a) == 6
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    state = a.state_dict()
    first = [y for _, y in a]
    a.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(first, [y for _, y in a]))
    assert not all(torch.equal(u, v) for u, v in zip(first, [y for _, y in a]))  # next epoch differs


def test_pad_crop_flip_is_a_per_sample_shift_within_the_pad():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4).expand(64, 1, 4, 4).contiguous()
    padded = torch.nn.functional.pad(x[:1], (1, 1, 1, 1))
    shifts = [padded[..., dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
    out = pad_crop_flip(x, 1, torch.Generator().manual_seed(0), flip=False)
    which = [next(k for k, s in enumerate(shifts) if torch.equal(out[b:b + 1], s)) for b in range(64)]
    assert len(set(which)) == 9  # all nine shifts occur
    flipped = pad_crop_flip(x, 0, torch.Generator().manual_seed(0), flip=True)
    is_flip = [torch.equal(flipped[b], x[b].flip(-1)) for b in range(64)]
    assert all(f or torch.equal(flipped[b], x[b]) for b, f in enumerate(is_flip))
    assert 10 < sum(is_flip) < 54


def test_augmentation_pads_with_black_and_calibration_batches_are_clean_and_fixed(fmnist_root):
    data = load_data("fashion-mnist", str(fmnist_root), batch_size=64, train_subset=256, test_subset=64)
    black = data.black[0]
    assert black == pytest.approx(-0.2860 / 0.3530)
    x, _ = next(iter(data.train))
    assert (x >= black - 1e-5).all() and (x - black).abs().lt(1e-5).any()
    first = [xb for xb, _ in data.calibration(128)]
    again = [xb for xb, _ in data.calibration(128)]
    assert sum(b.shape[0] for b in first) == 128
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_padding_of_white_images_is_black_not_grey():
    images = torch.full((8, 1, 6, 6), 255, dtype=torch.uint8)
    loader = TensorLoader(images, torch.zeros(8, dtype=torch.long), 8, mean=(0.5,), std=(0.25,), augment_pad=2, seed=0)
    x, _ = next(iter(loader))
    values = set(torch.round(x * 1000).unique().tolist())
    assert values <= {2000.0, -2000.0} and -2000.0 in values  # white (1 - .5)/.25 and black (0 - .5)/.25


def test_every_seed_is_scored_on_the_same_test_subset(fmnist_root):
    a = load_data("fashion-mnist", str(fmnist_root), seed=0, train_subset=64, test_subset=50, workers=0, batch_size=32)
    b = load_data("fashion-mnist", str(fmnist_root), seed=1, train_subset=64, test_subset=50, workers=0, batch_size=32)
    xa, ya = next(iter(a.test))
    xb, yb = next(iter(b.test))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # the same 50 test images whatever the run's seed
    assert not torch.equal(next(iter(a.train))[0], next(iter(b.train))[0])  # training subsets still follow it
