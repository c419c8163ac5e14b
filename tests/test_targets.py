"""Targets as modern recipes make them: class probabilities, label smoothing and ignored labels give
what torch.nn.functional.cross_entropy gives, values and gradients, in competitive_ce and the group."""

import pytest
import torch
import torch.nn.functional as F

import cdfast

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def want_ce(logits, targets, **kw):
    """F.cross_entropy per network: the oracle."""
    return torch.stack([F.cross_entropy(z.double(), t if t.dtype == torch.int64 else t.double(), **kw)
                        for z, t in zip(logits, targets)]).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["soft", "soft+smoothing", "smoothing", "ignore", "ignore+smoothing"])
def test_competitive_ce_matches_f_cross_entropy(device, dtype, form):
    g = torch.Generator().manual_seed(0)
    n, b, k = 3, 7, 5
    logits = torch.randn(n, b, k, generator=g).to(device, dtype).requires_grad_()
    eps = 0.1 if "smoothing" in form else 0.0
    kw = {"label_smoothing": eps}
    if form.startswith("soft"):
        targets = torch.softmax(torch.randn(b, k, generator=g), -1).to(device)
        oracle_targets = targets.expand(n, b, k)
    else:
        targets = torch.randint(0, k, (b,), generator=g).to(device)
        if "ignore" in form:
            targets[[1, 4]] = -1
            kw["ignore_index"] = -1
        oracle_targets = targets.expand(n, b)
    ce, teacher = cdfast.competitive_ce(logits, targets, **kw)
    oracle_logits = logits.detach().float().requires_grad_()
    want = want_ce(oracle_logits, oracle_targets, **kw)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ce, want, **tol)
    assert int(teacher) == int(torch.argmin(want))
    ce.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(logits.grad.float(), oracle_logits.grad, **tol)


def test_mixed_labels_with_smoothing_mix_two_smoothed_losses():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 4, generator=g)
    ya, yb = torch.randint(0, 4, (6,), generator=g), torch.randint(0, 4, (6,), generator=g)
    lam = torch.tensor([0.3, 1.0])
    ce, _ = cdfast.competitive_ce(logits, ya, yb.expand(2, 6), lam, label_smoothing=0.2)
    for i in range(2):
        want = lam[i] * F.cross_entropy(logits[i], ya, label_smoothing=0.2) + \
            (1 - lam[i]) * F.cross_entropy(logits[i], yb, label_smoothing=0.2)
        torch.testing.assert_close(ce[i], want)


def test_soft_mixed_labels_equal_the_probability_mix():
    """torchvision's MixUp gives lam * onehot(y_a) + (1 - lam) * onehot(y_b): the same CE as mixed labels."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 3, generator=g)
    ya, yb = torch.randint(0, 3, (5,), generator=g), torch.randint(0, 3, (5,), generator=g)
    soft = 0.7 * F.one_hot(ya, 3).float() + 0.3 * F.one_hot(yb, 3).float()
    hard, _ = cdfast.competitive_ce(logits, ya, yb.expand(2, 5), torch.tensor([0.7, 0.7]))
    torch.testing.assert_close(cdfast.competitive_ce(logits, soft)[0], hard)


def test_every_label_ignored_gives_nan_and_is_never_elected():
    logits = torch.randn(2, 3, 4)
    y = torch.tensor([-100, -100, -100])
    ce, teacher = cdfast.competitive_ce(logits, y, ignore_index=-100)
    assert torch.isnan(ce).all() and int(teacher) == 0  # as F.cross_entropy: 0 / 0


def test_bad_targets_get_clear_errors():
    logits = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="class probabilities of shape \\[3, 5\\]"):
        cdfast.competitive_ce(logits, torch.rand(3, 5))
    with pytest.raises(ValueError, match="label_smoothing must be >= 0 and <= 1, got 1.5"):
        cdfast.competitive_ce(logits, torch.zeros(3, dtype=torch.int64), label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"class indices in \[0, 7\] but the (networks predict|logits have) 4"):  # ignore_index does not hide other bad labels
        cdfast.competitive_ce(logits, torch.tensor([0, -1, 7]), ignore_index=-1)
    with pytest.raises(TypeError, match="must both be class indices or both class probabilities"):
        cdfast.competitive_ce(logits, torch.rand(3, 4), torch.zeros(3, dtype=torch.int64), torch.ones(2))


def test_the_group_step_takes_soft_targets_and_smoothing():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4)) for _ in range(2)]
    x = torch.randn(6, 1, 4, 4)
    soft = torch.softmax(torch.randn(6, 4), -1)
    group = cdfast.CompetitiveDistillation(nets, feature_loss=False, perturb=True, perturb_ops=["mixup", "noise"],
                                           label_smoothing=0.1)
    out = group.losses(x, soft)
    with torch.no_grad():
        logits = torch.stack([net(x) for net in nets])
    r = out.perturbed
    for i in range(2):
        if i != r:  # the clean networks: F.cross_entropy of the soft targets with smoothing
            torch.testing.assert_close(out.ce[i].detach(), F.cross_entropy(logits[i], soft, label_smoothing=0.1))
    assert torch.isfinite(group.step(x, soft).loss).all()
    ignore = cdfast.CompetitiveDistillation(nets, feature_loss=False, perturb=False, ignore_index=-1)
    y = torch.tensor([0, 1, -1, 2, -1, 3])
    out = ignore.losses(x, y)
    with torch.no_grad():  # the step above moved the weights
        logits = torch.stack([net(x) for net in nets])
    torch.testing.assert_close(out.ce.detach(), torch.stack([F.cross_entropy(z, y, ignore_index=-1) for z in logits]))
    assert out.correct.shape == (2,) and bool(((0 <= out.correct) & (out.correct <= 1)).all())


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ignored_rows_count_for_nothing_even_with_inf_or_nan_logits(smoothing):
    logits = torch.randn(2, 4, 3)
    logits[:, 1, 0] = float("-inf")  # an ignored row: a masked class, and a NaN
    logits[:, 2] = float("nan")
    y = torch.tensor([1, -1, -1, 2])
    ce, _ = cdfast.competitive_ce(logits, y, ignore_index=-1, label_smoothing=smoothing)
    want = torch.stack([F.cross_entropy(z[[0, 3]], y[[0, 3]], label_smoothing=smoothing) for z in logits])
    torch.testing.assert_close(ce, want)



def test_one_lam_for_the_whole_group_equals_the_same_lam_per_network():
    torch.manual_seed(0)
    logits, y_a, y_b = torch.randn(3, 6, 5), torch.randint(0, 5, (6,)), torch.randint(0, 5, (6,))
    want = cdfast.competitive_ce(logits, y_a, y_b, torch.full((3,), 0.3))
    for lam in (0.3, torch.tensor(0.3)):
        got = cdfast.competitive_ce(logits, y_a, y_b, lam)
        torch.testing.assert_close(got[0], want[0])
        assert int(got[1]) == int(want[1])
