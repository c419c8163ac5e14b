"""The DALI input pipelines on the CPU (device_id=None): two views, the same ops as the torch path,
seeded epochs, shards, the last partial batch, bad input, and a short training run."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'cdfast[dali]')")

import cdfast  # noqa: E402
from cdfast.data import BadImageError, load_data, load_fashion_mnist  # noqa: E402
from cdfast.data.dali import DALI_OPS, DaliLoader  # noqa: E402
from cdfast.perturb import OPS, PerturbRNG  # noqa: E402
from cdfast.train import Trainer, TrainConfig  # noqa: E402

MEAN, STD = (0.2860,), (0.3530,)


@pytest.fixture(scope="module")
def fmnist(fmnist_root_module):
    x, y = load_fashion_mnist(fmnist_root_module)["train"]
    return x[:96], y[:96]


@pytest.fixture(scope="module")
def fmnist_root_module():
    from cdfast.data import FASHION_MNIST_ROOT

    root = Path(FASHION_MNIST_ROOT)
    if not (root / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST not found in {root}")
    return root


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory, fmnist):
    """An ImageNet-layout folder of real Fashion-MNIST images written as JPEGs (3 classes)."""
    from PIL import Image

    x, y = fmnist
    root = tmp_path_factory.mktemp("jpegs")
    for split, picks in (("train", range(0, 60)), ("val", range(60, 80))):
        for i in picks:
            folder = root / split / f"class_{int(y[i]) % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, 0].numpy()).convert("RGB").save(folder / f"{i}.jpg", quality=92)
    return root


def arrays(x, y, **kw):
    return DaliLoader.from_arrays(x, y, image_size=kw.pop("image_size", 28), in_channels=1, mean=MEAN, std=STD,
                                  seed=kw.pop("seed", 0), threads=1, **kw)


def folder(root, split, **kw):
    classes = sorted(d.name for d in (root / "train").iterdir())
    return DaliLoader.from_folder(root / split, classes, image_size=kw.pop("image_size", 24), in_channels=3,
                                  mean=(0.5,) * 3, std=(0.25,) * 3, seed=kw.pop("seed", 0), threads=1, **kw)


def test_folder_training_batches_carry_both_views(jpeg_folder):
    loader = folder(jpeg_folder, "train", train=True, batch_size=8, ops=list(DALI_OPS))
    batches = list(loader)
    assert len(batches) == len(loader) == 60 // 8  # the last partial batch is dropped in training
    seen = set()
    for x, y, view in batches:
        assert x.shape == view.x.shape == (8, 3, 24, 24) and x.dtype == view.x.dtype == torch.float32
        assert y.dtype == view.y_a.dtype == view.y_b.dtype == torch.int64 and y.shape == (8,)
        assert 0 <= int(y.min()) and int(y.max()) < 3 and torch.equal(view.y_a, y)
        assert view.op in DALI_OPS and torch.isfinite(view.x).all()
        seen.add(view.op)
        if view.op in ("mixup", "cutmix"):
            assert 0.0 <= view.lam <= 1.0
        else:
            assert view.lam == 1.0 and torch.equal(view.y_b, y)
    assert len(seen) >= 3  # one op per batch, drawn from the pool


def test_evaluation_keeps_the_last_partial_batch_in_file_order(jpeg_folder):
    loader = folder(jpeg_folder, "val", train=False, batch_size=8)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [8, 8, 4] and len(loader) == 3
    labels = torch.cat([y for _, y in batches]).tolist()
    want = [k for k, c in enumerate(sorted(p.name for p in (jpeg_folder / "val").iterdir()))
            for _ in sorted((jpeg_folder / "val" / c).iterdir())]
    assert labels == want
    assert all(len(b) == 2 for b in batches)


def test_in_memory_evaluation_equals_the_torch_loader(fmnist):
    x, y = fmnist
    dali = list(arrays(x, y, train=False, batch_size=40))
    torch_batches = list(cdfast.data.TensorLoader(x, y, 40, mean=MEAN, std=STD))
    assert [b[0].shape[0] for b in dali] == [40, 40, 16]
    for (dx, dy), (tx, ty) in zip(dali, torch_batches):
        torch.testing.assert_close(dx, tx, atol=1e-5, rtol=0)
        assert torch.equal(dy, ty)


def test_seeded_epochs_are_reproducible_and_resume_at_the_next_epoch(fmnist):
    x, y = fmnist

    def run(loader, epochs):
        return [[(bx.clone(), by.clone(), v.op, v.lam, v.x.clone()) for bx, by, v in loader] for _ in range(epochs)]

    a = run(arrays(x, y, train=True, batch_size=16, ops=list(DALI_OPS), pad=2), 2)
    b = run(arrays(x, y, train=True, batch_size=16, ops=list(DALI_OPS), pad=2), 2)
    for ea, eb in zip(a, b):
        for (ax, ay, aop, alam, av), (bx, by, bop, blam, bv) in zip(ea, eb):
            assert torch.equal(ax, bx) and torch.equal(ay, by) and aop == bop and alam == blam and torch.equal(av, bv)
    assert not torch.equal(a[0][0][1], a[1][0][1])  # each epoch has its own order
    other = run(arrays(x, y, train=True, batch_size=16, ops=list(DALI_OPS), pad=2, seed=1), 1)
    assert not torch.equal(other[0][0][1], a[0][0][1])
    resumed = arrays(x, y, train=True, batch_size=16, ops=list(DALI_OPS), pad=2)
    resumed.load_state_dict({"epoch": 1})  # as after a checkpoint at the end of epoch 1
    for (ax, ay, aop, _, av), (bx, by, v) in zip(a[1], resumed):
        assert torch.equal(ax, bx) and torch.equal(ay, by) and aop == v.op and torch.equal(av, v.x)
    assert resumed.state_dict() == {"epoch": 2}


def test_two_ranks_hold_disjoint_shards_that_cover_the_data(fmnist):
    x, _ = fmnist
    ids = torch.arange(x.shape[0])  # labels as sample ids
    for train in (True, False):
        seen = []
        for rank in (0, 1):
            loader = arrays(x, ids, train=train, batch_size=8, rank=rank, world=2, pad=2)
            got = torch.cat([b[1] for b in loader]).tolist()
            assert len(got) == len(set(got)) and len(loader) * 8 >= len(got)
            seen.append(set(got))
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(range(x.shape[0]))  # 96 = 2 x 6 full batches: nothing dropped


def test_noise_mixup_and_cutmix_match_the_torch_ops_on_the_same_images(fmnist):
    """Same op names, same laws: the DALI view and the torch op applied to the DALI plain batch."""
    x, y = fmnist
    stats = {op: {"dali": [], "torch": []} for op in ("noise", "mixup", "cutmix")}
    rng = PerturbRNG(0)
    for op in stats:
        loader = arrays(x, y, train=True, batch_size=8, ops=[op], pad=2)
        for _ in range(12):  # 12 epochs of 12 batches: 144 draws of each law
            for plain, labels, view in loader:
                theirs = OPS[op]()(plain, labels, rng)
                if op == "noise":  # the std of the added noise, per batch
                    stats[op]["dali"].append(float((view.x - plain).std()))
                    stats[op]["torch"].append(float((theirs.x - plain).std()))
                    continue
                stats[op]["dali"].append(view.lam)
                stats[op]["torch"].append(float(theirs.lam))
                if op == "mixup":  # pert_i = lam * plain_i + (1 - lam) * plain_j with y_b[i] = y[j]
                    rest = view.x - view.lam * plain
                    for i in range(plain.shape[0]):
                        matches = [j for j in range(plain.shape[0]) if labels[j] == view.y_b[i]
                                   and torch.allclose(rest[i], (1 - view.lam) * plain[j], atol=2e-2)]
                        assert matches, f"sample {i} is not a mixup of its partner"
                else:  # the pasted box covers 1 - lam of the image
                    changed = (view.x != plain).flatten(1).float().mean(1)
                    assert float(changed.max()) <= 1 - view.lam + 1e-6
    sigma = stats["noise"]
    assert all(0.09 < s < 0.51 for s in sigma["dali"] + sigma["torch"])  # std drawn from [0.1, 0.5]
    assert abs(np.mean(sigma["dali"]) - np.mean(sigma["torch"])) < 0.05  # both ~0.3 (SE ~0.01 each)
    for op in ("mixup", "cutmix"):
        ours, theirs = stats[op]["dali"], stats[op]["torch"]
        assert all(0.0 <= v <= 1.0 for v in ours)
        assert abs(np.mean(ours) - np.mean(theirs)) < 0.12, op  # 3.5 SE of the difference
    assert 0.35 < np.mean(stats["mixup"]["dali"]) < 0.65  # Beta(1, 1): mean 0.5


def test_crop_takes_the_same_share_of_the_image_as_the_torch_op(tmp_path):
    """Area fraction 0.3-0.7 in both paths, measured on ramp images (a pixel's value is its column / row)."""
    from PIL import Image

    size = 64
    ramp = np.zeros((size, size, 3), np.uint8)
    ramp[..., 0] = np.linspace(0, 255, size, dtype=np.float32)[None, :].round()
    ramp[..., 1] = np.linspace(0, 255, size, dtype=np.float32)[:, None].round()
    for split in ("train", "val"):
        (tmp_path / split / "ramp").mkdir(parents=True)
        for i in range(16):
            Image.fromarray(ramp).save(tmp_path / split / "ramp" / f"{i}.png")
    loader = folder(tmp_path, "train", train=True, batch_size=16, ops=["crop"], image_size=size)

    def area(crop, base):  # width share x height share of ``crop`` within ``base``, per sample
        span = lambda t, c: t[:, c].flatten(1).amax(1) - t[:, c].flatten(1).amin(1)  # noqa: E731
        return (span(crop, 0) / span(base, 0)) * (span(crop, 1) / span(base, 1))

    ours, theirs, rng = [], [], PerturbRNG(0)
    for _ in range(8):
        for plain, labels, view in loader:
            ours += area(view.x, plain).tolist()
            theirs += area(OPS["crop"]()(plain, labels, rng).x, plain).tolist()
    assert min(ours) > 0.2 and max(ours) < 0.75  # 0.3-0.7, less a pixel of interpolation at the edges
    assert abs(np.mean(ours) - np.mean(theirs)) < 0.05, (np.mean(ours), np.mean(theirs))


def test_the_group_gives_the_view_to_exactly_the_chosen_network(fmnist):
    x, y = fmnist
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(28 * 28, 10)

        def forward(self, inp):
            seen.append(inp)
            return self.fc(inp.flatten(1)), self.fc.weight.sum() * inp.flatten(1)[:, :4]

    group = cdfast.CompetitiveDistillation([Recorder(), Recorder(), Recorder()], perturb=True, seed=3)
    loader = arrays(x, y, train=True, batch_size=16, ops=["mixup"], pad=2)
    plain, labels, view = next(iter(loader))
    out = group.losses(plain, labels, perturbed=view)
    r = out.perturbed
    assert r >= 0 and out.perturbation == "mixup"
    assert [torch.equal(seen[i], view.x if i == r else plain) for i in range(3)] == [True] * 3
    with torch.no_grad():
        logits = [net.fc(inp.flatten(1)) for net, inp in zip(group.networks, seen)]
    ce = torch.nn.functional.cross_entropy
    for i in range(3):  # the perturbed network's CE mixes the view's labels; the others use the plain labels
        want = view.lam * ce(logits[i], labels) + (1 - view.lam) * ce(logits[i], view.y_b) if i == r \
            else ce(logits[i], labels)
        torch.testing.assert_close(out.ce[i].detach(), want, rtol=1e-5, atol=1e-6)
    assert group.step(plain, labels, perturbed=view).perturbation in ("mixup", None)
    with pytest.raises(ValueError, match="perturbed view must be a tensor like the batch"):
        group.step(plain, labels, perturbed=cdfast.perturb.Perturbed(plain[:4], labels, labels, 1.0, "noise"))
    with pytest.raises(ValueError, match="must name its op"):
        group.step(plain, labels, perturbed=cdfast.perturb.Perturbed(plain, labels, labels, 1.0))


def test_bad_folders_and_images_get_clear_errors(jpeg_folder, tmp_path):
    classes = ["a", "b"]
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images in its class folders"):
        DaliLoader.from_folder(tmp_path / "empty", classes, train=False, batch_size=4, image_size=8, in_channels=3,
                               mean=(0.5,) * 3, std=(0.5,) * 3, seed=0)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes((jpeg_folder / "val").rglob("*.jpg").__next__().read_bytes())
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        load_data("imagefolder", str(tmp_path / "flat"), loader="dali")
    broken = tmp_path / "broken"
    for split in ("train", "val"):
        for c in ("class_0", "class_1"):
            (broken / split / c).mkdir(parents=True)
            for f in list((jpeg_folder / split / c).iterdir())[:5]:
                (broken / split / c / f.name).write_bytes(f.read_bytes())
    victim = sorted((broken / "train" / "class_1").iterdir())[2]
    victim.write_bytes(b"not an image")
    data = load_data("imagefolder", str(broken), loader="dali", batch_size=4, eval_batch_size=4, image_size=16,
                     perturb_ops=["noise"])
    with pytest.raises(BadImageError, match=f"cannot read image {victim}.*remove or replace the file"):
        for _ in data.train:
            pass
    empty = sorted((broken / "val" / "class_0").iterdir())[0]
    empty.write_bytes(b"")
    with pytest.raises(BadImageError, match="1 empty image file"):
        load_data("imagefolder", str(broken), loader="dali", batch_size=4, image_size=16)
    with pytest.raises(ValueError, match="the DALI pipeline has no elastic op"):
        arrays(torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64), train=True,
               batch_size=4, ops=["elastic"])


