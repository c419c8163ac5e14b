"""The competitive step: roles, gradients, modes, perturbation, adapters and bad input."""

import copy

import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast.perturb import OPS, Perturbed, PerturbationPool
from helpers import TinyNet


def make_group(n=2, seed=0, **kw):
    torch.manual_seed(seed)
    nets = [TinyNet() for _ in range(n)]
    kw.setdefault("perturb", False)
    return cdfast.CompetitiveDistillation(nets, optimizers=lambda p: torch.optim.SGD(p, lr=0.1), **kw)


def grads_of(net):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


def ce_only_grads(net, x, y):
    net = copy.deepcopy(net)
    net.zero_grad()
    logits, _ = net(x)
    nn.functional.cross_entropy(logits, y).backward()
    return grads_of(net)


def test_step_elects_argmin_and_teacher_trains_on_labels_only(tiny_batch):
    x, y = tiny_batch
    group = make_group(3)
    before = copy.deepcopy(group.networks)
    out = group.losses(x, y)
    teacher = int(out.teacher)
    assert teacher == int(torch.argmin(out.ce))
    assert out.distill[teacher] == 0 and (out.distill[torch.arange(3) != teacher] > 0).all()
    out.loss.sum().backward()
    for g, w in zip(grads_of(group.networks[teacher]), ce_only_grads(before[teacher], x, y)):
        torch.testing.assert_close(g, w)
    student = (teacher + 1) % 3
    differs = any(not torch.allclose(g, w) for g, w in
                  zip(grads_of(group.networks[student]), ce_only_grads(before[student], x, y)))
    assert differs, "a student's gradient should include the distillation terms"


def test_step_updates_every_network_and_returns_device_teacher(tiny_batch):
    x, y = tiny_batch
    group = make_group(2)
    before = [copy.deepcopy(n.state_dict()) for n in group.networks]
    result = group.step(x, y)
    assert isinstance(result.teacher, torch.Tensor) and result.teacher.dim() == 0
    for net, old in zip(group.networks, before):
        assert not torch.equal(net.conv.weight, old["conv.weight"])


def test_student_loss_matches_manual_formula(tiny_batch):
    x, y = tiny_batch
    group = make_group(2, alpha=0.5, beta=2.0, temperature=3.0)
    out = group.losses(x, y)
    (z0, f0), (z1, f1) = [net(x) for net in group.networks]
    t = int(out.teacher)
    zs, fs, zt, ft = (z1, f1, z0, f0) if t == 0 else (z0, f0, z1, f1)
    want = cdfast.student_loss(zs, zt, fs, ft, temperature=3.0, alpha=0.5, beta=2.0)
    torch.testing.assert_close(out.distill[1 - t], want)


def test_independent_mode_is_plain_cross_entropy(tiny_batch):
    x, y = tiny_batch
    group = make_group(2, mode="independent")
    before = copy.deepcopy(group.networks)
    out = group.losses(x, y)
    assert torch.count_nonzero(out.distill) == 0
    out.loss.sum().backward()
    for i in range(2):
        for g, w in zip(grads_of(group.networks[i]), ce_only_grads(before[i], x, y)):
            torch.testing.assert_close(g, w)


def test_dml_mode_learns_from_all_others(tiny_batch):
    x, y = tiny_batch
    group = make_group(3, mode="dml", feature_loss=False)
    out = group.losses(x, y)
    logits = [net(x)[0] for net in group.networks]
    for i in range(3):
        want = sum(cdfast.student_loss(logits[i], logits[j]) for j in range(3) if j != i) / 2
        torch.testing.assert_close(out.distill[i], want)


def test_all_better_mode(tiny_batch):
    x, y = tiny_batch
    group = make_group(3, teachers="all-better")
    out = group.losses(x, y)
    outs = [net(x) for net in group.networks]
    order = sorted(range(3), key=lambda i: (out.ce[i].item(), i))
    for rank, i in enumerate(order):
        better = order[:rank]
        want = (sum(cdfast.student_loss(outs[i][0], outs[j][0], outs[i][1], outs[j][1]) for j in better) / len(better)
                if better else torch.tensor(0.0))
        torch.testing.assert_close(out.distill[i], want)


class FixedMix:
    """A deterministic mixing op: blend with the reversed batch, lam = 0.3."""

    name = "fixed-mix"

    def __call__(self, x, y, rng):
        return Perturbed(0.3 * x + 0.7 * x.flip(0), y, y.flip(0), 0.3)


