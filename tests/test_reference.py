"""The reference losses and election against hand-computed values and their defining properties."""

import math

import pytest
import torch

import cdfast
from cdfast import reference as R


def softmax(v):
    m = max(v)
    e = [math.exp(a - m) for a in v]
    return [a / sum(e) for a in e]


def ce_hand(z, y):
    return math.log(sum(math.exp(a) for a in z)) - z[y]


def kl_hand(zt, zs, T=1.0):
    pt, ps = softmax([a / T for a in zt]), softmax([a / T for a in zs])
    return sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))


Z0, Z1 = [1.0, 2.0, 3.0], [0.0, 0.5, -1.0]


@pytest.mark.parametrize("fn", [R.competitive_ce, cdfast.competitive_ce], ids=["reference", "dispatched"])
def test_competitive_ce_hand_values(fn):
    logits = torch.tensor([[Z0, Z1], [Z1, Z0]])  # N=2, B=2, K=3
    y = torch.tensor([2, 0])
    ce, teacher = fn(logits, y.expand(2, 2))
    want0 = (ce_hand(Z0, 2) + ce_hand(Z1, 0)) / 2
    want1 = (ce_hand(Z1, 2) + ce_hand(Z0, 0)) / 2
    assert ce.dtype == torch.float32
    assert ce.tolist() == pytest.approx([want0, want1], rel=1e-6)
    assert teacher.item() == (0 if want0 < want1 else 1)
    assert teacher.dtype == torch.int64


@pytest.mark.parametrize("fn", [R.competitive_ce, cdfast.competitive_ce], ids=["reference", "dispatched"])
def test_competitive_ce_mixed_labels(fn):
    logits = torch.tensor([[Z0], [Z1]])  # N=2, B=1
    ya, yb = torch.tensor([[2], [0]]), torch.tensor([[1], [0]])
    lam = torch.tensor([0.25, 1.0])
    ce, _ = fn(logits, ya, yb, lam)
    assert ce[0].item() == pytest.approx(0.25 * ce_hand(Z0, 2) + 0.75 * ce_hand(Z0, 1), rel=1e-6)
    assert ce[1].item() == pytest.approx(ce_hand(Z1, 0), rel=1e-6)


def test_election_ties_go_to_lowest_index():
    assert cdfast.elect_teacher(torch.tensor([0.5, 0.2, 0.2, 0.9])).item() == 1
    assert cdfast.elect_teacher(torch.tensor([0.3, 0.3])).item() == 0
    logits = torch.zeros(3, 4, 5)  # identical networks: identical CE
    _, teacher = cdfast.competitive_ce(logits, torch.zeros(4, dtype=torch.long))
    assert teacher.item() == 0


def test_competitive_ce_leading_group_dims():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 5, 7)
    y = torch.randint(0, 7, (3, 2, 5))
    ce, teacher = R.competitive_ce(logits, y)
    assert ce.shape == (3, 2) and teacher.shape == (3,)
    for g in range(3):
        ce_g, t_g = R.competitive_ce(logits[g], y[g])
        torch.testing.assert_close(ce[g], ce_g)
        assert teacher[g] == t_g


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_student_loss_hand_values(T):
    zs, zt = torch.tensor([Z1]), torch.tensor([Z0])
    fs, ft = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    got = cdfast.student_loss(zs, zt, fs, ft, temperature=T, alpha=0.5, beta=2.0)
    want = 0.5 * T * T * kl_hand(Z0, Z1, T) + 2.0 * (1.0 + 4.0) / 2
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_group_student_loss_matches_pairs_and_zero_for_teacher():
    torch.manual_seed(1)
    logits, feats = torch.randn(4, 6, 10), torch.randn(4, 6, 5)
    for t in range(4):
        out = cdfast.group_student_loss(logits, feats, torch.tensor(t), temperature=2.0, alpha=0.7, beta=0.3)
        assert out[t].item() == 0.0
        for i in range(4):
            if i != t:
                want = cdfast.student_loss(logits[i], logits[t], feats[i], feats[t], temperature=2.0, alpha=0.7, beta=0.3)
                torch.testing.assert_close(out[i], want)