def test_config_refuses_what_the_dali_loader_cannot_do():
    with pytest.raises(ValueError, match="has no noise-clamp, jitter-blur op"):
        TrainConfig(loader="dali", perturb_ops=["authors"]).validate()
    with pytest.raises(ValueError, match="cannot take the DALI loader's perturbed views"):
        TrainConfig(loader="dali", engine="graph").validate()
    TrainConfig(loader="dali", perturb_ops=["authors"], perturb=False).validate()  # no views made: no ops needed


def test_without_dali_the_loader_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dali(name, *args, **kw):
        if name.startswith("nvidia.dali"):
            raise ImportError("No module named 'nvidia.dali'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(ImportError, match=r"pip install 'cdfast\[dali\]'"):
        load_data("fashion-mnist", loader="dali")


@pytest.mark.parametrize("data", ["fashion-mnist", "imagefolder"])
def test_training_runs_end_to_end_with_the_dali_loader(tmp_path, fmnist_root, jpeg_folder, data):
    extra = dict(data_dir=str(jpeg_folder), image_size=24) if data == "imagefolder" else dict(train_subset=256)
    cfg = TrainConfig(data=data, loader="dali", test_subset=64, batch_size=32, eval_batch_size=64, epochs=2,
                      out=str(tmp_path / "run"), progress=False, tensorboard=False, plots=False, device="cpu",
                      log_interval=2, bn_recalibration=1, **extra)
    first = Trainer(cfg)
    assert isinstance(first.data.train, DaliLoader) and isinstance(first.data.test, DaliLoader)
    first.fit(until_epoch=1)
    steps = (tmp_path / "run" / "steps.csv").read_text().splitlines()
    ops = {line.split(",")[4] for line in steps[1:]}
    assert ops <= set(DALI_OPS) and ops  # the loader's ops reached the records
    resumed = Trainer(cfg, resume=tmp_path / "run")
    summary = resumed.fit()
    assert summary["epochs"] == 2 and all(0.0 <= a <= 1.0 for a in summary["final_acc"])
    assert resumed.data.train.state_dict() == {"epoch": 2}


@pytest.mark.cuda
def test_gpu_pipelines_make_the_same_batches_on_the_device(jpeg_folder, fmnist):
    """The GPU pipeline ("mixed" decoding, every op on the device): shapes, devices, the in-memory
    evaluation equal to the torch loader's, seeded views reproducible, every op runnable."""
    x, y = fmnist
    dali = list(arrays(x, y, train=False, batch_size=40, device="cuda"))
    for (dx, dy), (tx, ty) in zip(dali, cdfast.data.TensorLoader(x, y, 40, mean=MEAN, std=STD)):
        assert dx.is_cuda and dy.is_cuda
        torch.testing.assert_close(dx.cpu(), tx, atol=1e-5, rtol=0)
        assert torch.equal(dy.cpu(), ty)
    for op in DALI_OPS:
        first, again = (list(folder(jpeg_folder, "train", train=True, batch_size=8, ops=[op], device="cuda"))
                        for _ in range(2))
        for (ax, ay, av), (bx, by, bv) in zip(first, again):
            assert ax.is_cuda and av.x.is_cuda and av.op == op and ax.shape == (8, 3, 24, 24)
            assert torch.equal(ax, bx) and torch.equal(av.x, bv.x) and torch.equal(ay, by)
            assert torch.isfinite(av.x).all()
    evaluated = list(folder(jpeg_folder, "val", train=False, batch_size=8, device="cuda"))
    on_cpu = list(folder(jpeg_folder, "val", train=False, batch_size=8))
    for (gx, gy), (cx, cy) in zip(evaluated, on_cpu):
        assert torch.equal(gy.cpu(), cy)
        assert (gx.cpu() - cx).abs().mean() < 0.05  # nvJPEG and the CPU decoder may round differently


def test_pad_crop_shifts_are_uniform_over_minus_pad_to_pad():
    """The in-memory augmentation shifts by -pad..pad pixels, each equally likely (as the torch loader)."""
    pad, size = 2, 12
    images = torch.zeros(64, 1, size, size, dtype=torch.uint8)
    images[:, :, size // 2, :] = 255  # one bright row: its new position is the vertical shift
    loader = arrays(images, torch.zeros(64, dtype=torch.int64), train=True, batch_size=64, pad=pad, image_size=size)
    shifts = []
    for _ in range(8):
        for x, _ in loader:
            rows = x[:, 0].amax(-1).argmax(-1)  # the bright row of each sample (none is lost: |shift| < size / 2)
            shifts += (rows - size // 2).tolist()
    counts = np.bincount(np.asarray(shifts) + pad, minlength=2 * pad + 1)
    assert len(counts) == 2 * pad + 1, f"shifts outside [-{pad}, {pad}]: {sorted(set(shifts))}"
    assert counts.min() > 0.6 * len(shifts) / (2 * pad + 1)  # each of the 5 shifts ~1/5 of 512 draws


def test_an_empty_cutmix_box_is_parked_outside_the_image():
    """A box too small to hold a pixel pastes nothing, at (s, s): on the GPU a zero-size paste at an
    anchor inside the image would open a region there that never closes."""
    from cdfast.data.dali import _BatchNumbers

    numbers = _BatchNumbers(["cutmix"], batch_size=2, image_size=3, seed=0)
    empty = 0
    for _ in range(400):
        _, lam, _, anchors, shapes = numbers()
        box_anchor, box_shape = anchors[0][1], shapes[0][1]
        if (box_shape == 0).any():
            empty += 1
            assert tuple(box_anchor) == (3, 3) and tuple(box_shape) == (0, 0) and float(lam[0]) == 1.0
        else:
            assert float(lam[0]) == pytest.approx(1 - box_shape.prod() / 9)
    assert empty > 0  # the case happens at this size


@pytest.mark.parametrize("source", ["arrays", "folder"])
def test_a_state_taken_between_batches_continues_at_the_next_batch(fmnist, jpeg_folder, source, capsys):
    """A checkpoint within an epoch: DALI's random state is its pipeline's, so the resumed loader runs the
    batches before the position again (unused) and hands out exactly what an uninterrupted one would."""
    def loader():
        kw = dict(train=True, batch_size=8, ops=["noise", "mixup", "cutmix"])
        return arrays(*fmnist, pad=2, **kw) if source == "arrays" else folder(jpeg_folder, "train", **kw)

    def flat(batch):
        x, y, p = batch
        return [x, y, p.x, p.y_b, torch.tensor(p.lam), p.op]

    one = loader()
    expected = [flat(b) for _ in range(2) for b in one]
    two = loader()
    epoch = iter(two)
    seen = [flat(next(epoch)) for _ in range(3)]
    state = two.state_dict()
    assert state == {"epoch": 1, "next_batch": 3}
    three = loader()
    three.load_state_dict(state)
    assert three.state_dict() == state  # loaded, not iterated yet: a checkpoint now keeps the position
    resumed = iter(three)
    seen.append(flat(next(resumed)))
    assert three.replay_seconds > 0  # the re-run batches' time, which the trainer leaves out of images/s
    seen += [flat(b) for b in resumed]
    seen += [flat(b) for b in three]
    assert three.replay_seconds == 0.0  # the next epoch re-runs nothing
    assert "running the 3 batches of epoch 1 before the checkpoint again" in capsys.readouterr().out
    assert len(seen) == len(expected) == 2 * len(one)
    for got, want in zip(seen, expected):
        for a, b in zip(got, want):
            assert (a == b) if isinstance(a, str) else torch.equal(a, b)
    assert three.state_dict() == {"epoch": 2}
    with pytest.raises(ValueError, match="saved for other data"):
        loader().load_state_dict({"epoch": 1, "next_batch": len(one)})


def test_batches_are_tensors_torch_allocated_not_dalis_buffers(fmnist):
    """The pipeline runs with exec_dynamic=False, so the iterator copies each output into a tensor torch
    allocated: DALI reuses its own buffers only after that copy (on a GPU, after the copy on torch's
    stream), never while a queued copy may still read them. Held batches keep their values."""
    loader = arrays(*fmnist, train=True, batch_size=8, ops=["noise", "mixup"])
    assert loader._build(1, loader.shard(1)).exec_dynamic is False
    batches = iter(loader)
    first = next(batches)
    kept = [t.clone() if isinstance(t, torch.Tensor) else t for t in first[:2]] + [first[2].x.clone()]
    for _ in range(3):
        next(batches)
    assert torch.equal(first[0], kept[0]) and torch.equal(first[1], kept[1]) and torch.equal(first[2].x, kept[2])