class Recorder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []
        self.num_classes, self.in_channels = net.num_classes, net.in_channels

    def forward(self, x):
        self.seen.append(x)
        return self.net(x)


def test_exactly_one_network_is_perturbed_with_mixed_labels(tiny_batch):
    x, y = tiny_batch
    torch.manual_seed(0)
    nets = [Recorder(TinyNet()) for _ in range(3)]
    group = cdfast.CompetitiveDistillation(nets, perturb=True, perturb_ops=PerturbationPool([FixedMix()], seed=5))
    seen_perturbed = set()
    for _ in range(12):
        for n in nets:
            n.seen.clear()
        out = group.losses(x, y)
        r = out.perturbed
        seen_perturbed.add(r)
        assert out.perturbation == "fixed-mix"
        changed = [i for i, n in enumerate(nets) if not torch.equal(n.seen[0], x)]
        assert changed == [r]
        logits = nets[r].net(nets[r].seen[0])[0]
        ce = nn.functional.cross_entropy
        want = 0.3 * ce(logits, y) + 0.7 * ce(logits, y.flip(0))
        torch.testing.assert_close(out.ce[r], want)
        for i in set(range(3)) - {r}:
            torch.testing.assert_close(out.ce[i], ce(nets[i].net(x)[0], y))
    assert seen_perturbed == {0, 1, 2}


def test_no_perturbation_when_disabled(tiny_batch):
    group = make_group(2, perturb=False)
    assert all(group.losses(*tiny_batch).perturbed == -1 for _ in range(5))
    assert cdfast.CompetitiveDistillation([TinyNet(), TinyNet()], mode="dml").perturb is False
    assert cdfast.CompetitiveDistillation([TinyNet(), TinyNet()]).perturb is True


@pytest.mark.parametrize("feature_map", [False, True])
def test_adapters_for_mismatched_features(tiny_batch, feature_map):
    x, y = tiny_batch
    torch.manual_seed(0)
    nets = [TinyNet(feat_dim=4, feature_map=feature_map), TinyNet(feat_dim=12, feature_map=feature_map)]
    group = cdfast.CompetitiveDistillation(nets, perturb=False, input_shape=(1, 8, 8))
    assert sorted(group.adapters.pairs.keys()) == ["0_1", "1_0"]
    # each student's optimizer owns its adapters
    opt_params = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in group.optimizers]
    for key, adapter in group.adapters.pairs.items():
        owner = int(key[0])
        assert all(id(p) in opt_params[owner] for p in adapter.parameters())
        assert not any(id(p) in opt_params[1 - owner] for p in adapter.parameters())
    out = group.losses(x, y)
    out.loss.sum().backward()
    t = int(out.teacher)
    student_adapter = group.adapters.pairs[f"{1 - t}_{t}"]
    unused_adapter = group.adapters.pairs[f"{t}_{1 - t}"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student_adapter.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in unused_adapter.parameters())
    group.step(x, y)  # the full step runs too


def test_mismatched_features_without_input_shape_is_a_clear_error(tiny_batch):
    group = cdfast.CompetitiveDistillation([TinyNet(feat_dim=4), TinyNet(feat_dim=6)], perturb=False)
    with pytest.raises(ValueError, match="input_shape"):
        group.losses(*tiny_batch)