def test_teacher_gets_no_gradient_from_students():
    torch.manual_seed(2)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    feats = torch.randn(3, 5, 4, requires_grad=True)
    teacher = torch.tensor(1)
    cdfast.group_student_loss(logits, feats, teacher).sum().backward()
    assert torch.count_nonzero(logits.grad[1]) == 0 and torch.count_nonzero(feats.grad[1]) == 0
    for i in (0, 2):
        assert logits.grad[i].abs().sum() > 0 and feats.grad[i].abs().sum() > 0


def test_weighted_loss_with_one_hot_weights_equals_group_loss():
    torch.manual_seed(3)
    logits, feats = torch.randn(3, 4, 6), torch.randn(3, 4, 8)
    ce = torch.tensor([0.9, 0.4, 0.7])
    w = cdfast.distillation_weights(ce, "competitive", "best")
    fl = cdfast.pairwise_feature_l2(feats)
    got = cdfast.weighted_student_loss(logits, fl, w, temperature=3.0)
    want = cdfast.group_student_loss(logits, feats, torch.tensor(1), temperature=3.0)
    torch.testing.assert_close(got, want)


def test_pairwise_kl_entries():
    torch.manual_seed(4)
    logits = torch.randn(3, 4, 6)
    m = R.pairwise_kl(logits, 2.0)
    for i in range(3):
        for j in range(3):
            want = R.student_loss(logits[i], logits[j], temperature=2.0) / 4.0  # student_loss scales by T^2
            torch.testing.assert_close(m[i, j], want, atol=1e-6, rtol=1e-5)


def test_distillation_weights():
    ce = torch.tensor([0.5, 0.2, 0.2, 0.9])
    best = cdfast.distillation_weights(ce)  # competitive, best: the defaults
    assert best.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]]
    better = cdfast.distillation_weights(ce, "competitive", "all-better")
    # order by (ce, index): 1 < 2 < 0 < 3
    want = torch.tensor([[0, 0.5, 0.5, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0]])
    torch.testing.assert_close(better, want)
    dml = cdfast.distillation_weights(ce, "dml")
    assert torch.allclose(dml, (1 - torch.eye(4)) / 3)
    assert cdfast.distillation_weights(ce, "independent").abs().sum() == 0
    teacher = torch.tensor(2)  # a teacher already elected is used, not a second argmin
    assert cdfast.distillation_weights(ce, teacher=teacher)[:, 2].tolist() == [1, 1, 0, 1]


def test_heterogeneous_pairwise_feature_l2_uses_adapter():
    feats = [torch.ones(2, 3), torch.zeros(2, 5)]
    calls = []

    def adapt(i, j, f):
        calls.append((i, j))
        return torch.full((f.shape[0], 5 if j == 1 else 3), float(i + 1))

    l2 = R.pairwise_feature_l2(feats, adapt)
    assert sorted(calls) == [(0, 1), (1, 0)]
    assert l2[0, 1].item() == pytest.approx(1.0)  # (1 - 0)^2
    assert l2[1, 0].item() == pytest.approx(1.0)  # (2 - 1)^2
    assert l2[0, 0] == 0 and l2[1, 1] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    torch.manual_seed(5)
    logits, feats = torch.randn(3, 9, 11), torch.randn(3, 9, 13)
    y = torch.randint(0, 11, (9,))
    ce32, t32 = cdfast.competitive_ce(logits, y)
    ce, t = cdfast.competitive_ce(logits.to(dtype), y)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, ce32, atol=2e-2, rtol=2e-2)
    s = cdfast.group_student_loss(logits.to(dtype), feats.to(dtype), t32)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, cdfast.group_student_loss(logits, feats, t32), atol=3e-2, rtol=3e-2)
