"""The perturbation pool: shapes, labels, reproducibility, and the choice of one network."""

import pytest
import torch

from cdfast.perturb import OPS, CutMix, Mixup, Perturbed, PerturbationPool, PerturbRNG


def batch(b=6, c=3, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.arange(b)


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_keeps_shape_and_is_seeded(name):
    x, y = batch()
    a = OPS[name]()(x, y, PerturbRNG(7))
    b = OPS[name]()(x, y, PerturbRNG(7))
    c = OPS[name]()(x, y, PerturbRNG(8))
    assert isinstance(a, Perturbed) and a.x.shape == x.shape and a.x.dtype == x.dtype
    torch.testing.assert_close(a.x, b.x)
    assert not torch.equal(a.x, x), f"{name} left the batch unchanged"
    assert not torch.equal(a.x, c.x), f"{name} ignores its seed"
    assert 0.0 <= a.lam <= 1.0


def test_mixup_blends_images_and_labels():
    x, y = batch()
    out = Mixup()(x, y, PerturbRNG(3))
    partner = out.y_b  # labels are arange, so y_b is the permutation itself
    torch.testing.assert_close(out.x, out.lam * x + (1 - out.lam) * x[partner])
    assert torch.equal(out.y_a, y)


def test_cutmix_labels_mixed_by_area():
    x, y = batch(b=8, h=16, w=16)
    for seed in range(5):
        out = CutMix()(x, y, PerturbRNG(seed))
        partner = out.y_b  # labels are arange, so y_b is the partner index
        moved = partner != y  # a sample paired with itself shows no paste
        assert moved.any()
        from_partner = (out.x == x[partner]).all(1) & ~(out.x == x).all(1)
        pasted = from_partner[moved].float().mean().item()
        assert out.lam == pytest.approx(1.0 - pasted, abs=1e-6)


def test_crop_area_scale():
    # Channel 0 holds each pixel's x coordinate, channel 1 its y coordinate (in [-1, 1]),
    # so the slope of the output ramps reveals the crop's width and height fractions.
    n, size = 200, 32
    coords = (torch.arange(size) * 2 + 1) / size - 1
    x = torch.stack([coords.expand(size, size), coords[:, None].expand(size, size)]).expand(n, 2, size, size)
    out = OPS["crop"]()(x.contiguous(), torch.zeros(n, dtype=torch.long), PerturbRNG(0)).x
    c = size // 2
    w = (out[:, 0, c, c + 1] - out[:, 0, c, c - 1]) / 2 * size / 2
    h = (out[:, 1, c + 1, c] - out[:, 1, c - 1, c]) / 2 * size / 2
    area = w * h
    assert area.min() > 0.3 - 1e-3 and area.max() < 0.7 + 1e-3
    assert area.max() - area.min() > 0.3  # the scale is drawn per sample


def test_pool_chooses_one_network_uniformly_and_respects_prob():
    pool = PerturbationPool(seed=0)
    picks = [pool.choose_network(3) for _ in range(600)]
    assert set(picks) == {0, 1, 2}
    assert all(150 < picks.count(i) < 250 for i in range(3))
    assert all(pool.choose_network(3, prob=0.0) == -1 for _ in range(50))
    half = [pool.choose_network(3, prob=0.5) for _ in range(400)]
    assert 120 < half.count(-1) < 280


def test_pool_state_round_trip():
    x, y = batch()
    pool = PerturbationPool(seed=1)
    pool.perturb(x, y)
    state = pool.state_dict()
    first, name1 = pool.perturb(x, y)
    pool.load_state_dict(state)
    second, name2 = pool.perturb(x, y)
    assert name1 == name2
    torch.testing.assert_close(first.x, second.x)


def test_custom_ops_and_errors():
    def flip(x, y, rng):
        return Perturbed(x.flip(-1), y, y, 1.0)

    pool = PerturbationPool([flip])
    out, name = pool.perturb(*batch())
    assert name == "flip"
    with pytest.raises(ValueError, match="unknown perturbation"):
        PerturbationPool(["blur-ish"])
    with pytest.raises(ValueError, match="empty"):
        PerturbationPool([])
    with pytest.raises(TypeError, match="Perturbed"):
        PerturbationPool([lambda x, y, rng: x]).perturb(*batch())