def test_user_optimizers_get_adapter_params():
    nets = [TinyNet(feat_dim=4), TinyNet(feat_dim=6)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    group = cdfast.CompetitiveDistillation(nets, opts, input_shape=(1, 8, 8))
    assert len(group.optimizers[0].param_groups) == 2


def test_bad_groups_and_batches(tiny_batch):
    x, y = tiny_batch
    with pytest.raises(ValueError, match="N >= 2"):
        cdfast.CompetitiveDistillation([TinyNet()])
    with pytest.raises(ValueError, match="different numbers of classes"):
        cdfast.CompetitiveDistillation([TinyNet(num_classes=10), TinyNet(num_classes=5)])
    with pytest.raises(ValueError, match="mode=.teacher-student.; choose one of"):
        cdfast.CompetitiveDistillation([TinyNet(), TinyNet()], mode="teacher-student")
    with pytest.raises(ValueError, match="only applies"):
        cdfast.CompetitiveDistillation([TinyNet(), TinyNet()], mode="dml", teachers="all-better")
    group = make_group(2)
    with pytest.raises(ValueError, match="expects 1-channel images"):
        group.losses(torch.randn(4, 3, 8, 8), y[:4])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        group.losses(torch.randn(4, 64), y[:4])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        group.losses(x, torch.full_like(y, 10))
    with pytest.raises(ValueError, match="cannot take images"):
        cdfast.CompetitiveDistillation([TinyNet(), TinyNet()], input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="optimizers for"):
        nets = [TinyNet(), TinyNet()]
        cdfast.CompetitiveDistillation(nets, [torch.optim.SGD(nets[0].parameters(), lr=0.1)])


@pytest.mark.cuda
def test_step_makes_no_host_sync_on_cuda():
    torch.manual_seed(0)
    nets = [TinyNet().cuda() for _ in range(2)]
    group = cdfast.CompetitiveDistillation(nets, perturb=False)
    x, y = torch.randn(16, 1, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    group.step(x, y)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        group.step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.parametrize("op", list(OPS))
def test_step_with_every_perturbation_makes_no_host_sync(op):
    torch.manual_seed(0)
    nets = [TinyNet().cuda() for _ in range(2)]
    group = cdfast.CompetitiveDistillation(nets, perturb=True, perturb_ops=[op], seed=1)
    x, y = torch.randn(16, 1, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    group.step(x, y)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            assert group.step(x, y).perturbation == op
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_gpu_resident_loader_makes_no_host_sync_per_batch():
    from cdfast.data import TensorLoader

    images = torch.randint(0, 255, (64, 1, 8, 8), dtype=torch.uint8)
    loader = TensorLoader(images, torch.randint(0, 10, (64,)), 16, mean=(0.5,), std=(0.5,), shuffle=True,
                          augment_pad=2, device="cuda")
    batches = iter(loader)
    next(batches)  # the epoch's order is copied once, at its start
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, _ in batches:
            assert x.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_loader_augmentation_is_the_same_stream_on_every_device():
    from cdfast.data.augment import pad_crop_flip

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    a = pad_crop_flip(x, 1, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, by hand, in the documented order
    offsets = torch.randint(0, 3, (2, 2), generator=g)
    mirror = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        crop = padded[i, :, offsets[0, i]:offsets[0, i] + 4, offsets[1, i]:offsets[1, i] + 4]
        torch.testing.assert_close(a[i], crop.flip(-1) if mirror[i] else crop)


class BNNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x):
        return super().forward(self.bn(x))


@pytest.mark.parametrize("update", [False, True])
def test_perturbed_batch_and_batchnorm_running_stats(tiny_batch, update):
    x, y = tiny_batch
    nets = [BNNet(), BNNet()]
    group = cdfast.CompetitiveDistillation(nets, perturb=True, perturbed_bn="updated" if update else "frozen",
                                           perturb_ops=PerturbationPool([FixedMix()], seed=0))
    before = [n.bn.running_mean.clone() for n in nets]
    out = group.losses(x, y)
    r = out.perturbed
    assert not torch.equal(nets[1 - r].bn.running_mean, before[1 - r])  # the clean network always updates
    assert torch.equal(nets[r].bn.running_mean, before[r]) is (not update)
    assert nets[r].bn.momentum == 0.1  # restored after the step


def test_perturb_every_kth_step(tiny_batch):
    x, y = tiny_batch
    group = make_group(2, perturb=True, perturb_every=3)
    perturbed = [group.step(x, y).perturbed >= 0 for _ in range(9)]
    assert perturbed == [True, False, False] * 3
    with pytest.raises(ValueError, match="perturb_every"):
        make_group(2, perturb=True, perturb_every=0)


# ---- protocol variants (issue 13) ---------------------------------------------------------------

def flip_op(x, y, rng):  # deterministic: the test can recompute the perturbed batch
    return Perturbed(x.flip(-1), y, y, 1.0)


def same_labels_mix(x, y, rng):  # images unchanged, labels "mixed" with themselves at lam = 0.5
    return Perturbed(x, y, y, 0.5)


@pytest.mark.parametrize("feature_map", [False, True])
def test_matched_inputs_distil_each_student_towards_the_teachers_view_of_its_own_batch(tiny_batch, feature_map):
    from cdfast import reference as R

    x, y = tiny_batch
    torch.manual_seed(0)
    nets = [TinyNet(feature_map=feature_map) for _ in range(3)]
    group = cdfast.CompetitiveDistillation(nets, perturb=True, perturb_ops=[flip_op], matched_inputs=True,
                                           alpha=0.7, beta=0.3, temperature=2.0)
    for _ in range(6):
        out = group.losses(x, y)
        r, t = out.perturbed, int(out.teacher)
        xp = x.flip(-1)
        with torch.no_grad():
            on_clean = [net(x) for net in nets]
            on_pert = [net(xp) for net in nets]
        for i in range(3):
            if i == t:
                assert out.distill[i] == 0
                continue
            student = (on_pert if i == r else on_clean)[i]
            view = (on_pert if i == r else on_clean)[t]  # the teacher on the student's own input
            want = R.student_loss(student[0], view[0], student[1], view[1], temperature=2.0, alpha=0.7, beta=0.3)
            torch.testing.assert_close(out.distill[i], want, atol=1e-5, rtol=1e-5)


def test_matched_inputs_agree_across_engines_and_rules():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 1, 12, 12, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
    from cdfast.models import build_model
    for teachers in ("best", "all-better"):
        groups = []
        for engine in ("sequential", "fused"):
            torch.manual_seed(0)
            nets = [build_model("resnet8", 10, 1).double() for _ in range(3)]
            groups.append(cdfast.CompetitiveDistillation(nets, engine=engine, teachers=teachers, matched_inputs=True,
                                                         input_shape=(1, 12, 12), seed=1))
        for _ in range(3):
            a, b = (grp.step(x, y) for grp in groups)
            assert a.perturbed == b.perturbed
            torch.testing.assert_close(a.loss, b.loss, atol=1e-8, rtol=1e-8)


def test_clean_equivalent_election_lets_a_mixed_label_network_win(tiny_batch):
    x, y = tiny_batch
    torch.manual_seed(0)
    net = TinyNet()
    for election, wins in (("ce", False), ("clean-equivalent", True)):
        group = cdfast.CompetitiveDistillation([copy.deepcopy(net) for _ in range(2)], perturb=True, seed=3,
                                               perturb_ops=[same_labels_mix], election=election)
        for _ in range(8):
            out = group.losses(x, y)
            # identical networks, identical images: the CEs tie; only the label-mix entropy separates them
            torch.testing.assert_close(out.ce[0], out.ce[1])
            assert (int(out.teacher) == out.perturbed) == (wins or out.perturbed == 0)
    with pytest.raises(ValueError, match="election=.*; choose one of ce, clean-equivalent"):
        make_group(2, election="lowest")


@pytest.mark.parametrize("mode", ["frozen", "updated", "clean"])
def test_mutated_networks_batchnorm_statistics(mode):
    from cdfast.models import build_model

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)
    torch.manual_seed(0)
    nets = [build_model("resnet8", 10, 1) for _ in range(2)]
    group = cdfast.CompetitiveDistillation(nets, perturb=True, perturb_ops=[flip_op], perturbed_bn=mode,
                                           input_shape=(1, 12, 12))
    before = copy.deepcopy(group.networks)
    out = group.losses(x, y)
    r = out.perturbed
    mean = lambda net: net.stem[1].running_mean  # noqa: E731
    ref = copy.deepcopy(before[r])
    with torch.no_grad():
        ref(x.flip(-1) if mode == "updated" else x)
    if mode == "frozen":
        assert torch.equal(mean(group.networks[r]), mean(before[r]))
    else:
        torch.testing.assert_close(mean(group.networks[r]), mean(ref))
    other = 1 - r  # the clean network updates its statistics on the clean batch in every mode
    ref_other = copy.deepcopy(before[other])
    with torch.no_grad():
        ref_other(x)
    torch.testing.assert_close(mean(group.networks[other]), mean(ref_other))
    with pytest.raises(ValueError, match="perturbed_bn='fresh'; choose one of frozen, updated, clean"):
        cdfast.CompetitiveDistillation(nets, perturbed_bn="fresh")


@pytest.mark.parametrize("models,teachers", [(("resnet8", "resnet14"), "best"), (("resnet8", "resnet14"), "all-better"),
                                             (("resnet8", "resnet8", "resnet8"), "best")])
def test_matched_inputs_with_an_identity_perturbation_are_the_plain_method(models, teachers):
    # When the perturbed batch is the clean batch, the teachers' two views coincide: every path
    # (fused kernel, weighted, adapters for different feature shapes) must give the same losses.
    from cdfast.models import build_model

    def identity(x, y, rng):
        return Perturbed(x.clone(), y, y, 1.0)

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 1, 12, 12, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
    losses = []
    for matched in (False, True):
        torch.manual_seed(0)
        nets = [build_model(m, 10, 1).double() for m in models]
        group = cdfast.CompetitiveDistillation(nets, teachers=teachers, matched_inputs=matched, perturb=True,
                                               perturb_ops=[identity], input_shape=(1, 12, 12)).double()
        losses.append(group.losses(x, y).loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-10, rtol=1e-10)
