"""The compiled election op torch.ops.cdfast.competitive_ce against the PyTorch reference."""

import pytest
import torch

import cdfast
from cdfast.ops import competitive_ce as _ops
from cdfast import reference as R

pytestmark = pytest.mark.skipif(not _ops.HAS_EXTENSION, reason="cdfast._C is not built (CDFAST_BUILD_EXT=0?)")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (2e-3, 2e-3)}


def op(logits, targets, targets_b=None, lam=None):
    return torch.ops.cdfast.competitive_ce(logits, targets, targets_b, lam)


def make(shape, k, device, dtype, seed=0, mixed=False):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, k, generator=g)).to(device=device, dtype=dtype)
    targets = torch.randint(0, k, shape, generator=g).to(device)
    if not mixed:
        return logits, targets, None, None
    targets_b = torch.randint(0, k, shape, generator=g).to(device)
    lam = torch.rand(shape[:-1], generator=g).to(device)
    return logits, targets, targets_b, lam


def check_against_reference(logits, targets, targets_b, lam):
    atol, rtol = TOL[logits.dtype]
    x = logits.detach().clone().requires_grad_()
    ce, teacher, lse = op(x, targets, targets_b, lam)
    xr = logits.detach().clone().requires_grad_()
    ce_ref, teacher_ref = R.competitive_ce(xr, targets, targets_b, lam)
    assert ce.dtype == ce_ref.dtype and teacher.dtype == torch.int64
    torch.testing.assert_close(ce, ce_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, torch.logsumexp(xr.detach().to(ce.dtype), -1), atol=atol, rtol=rtol)
    # the election must agree with argmin of the op's own CE (the reference's may differ only on near-ties)
    torch.testing.assert_close(teacher, torch.argmin(ce, -1))
    weights = torch.randn(ce.shape, generator=torch.Generator().manual_seed(1)).to(ce)
    (ce * weights).sum().backward()
    (ce_ref * weights).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("b,k", [(1, 1), (7, 7), (7, 1000), (1000, 7), (3, 1001)])
