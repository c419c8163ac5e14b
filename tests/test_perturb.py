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
    if not getattr(OPS[name], "deterministic", False):
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


def test_crop_stays_inside_the_image_with_no_black_at_its_edges(monkeypatch):
    import torch.nn.functional as F

    grids = []
    sample = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda x, grid, **kw: grids.append(grid) or sample(x, grid, **kw))
    x = torch.full((400, 1, 8, 8), 0.7)
    out = OPS["crop"]()(x, torch.zeros(400, dtype=torch.long), PerturbRNG(0)).x
    assert len(grids) == 1 and grids[0].abs().max() <= 1.0  # every sample point lies inside the image
    # and the samples beyond the outer pixel centres take the edge pixels (zero padding blended the
    # outside into crops that touch the border): a flat image stays flat
    torch.testing.assert_close(out, x)


def test_affine_moves_the_image_by_the_translation_whatever_the_rotation_scale_and_shear():
    # The image centre goes to the drawn shift t (a fraction of the side), not to A^-1 t.
    from cdfast.perturb.ops import _uniform

    n, size, translate = 400, 32, 0.2
    r = torch.arange(size) - (size - 1) / 2
    blob = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / 4).expand(n, 1, size, size).contiguous()
    out = OPS["affine"](degrees=30.0, scale=(0.8, 1.2), shear=15.0, translate=translate)(
        blob, torch.zeros(n, dtype=torch.long), PerturbRNG(0)).x[:, 0]
    mass = out.sum((1, 2))
    dx, dy = (out * r[None, :]).sum((1, 2)) / mass, (out * r[:, None]).sum((1, 2)) / mass
    rng = PerturbRNG(0)  # the op's draws again, in its order: angle, shear, scale, then the shift
    for low, high in ((-30.0, 30.0), (-15.0, 15.0), (0.8, 1.2)):
        _uniform(low, high, n, blob, rng)
    tx, ty = (_uniform(-translate, translate, n, blob, rng) * size for _ in range(2))
    torch.testing.assert_close(dx, tx, atol=0.1, rtol=0)
    torch.testing.assert_close(dy, ty, atol=0.1, rtol=0)
    assert tx.abs().max() > 0.9 * translate * size  # the whole range is drawn


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


# ---- device-side draws: the same laws as the host-drawn versions they replaced -------------------

def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs. Values
    are rounded to 1e-6 first, so a discrete law's atoms (float32 vs float64) line up."""
    a, b = (torch.sort((torch.as_tensor(v, dtype=torch.float64) * 1e6).round())[0] for v in (a, b))
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


KS_LIMIT = 1.95 * (2 / 3000) ** 0.5  # two samples of 3000: p < 0.001 if the laws were equal


def host_cutmix_lam(rnd, alpha, h, w):
    """The host-drawn cut-out box of earlier versions (random.Random), reduced to its mixing weight."""
    import math
    ratio = math.sqrt(1.0 - rnd.betavariate(alpha, alpha))
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = rnd.randrange(h), rnd.randrange(w)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    return 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_device_drawn_mixup_and_cutmix_weights_follow_the_host_laws(alpha):
    import random
    x, y = batch(b=2, h=9, w=7)
    rng, rnd = PerturbRNG(11), random.Random(11)
    mix = [Mixup(alpha)(x, y, rng).lam.item() for _ in range(3000)]
    cut = [CutMix(alpha)(x, y, rng).lam.item() for _ in range(3000)]
    host_mix = [rnd.betavariate(alpha, alpha) for _ in range(3000)]
    host_cut = [host_cutmix_lam(rnd, alpha, 9, 7) for _ in range(3000)]
    assert ks_statistic(mix, host_mix) < KS_LIMIT
    assert ks_statistic(cut, host_cut) < KS_LIMIT
    assert ks_statistic(mix, [random.Random(5).random() ** 3 for _ in range(3000)]) > KS_LIMIT  # the test can fail


def test_device_drawn_noise_std_is_uniform_over_its_range():
    x = torch.zeros(1, 1, 64, 64)
    noise = OPS["noise"](std=(0.1, 0.5))
    rng = PerturbRNG(2)
    stds = torch.tensor([noise(x, torch.zeros(1, dtype=torch.long), rng).x.std().item() for _ in range(600)])
    assert 0.09 < stds.min() < 0.13 and 0.47 < stds.max() < 0.52  # 4096 pixels: the std is within ~2%
    assert ks_statistic(stds, torch.rand(600, generator=torch.Generator().manual_seed(0)) * 0.4 + 0.1) < 0.1


def test_partner_is_a_uniform_permutation():
    from cdfast.perturb.ops import _partner
    x = torch.zeros(4, 1, 1, 1)
    rng = PerturbRNG(0)
    perms = [tuple(_partner(x, rng).tolist()) for _ in range(4800)]
    counts = {p: perms.count(p) for p in set(perms)}
    assert len(counts) == 24 and all(140 < c < 260 for c in counts.values())  # 200 expected each


def test_drawn_weights_are_device_tensors_and_labels_mix_without_a_host_read():
    x, y = batch()
    for op in (Mixup(), CutMix()):
        out = op(x, y, PerturbRNG(0))
        assert isinstance(out.lam, torch.Tensor) and out.lam.dim() == 0 and out.mixes_labels
    assert not OPS["crop"]()(x, y, PerturbRNG(0)).mixes_labels
    assert Perturbed(x, y, y, 0.5).mixes_labels and not Perturbed(x, y, y, 1.0).mixes_labels


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(OPS))
def test_every_op_captures_in_a_cuda_graph_and_draws_afresh_each_replay(name):
    x, y = batch(b=8, h=16, w=16)
    x, y = x.cuda(), y.cuda()
    rng = PerturbRNG(4)
    op = OPS[name]()
    op(x, y, rng)  # warm-up outside the capture (allocations, lazy init)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(rng.on(x.device))
    with torch.cuda.graph(graph):
        out = op(x, y, rng)
    results = []
    for _ in range(3):
        graph.replay()
        results.append(out.x.clone())
    if getattr(op, "deterministic", False):
        torch.testing.assert_close(results[0], op(x, y, rng).x)
    else:
        assert not torch.equal(results[0], results[1]) and not torch.equal(results[1], results[2])
    assert torch.isfinite(results[2]).all()


def test_loading_an_early_state_rewinds_generators_made_after_it():
    x, y = batch()
    pool = PerturbationPool(seed=1)
    state = pool.state_dict()  # before any draw: no device generator exists yet
    first = pool.apply(0, x, y).x
    pool.load_state_dict(state)
    torch.testing.assert_close(pool.apply(0, x, y).x, first)


def test_warping_ops_fill_with_the_pools_black_level():
    x = torch.full((16, 2, 12, 12), 0.7)
    y = torch.zeros(16, dtype=torch.long)
    shift = dict(degrees=0.0, scale=(1.0, 1.0), shear=0.0, translate=0.5)
    grey = PerturbationPool([OPS["affine"](**shift)], seed=0).apply(0, x, y).x
    black = PerturbationPool([OPS["affine"](**shift)], seed=0, fill=(-1.5, -2.0)).apply(0, x, y).x
    assert grey.min() == 0.0  # no fill: the outside is 0, the mean colour
    assert black[:, 0].min() == pytest.approx(-1.5) and black[:, 1].min() == pytest.approx(-2.0)
    assert (black[:, 0] >= -1.5 - 1e-6).all() and (black[:, 0] <= 0.7 + 1e-6).all()
    elastic = PerturbationPool(["elastic"], seed=0, fill=(-1.5, -2.0)).apply(0, x, y).x
    assert (elastic[:, 0] >= -1.5 - 1e-6).all() and (elastic != 0).all()


def test_every_kth_step_schedule_and_its_state():
    import random

    pool = PerturbationPool(seed=3)
    picks = [pool.choose_network(2, every=10) for _ in range(30)]
    assert [i for i, p in enumerate(picks) if p >= 0] == [0, 10, 20]
    state = pool.state_dict()
    assert state["steps"] == 30
    nxt = [pool.choose_network(2, every=10) for _ in range(11)]
    pool.load_state_dict(state)
    assert [pool.choose_network(2, every=10) for _ in range(11)] == nxt
    # every=1 draws exactly what it always drew (old runs resume the same)
    plain, rnd = PerturbationPool(seed=4), random.Random(4)
    assert [plain.choose_network(3) for _ in range(20)] == [rnd.randrange(3) for _ in range(20)]