def test_matches_reference_fp32(device, n, b, k):
    check_against_reference(*make((n, b), k, device, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("b,k", [(7, 1001), (33, 10)])
def test_matches_reference_dtypes(device, dtype, b, k):
    check_against_reference(*make((3, b), k, device, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,k", [(5, 7), (64, 100)])
def test_mixed_labels(device, b, k):
    check_against_reference(*make((4, b), k, device, torch.float32, mixed=True))


@pytest.mark.parametrize("device", DEVICES)
def test_leading_group_dims(device):
    logits, targets, targets_b, lam = make((3, 2, 4, 9), 11, device, torch.float32, mixed=True)
    ce, teacher, lse = op(logits, targets, targets_b, lam)
    assert ce.shape == (3, 2, 4) and teacher.shape == (3, 2) and lse.shape == (3, 2, 4, 9)
    check_against_reference(logits, targets, targets_b, lam)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_elect_lowest_index(device):
    logits = torch.randn(1, 6, 5).expand(4, 6, 5).contiguous().to(device)
    targets = torch.randint(0, 5, (6,)).expand(4, 6).contiguous().to(device)
    assert op(logits, targets)[1].item() == 0
    logits[0] += torch.nn.functional.one_hot(targets[0], 5).to(logits) * -1.0  # make network 0 worse
    assert op(logits, targets)[1].item() == 1


def test_functional_uses_the_op():
    logits, targets, _, _ = make((2, 8), 10, "cpu", torch.float32)
    ce, teacher = cdfast.competitive_ce(logits.requires_grad_(), targets[0])
    # the autograd node is C++ (registered for the Autograd key in csrc/autograd.cpp), not a Python Function
    assert type(ce.grad_fn).__name__ == "CppFunction" and "CompetitiveCe" in ce.grad_fn.name()


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_of_lse_alone_and_of_nothing(device):
    logits, targets, _, _ = make((3, 5), 7, device, torch.float64)
    x = logits.clone().requires_grad_()
    _, _, lse = op(x, targets)
    lse.sum().backward()  # ce unused: its gradient is not materialised, the op fills in zeros itself
    torch.testing.assert_close(x.grad, torch.softmax(logits, -1))
    y = logits.clone().requires_grad_()
    ce, teacher, lse = op(y, targets)
    assert not teacher.requires_grad and ce.requires_grad and lse.requires_grad


def test_opcheck():
    for args in (make((2, 5), 7, "cpu", torch.float32), make((3, 4), 6, "cpu", torch.float32, mixed=True),
                 make((2, 2, 3), 5, "cpu", torch.float64)):
        logits = args[0].requires_grad_()
        torch.library.opcheck(torch.ops.cdfast.competitive_ce.default, (logits, *args[1:]))


def test_gradcheck_float64():
    logits, targets, targets_b, lam = make((3, 4), 6, "cpu", torch.float64, mixed=True)
    logits.requires_grad_()
    # ce and lse both differentiable; the teacher index is an integer output
    assert torch.autograd.gradcheck(lambda z: op(z, targets, targets_b, lam)[0::2], (logits,))


def test_torch_compile_fullgraph():
    logits, targets, _, _ = make((2, 6), 10, "cpu", torch.float32)

    def step(z):
        ce, teacher = cdfast.competitive_ce(z, targets)
        return ce.sum(), teacher

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # inductor adds minutes on 2 cores
    z = logits.clone().requires_grad_()
    loss, teacher = compiled(z)
    loss.backward()
    z2 = logits.clone().requires_grad_()
    loss2, teacher2 = step(z2)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(z.grad, z2.grad)
    assert teacher == teacher2


@pytest.mark.op_error
def test_bad_input_errors_come_from_the_op():
    logits, targets, targets_b, lam = make((2, 4), 5, "cpu", torch.float32, mixed=True)
    cases = [
        ((logits[:1], targets[:1], None, None), ValueError, "N >= 2"),
        ((logits, targets[:, :3], None, None), ValueError, "targets must have shape"),
        ((logits, targets.int(), None, None), TypeError, "int64"),
        ((logits, targets + 5, None, None), ValueError, r"\[0, 5\)"),
        ((logits, targets, targets_b, None), ValueError, "both targets_b and lam"),
        ((logits, targets, targets_b, lam[:1]), ValueError, "one weight per network"),
        ((logits.long(), targets, None, None), TypeError, "float32, float16"),
        ((logits[0], targets[0], None, None), ValueError, r"\[N, B, K\]"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            op(*args)


@pytest.mark.cuda
def test_cuda_op_makes_no_host_sync_and_captures_in_a_graph():
    logits, targets, _, _ = make((4, 256), 1000, "cuda", torch.float32)
    op(logits, targets)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        op(logits, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        op(logits, targets)  # warm up on the capture stream
        with torch.cuda.graph(graph):
            ce, teacher, _ = op(logits, targets)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    ce_ref, teacher_ref = R.competitive_ce(logits, targets)
    torch.testing.assert_close(ce, ce_ref, atol=1e-5, rtol=1e-5)
    assert teacher.item() == teacher_ref.item()


@pytest.mark.cuda
def test_cuda_completion_counters_stay_right_across_streams_group_counts_and_graphs():
    # The forward kernel's completion counters persist per stream (no memset per call) and must
    # be back at zero after every launch: a counter left at 1 would elect from partial sums.
    def check(logits, targets):
        ce, teacher, _ = op(logits, targets)
        torch.testing.assert_close(ce, R.competitive_ce(logits, targets)[0], atol=1e-5, rtol=1e-5)
        # elected from the op's own CEs (a near-tie may round either way against the reference's)
        torch.testing.assert_close(teacher, R.elect_teacher(ce))

    streams = [torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream()]
    for i, groups in enumerate([1, 3, 1, 130, 2, 130, 1]):  # counters past the first few reused too
        for j, stream in enumerate(streams):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                check(*make((groups, 3, 1 + 37 * (i + j)), 101, "cuda", torch.float32, seed=i + j)[:2])
            torch.cuda.current_stream().wait_stream(stream)
    # a capture (per-call counters) between eager calls, replayed twice, on a stream eager calls also use
    logits, targets, _, _ = make((5, 2, 300), 77, "cuda", torch.float32, seed=9)
    side = streams[1]
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        check(logits, targets)
        with torch.cuda.graph(graph, stream=side):
            ce, teacher, _ = op(logits, targets)
        check(logits, targets)
    torch.cuda.current_stream().wait_stream(side)
    for seed in (1, 2):
        logits.copy_(make((5, 2, 300), 77, "cuda", torch.float32, seed=seed)[0])
        graph.replay()
        check(logits, targets)
        torch.testing.assert_close(ce, R.competitive_ce(logits, targets)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(teacher, R.elect_teacher(ce))


@pytest.mark.cuda
def test_cuda_op_under_torch_compile_reduce_overhead():
    # torch.compile's CUDA graphs warm up with every allocation on their stream sent to the graph's
    # memory pool: the op's persistent counters must not be one of those allocations.
    def step(z, y):
        ce, teacher = cdfast.competitive_ce(z, y)
        return ce.sum(), teacher

    compiled = torch.compile(step, mode="reduce-overhead")
    for seed in range(5):
        z, y, _, _ = make((3, 64), 50, "cuda", torch.float32, seed=seed)
        loss, teacher = compiled(z, y)
        ce_ref, _ = R.competitive_ce(z, y)
        torch.testing.assert_close(loss, ce_ref.sum(), atol=1e-4, rtol=1e-5)
        assert teacher.item() == R.elect_teacher(R.competitive_ce(z, y)[0]).item()


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_ce_is_never_elected(device):
    logits, targets, _, _ = make((4, 6), 5, device, torch.float32)
    logits[0, 3] = float("nan")   # network 0: NaN CE, which torch.argmin would pick
    logits[2] += 5 * torch.nn.functional.one_hot(targets[2], 5).to(logits)  # network 2: clearly the best
    ce, teacher, _ = op(logits, targets)
    assert torch.isnan(ce[0]) and teacher.item() == 2
    assert teacher.item() == R.competitive_ce(logits, targets)[1].item()
    logits[:] = float("nan")
    assert op(logits, targets)[1].item() == 0  # every CE non-finite: network 0, and ce shows why


@pytest.mark.parametrize("device", DEVICES)
def test_a_nan_logit_anywhere_in_a_row_makes_that_ce_nan(device):
    # A NaN as the first logit a lane sees, beside -inf and finite ones: an online log-sum-exp that
    # resets on "max is -inf" (or whose max ignores NaN) loses it, and the network could win.
    k = 101
    logits, targets, _, _ = make((3, 9), k, device, torch.float32, seed=3)
    targets = targets % 30
    rows = torch.arange(9, device=device)
    logits[1, :, :40] = float("-inf")
    logits[1, rows, targets[1]] = 50.0  # network 1 would be the clear teacher...
    logits[1, 4, (targets[1, 4] + 1) % k] = float("nan")  # ...but one NaN logit in one row
    ce, teacher, lse = op(logits, targets)
    assert torch.isnan(ce[1]) and torch.isnan(lse[1, 4]) and teacher.item() != 1
    torch.testing.assert_close(ce, R.competitive_ce(logits, targets)[0], equal_nan=True)


# ---- label smoothing and ignored labels in the compiled kernels --------------------------------

def check_forms_against_reference(logits, targets, targets_b, lam, eps, ignore):
    atol, rtol = TOL[logits.dtype]
    x = logits.detach().clone().requires_grad_()
    ce, teacher, lse = torch.ops.cdfast.competitive_ce(x, targets, targets_b, lam, eps, ignore)
    xr = logits.detach().clone().requires_grad_()
    ce_ref, _ = R.competitive_ce(xr, targets, targets_b, lam, label_smoothing=eps, ignore_index=ignore)
    torch.testing.assert_close(ce, ce_ref, atol=atol, rtol=rtol, equal_nan=True)
    torch.testing.assert_close(lse, torch.logsumexp(xr.detach().to(ce.dtype), -1), atol=atol, rtol=rtol)
    finite = torch.isfinite(ce)
    if finite.any():
        torch.testing.assert_close(teacher, torch.argmin(torch.where(finite, ce, torch.inf), -1))
    weights = torch.randn(ce.shape, generator=torch.Generator().manual_seed(1)).to(ce)
    (torch.nan_to_num(ce * weights)).sum().backward()
    (torch.nan_to_num(ce_ref * weights)).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=atol, rtol=rtol)


def with_ignored(targets, ignore, every):
    out = targets.clone()
    out.view(-1)[::every] = ignore
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore", [None, -100, 3])
@pytest.mark.parametrize("mixed", [False, True])
def test_label_smoothing_and_ignore_index_match_the_reference(device, dtype, eps, ignore, mixed):
    logits, targets, targets_b, lam = make((3, 7), 11, device, dtype, seed=2, mixed=mixed)
    if ignore is not None:  # -100 lies outside [0, K), 3 inside: both are skipped, never read
        targets = with_ignored(targets, ignore, 3)
        if mixed:
            targets_b = with_ignored(targets_b, ignore, 4)
    check_forms_against_reference(logits, targets, targets_b, lam, eps, ignore)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,k", [(1, 1), (33, 1001), (1000, 7)])
def test_label_smoothing_and_ignore_index_at_odd_shapes(device, b, k):
    logits, targets, targets_b, lam = make((2, b), k, device, torch.float32, seed=5, mixed=True)
    check_forms_against_reference(logits, with_ignored(targets, -1, 2), with_ignored(targets_b, -1, 5), lam,
                                  0.2, -1)


@pytest.mark.parametrize("device", DEVICES)
def test_a_network_with_every_label_ignored_has_a_nan_ce_and_is_not_elected(device):
    logits, targets, _, _ = make((3, 4), 6, device, torch.float32)
    targets[1] = -100  # network 1 keeps no row: 0 / 0, as F.cross_entropy gives
    x = logits.clone().requires_grad_()
    ce, teacher, _ = torch.ops.cdfast.competitive_ce(x, targets, None, None, 0.1, -100)
    assert torch.isnan(ce[1]) and teacher.item() != 1
    ce[[0, 2]].sum().backward()
    assert torch.count_nonzero(x.grad[1]) == 0 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_smoothing_with_masked_classes_gives_an_infinite_ce_as_torch(device):
    # -inf logits: the smoothing term averages log p over every class, as F.cross_entropy does
    logits, targets, _, _ = make((2, 5), 6, device, torch.float32)
    logits[..., 0] = float("-inf")
    targets = targets.clamp(min=1)
    check_forms_against_reference(logits, targets, None, None, 0.0, None)
    ce, _, _ = torch.ops.cdfast.competitive_ce(logits, targets, None, None, 0.1, None)
    want = torch.stack([torch.nn.functional.cross_entropy(z, t, label_smoothing=0.1) for z, t in zip(logits, targets)])
    torch.testing.assert_close(ce, want)


@pytest.mark.op_error
@pytest.mark.parametrize("device", DEVICES)
def test_bad_label_smoothing_and_labels_beside_the_ignored_ones_are_refused(device):
    logits, targets, _, _ = make((2, 4), 6, device, torch.float32)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\], got 1.5"):
        torch.ops.cdfast.competitive_ce(logits, targets, None, None, 1.5, None)
    if device == "cpu":  # CUDA asserts on the device instead (tested in a child process elsewhere)
        bad = with_ignored(targets, -100, 2)
        bad[0, 1] = 6
        with pytest.raises(ValueError, match=r"targets hold class indices in \[\d, 6\]"):
            torch.ops.cdfast.competitive_ce(logits, bad, None, None, 0.0, -100)


def test_opcheck_and_gradcheck_with_smoothing_and_ignored_labels():
    logits, targets, targets_b, lam = make((3, 5), 6, "cpu", torch.float64, mixed=True)
    targets, targets_b = with_ignored(targets, -100, 4), with_ignored(targets_b, -100, 3)
    logits.requires_grad_()
    torch.library.opcheck(torch.ops.cdfast.competitive_ce.default, (logits, targets, targets_b, lam, 0.15, -100))
    assert torch.autograd.gradcheck(
        lambda z: torch.ops.cdfast.competitive_ce(z, targets, targets_b, lam, 0.15, -100)[0::2], (logits,))


def test_functional_runs_the_op_for_smoothing_and_ignored_labels():
    logits, targets, _, _ = make((2, 8), 10, "cpu", torch.float32)
    ce, _ = cdfast.competitive_ce(logits.requires_grad_(), with_ignored(targets[0], -100, 3), label_smoothing=0.1,
                                  ignore_index=-100)
    assert type(ce.grad_fn).__name__ == "CppFunction" and "CompetitiveCe" in ce.grad_fn.name()


@pytest.mark.parametrize("device", DEVICES)
def test_a_masked_label_keeps_a_finite_lse_and_gradient(device):
    # the label's own logit is -inf: CE is inf, but lse (and so the gradient) stays what torch gives
    logits, targets, _, _ = make((2, 4), 6, device, torch.float32)
    logits[0, 1, targets[0, 1]] = float("-inf")
    _, _, lse = op(logits, targets)
    assert torch.isfinite(lse).all()
    check_against_reference(logits, targets, None, None)


# ---- class probabilities (soft targets) in the compiled kernels ---------------------------------

def soft(shape, k, device, seed, normalized=True, expand_over=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(*shape, k, generator=g)
    q = q / q.sum(-1, keepdim=True) if normalized else 1.3 * q  # unnormalized: mass != 1 per row
    q = q.to(device)
    return q.expand(expand_over, *q.shape) if expand_over else q


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("mixed", [False, True])
def test_class_probabilities_match_the_reference(device, dtype, eps, mixed):
    logits, _, _, lam = make((3, 7), 11, device, dtype, seed=4, mixed=True)
    qa = soft((3, 7), 11, device, 1)
    qb = soft((3, 7), 11, device, 2) if mixed else None
    check_forms_against_reference(logits, qa, qb, lam if mixed else None, eps, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,k", [(1, 1), (33, 1001), (1000, 7)])
def test_class_probabilities_shared_by_the_group_and_unnormalized(device, b, k):
    # [B, K] expanded over the networks (stride 0, read in place) and rows whose mass is not 1
    logits, _, _, lam = make((2, b), k, device, torch.float32, seed=6, mixed=True)
    qa = soft((b,), k, device, 3, normalized=False, expand_over=2)
    qb = soft((b,), k, device, 4, expand_over=2)
    check_forms_against_reference(logits, qa, qb, lam, 0.05, None)
    check_forms_against_reference(logits, qa, None, None, 0.0, None)


@pytest.mark.parametrize("device", DEVICES)
def test_one_hot_probabilities_give_the_class_index_ce(device):
    logits, targets, targets_b, lam = make((3, 9), 10, device, torch.float32, seed=8, mixed=True)
    one_hot = torch.nn.functional.one_hot(targets, 10).float()
    one_hot_b = torch.nn.functional.one_hot(targets_b, 10).float()
    for eps in (0.0, 0.2):
        hard = torch.ops.cdfast.competitive_ce(logits, targets, targets_b, lam, eps, None)
        probs = torch.ops.cdfast.competitive_ce(logits, one_hot, one_hot_b, lam, eps, None)
        for a, b_ in zip(hard, probs):
            torch.testing.assert_close(a, b_)


@pytest.mark.op_error
@pytest.mark.parametrize("device", DEVICES)
def test_class_probabilities_refuse_ignore_index_and_mixed_kinds(device):
    logits, targets, _, lam = make((2, 4), 6, device, torch.float32, mixed=True)
    q = soft((2, 4), 6, device, 0)
    with pytest.raises(ValueError, match="ignore_index applies to class indices"):
        torch.ops.cdfast.competitive_ce(logits, q, None, None, 0.0, -100)
    with pytest.raises(TypeError, match="targets_b must be like targets: floating-point class probabilities"):
        torch.ops.cdfast.competitive_ce(logits, q, targets, lam, 0.0, None)
    with pytest.raises(ValueError, match="class-probability targets must have the logits' shape"):
        torch.ops.cdfast.competitive_ce(logits, q[..., :5], None, None, 0.0, None)


def test_opcheck_and_gradcheck_with_class_probabilities():
    logits, _, _, lam = make((3, 5), 6, "cpu", torch.float64, mixed=True)
    qa, qb = soft((3, 5), 6, "cpu", 1).double(), soft((5,), 6, "cpu", 2, expand_over=3).double()
    logits.requires_grad_()
    torch.library.opcheck(torch.ops.cdfast.competitive_ce.default, (logits, qa, qb, lam, 0.1, None))
    assert torch.autograd.gradcheck(
        lambda z: torch.ops.cdfast.competitive_ce(z, qa, qb, lam, 0.1, None)[0::2], (logits,))


def test_functional_runs_the_op_for_class_probabilities():
    logits, _, _, _ = make((2, 8), 10, "cpu", torch.float32)
    ce, _ = cdfast.competitive_ce(logits.requires_grad_(), soft((8,), 10, "cpu", 0), label_smoothing=0.1)
    assert type(ce.grad_fn).__name__ == "CppFunction" and "CompetitiveCe" in ce.grad_fn.name()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_class_probabilities_with_a_masked_class_give_what_torch_gives(device, eps):
    # q = 0 at a class whose logit is -inf: smoothing spreads eps/K onto it, so CE = +inf (else NaN)
    logits, _, _, _ = make((2, 5), 6, device, torch.float32)
    logits[0, :, 2] = float("-inf")
    q = soft((2, 5), 6, device, 1)
    q[..., 2] = 0.0
    q = q / q.sum(-1, keepdim=True)
    ce, _, _ = torch.ops.cdfast.competitive_ce(logits, q, None, None, eps, None)
    want = torch.stack([torch.nn.functional.cross_entropy(z, t, label_smoothing=eps) for z, t in zip(logits, q)])
    torch.testing.assert_close(ce, want, equal_nan=True)
    assert torch.isinf(ce[0]) if eps else torch.isnan(ce[0])


def test_targets_that_need_a_gradient_get_it():
    # the op differentiates the logits only: probabilities (or lam) with requires_grad take the reference
    logits, _, _, _ = make((2, 6), 5, "cpu", torch.float32)
    q = soft((6,), 5, "cpu", 0).requires_grad_()
    ce, _ = cdfast.competitive_ce(logits.requires_grad_(), q)
    ce.sum().backward()
    assert q.grad is not None and torch.count_nonzero(q.grad) > 0 and logits.grad is not None


def test_a_lam_that_needs_a_gradient_gets_it_and_labels_are_still_checked():
    logits, targets, targets_b, lam = make((2, 6), 5, "cpu", torch.float32, mixed=True)
    lam.requires_grad_()
    ce, _ = cdfast.competitive_ce(logits, targets, targets_b, lam)
    ce.sum().backward()
    assert lam.grad is not None and torch.count_nonzero(lam.grad) > 0
    bad = targets.clone()
    bad[0, 0] = 5
    with pytest.raises(ValueError, match=r"class indices in \[\d, 5\]"):
        cdfast.competitive_ce(logits, bad, targets_b, lam)