def test_authors_preset_and_its_ops():
    from cdfast.perturb import PRESETS

    pool = PerturbationPool(["authors"], seed=0, fill=(-1.0,), white=(2.0,))
    assert pool.names == list(PRESETS["authors"])
    x, y = batch(b=8, c=1, h=16, w=16)
    x = x.clamp(-1.0, 2.0)
    clamped = OPS["noise-clamp"]()
    clamped.fill, clamped.white = (-1.0,), (2.0,)
    out = clamped(x, y, PerturbRNG(0)).x
    assert out.min() == -1.0 and out.max() == 2.0 and not torch.equal(out, x)
    # flips: every sample is itself, mirrored left-right, upside-down, or both
    flipped = OPS["flip"]()(x, y, PerturbRNG(1)).x
    for i in range(8):
        assert any(torch.equal(flipped[i], v) for v in (x[i], x[i].flip(-1), x[i].flip(-2), x[i].flip(-1).flip(-2)))
    # jitter + blur keeps a constant image constant apart from the brightness/contrast change, and blurs edges
    const = torch.full((4, 1, 16, 16), 0.5)
    jb = OPS["jitter-blur"]()(const, torch.zeros(4, dtype=torch.long), PerturbRNG(2)).x
    assert torch.allclose(jb, jb[:, :, :1, :1].expand_as(jb), atol=1e-5)
    edge = torch.zeros(2, 1, 16, 16)
    edge[..., 8:] = 1.0
    blurred = OPS["jitter-blur"](strength=0.0, blur=(1.5, 1.5))(edge, torch.zeros(2, dtype=torch.long), PerturbRNG(3)).x
    assert 0.0 < blurred[0, 0, 5, 7] < 0.5 < blurred[0, 0, 5, 8] < 1.0
    # rotation: a pure rotation keeps the centre pixel of an odd-sized image
    odd = torch.randn(4, 1, 15, 15)
    rot = OPS["rotate"]()(odd, torch.zeros(4, dtype=torch.long), PerturbRNG(4)).x
    torch.testing.assert_close(rot[:, :, 7, 7], odd[:, :, 7, 7], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="or a preset: paper, authors"):
        PerturbationPool(["author"])


@pytest.mark.parametrize("channels", [1, 3])
def test_authors_code_colour_op_is_torchvisions_colorjitter_and_blur_on_the_batch(channels):
    # the factors the op draws, replayed through torchvision's own functions (what the authors' code runs)
    import torchvision.transforms.v2.functional as TF

    from cdfast.perturb.ops import _uniform

    torch.manual_seed(0)
    pixels = torch.rand(5, channels, 17, 20)
    mean, std = torch.rand(channels) * 0.5 + 0.2, torch.rand(channels) * 0.3 + 0.2
    x = (pixels - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    op = OPS["jitter-blur-batch"]()
    op.fill, op.white = tuple((-mean / std).tolist()), tuple(((1 - mean) / std).tolist())
    out = op(x, torch.zeros(5, dtype=torch.long), PerturbRNG(3)).x
    replay = PerturbRNG(3)
    u = _uniform(0.0, 1.0, 5, x, replay)
    sigma = float(_uniform(0.1, 2.0, 1, x, replay))
    want = TF.adjust_brightness(pixels, float(0.75 + 0.5 * u[0]))
    want = TF.adjust_contrast(want, float(0.85 + 0.3 * u[1]))
    want = TF.adjust_saturation(want, float(0.85 + 0.3 * u[2]))
    want = TF.adjust_hue(want, float((u[3] - 0.5) * 0.3))
    want = TF.gaussian_blur(want, kernel_size=[7, 9], sigma=[sigma, sigma])
    torch.testing.assert_close(out * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1), want, atol=2e-5, rtol=2e-5)


def test_authors_code_preset_flips_and_rotates_the_whole_batch():
    from cdfast.perturb import PRESETS

    pool = PerturbationPool(["authors-code"], seed=0, fill=(-1.0,), white=(2.0,))
    assert pool.names == list(PRESETS["authors-code"]) == ["mixup", "noise-clamp", "jitter-blur-batch", "hflip",
                                                           "vflip", "rotate-batch"]
    x, y = batch(b=6, c=1, h=15, w=15)
    torch.testing.assert_close(OPS["hflip"]()(x, y, PerturbRNG(0)).x, x.flip(-1))
    torch.testing.assert_close(OPS["vflip"]()(x, y, PerturbRNG(0)).x, x.flip(-2))
    same = x[:1].expand(6, -1, -1, -1).contiguous()
    rot = OPS["rotate-batch"]()(same, y, PerturbRNG(4)).x  # one angle: identical images stay identical
    torch.testing.assert_close(rot, rot[:1].expand_as(rot))
    assert not torch.equal(rot, same)
    per_sample = OPS["rotate"]()(same, y, PerturbRNG(4)).x
    assert not torch.allclose(per_sample, per_sample[:1].expand_as(per_sample))


def test_a_group_without_its_images_levels_says_so_and_takes_them_from_the_normalization():
    import cdfast
    from cdfast.models import build_model

    nets = [build_model("resnet8", 10, 1) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"\['affine'\] fill, clamp or scale with the black and white"):
        cdfast.CompetitiveDistillation(nets)
    group = cdfast.CompetitiveDistillation(nets, normalization=((0.25,), (0.5,)))
    assert OPS["affine"] is type(group.pool.ops[4]) and group.pool.ops[4].fill == (-0.5,)
    assert group.pool.fill == (-0.5,) and group.pool.white == (1.5,)
    with pytest.raises(ValueError, match="a ready PerturbationPool takes them itself"):
        cdfast.CompetitiveDistillation(nets, perturb_ops=PerturbationPool(None), normalization=((0.25,), (0.5,)))
