"""The fused Triton student loss against the reference: values and every gradient.

Every launcher test runs twice: on CPU tensors under TRITON_INTERPRET=1 (set in
conftest.py on machines without a GPU) and on CUDA tensors (marked ``cuda``, so
``pytest -m cuda`` on a GPU runs them all). bf16 only on a GPU: the interpreter
computes bf16 wrongly.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cdfast
from cdfast import reference as R
from cdfast.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
DEVICES = [pytest.param("cpu", marks=interpreted), pytest.param("cuda", marks=pytest.mark.cuda)]

# (N, B, K, D, T): every N, K, D and T of the issue appears, B odd.
CASES = [
    (2, 3, 10, 64, 1.0), (2, 5, 100, 640, 4.0), (2, 1, 1001, 2048, 1.0),
    (3, 3, 1000, 64, 4.0), (3, 7, 10, 2048, 1.0), (3, 5, 1001, 640, 1.0),
    (4, 3, 100, 2048, 4.0), (4, 1, 1000, 640, 1.0), (4, 5, 1001, 64, 4.0), (4, 3, 10, 0, 1.0),
]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def inputs(n, b, k, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(n, b, k, generator=g)).to(device, dtype)
    feats = torch.randn(n, b, d, generator=g).to(device, dtype)
    return logits, feats


def compare(n, b, k, d, temperature, dtype, device, alpha=0.7, beta=0.3, logits=None, feats=None):
    from cdfast.kernels.student_loss import student_loss_backward, student_loss_forward

    if logits is None:
        logits, feats = inputs(n, b, k, d, dtype, device)
    tol = TOL[dtype]
    for t in range(n):
        teacher = torch.tensor(t, device=device)
        loss, lse = student_loss_forward(logits, feats, teacher, temperature, alpha, beta)
        z, f = logits.float().clone().requires_grad_(), feats.float().clone().requires_grad_()
        ref = R.group_student_loss(z, f if d else None, teacher, temperature=temperature, alpha=alpha, beta=beta)
        assert loss.dtype == torch.float32 and loss[t].item() == 0.0
        torch.testing.assert_close(loss, ref.detach(), **tol)
        grad = torch.linspace(0.5, 1.5, n, device=device)
        (ref * grad).sum().backward()
        grad_logits, grad_feats = student_loss_backward(grad, logits, feats, teacher, lse, temperature, alpha, beta)
        assert grad_logits.dtype == dtype and grad_feats.dtype == dtype
        assert torch.count_nonzero(grad_logits[t]) == 0 and torch.count_nonzero(grad_feats[t]) == 0
        torch.testing.assert_close(grad_logits.float(), z.grad, **tol)
        if d:
            torch.testing.assert_close(grad_feats.float(), f.grad, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,b,k,d,temperature", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_launchers_match_reference(n, b, k, d, temperature, dtype, device):
    compare(n, b, k, d, temperature, dtype, device)


@pytest.mark.cuda
@pytest.mark.parametrize("n,b,k,d,temperature", CASES[:4])
def test_launchers_bf16_on_gpu(n, b, k, d, temperature):
    compare(n, b, k, d, temperature, torch.bfloat16, "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [10, 5000])  # one block (single pass) and several blocks (two passes)
def test_masked_classes_with_minus_inf_logits(device, k):
    logits, feats = inputs(3, 4, k, 8, torch.float32, device)
    logits[:, :, : k // 2] = float("-inf")  # the first blocks hold nothing: no exp(-inf - -inf)
    logits[1, 2, -1] = float("-inf")
    compare(3, 4, k, 8, 2.0, torch.float32, device, logits=logits, feats=feats)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [10, 5000])
def test_a_nan_logit_beside_masked_ones_gives_a_nan_loss(device, k):
    # The NaN sits in a block that is otherwise -inf, before finite blocks: an online log-sum-exp
    # that resets its sum whenever the running max is -inf would drop it.
    from cdfast.kernels.student_loss import student_loss_forward

    logits, feats = inputs(3, 4, k, 8, torch.float32, device)
    logits[:, :, : k // 2] = float("-inf")
    logits[1, 2, 0] = float("nan")  # a student's row
    loss, lse = student_loss_forward(logits, feats, torch.tensor(0, device=device), 2.0, 0.7, 0.3)
    assert torch.isnan(loss[1]) and torch.isnan(lse[1, 2]) and torch.isfinite(loss[2]) and loss[0] == 0
    logits[1, 2, 0] = 0.0
    logits[0, 1, 0] = float("nan")  # the teacher's row: every student's loss is NaN
    loss, _ = student_loss_forward(logits, feats, torch.tensor(0, device=device), 2.0, 0.7, 0.3)
    assert torch.isnan(loss[1:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_a_teacher_index_out_of_range_gives_nan_not_a_wild_read(device):
    from cdfast.kernels.student_loss import student_loss_forward

    logits, feats = inputs(2, 3, 10, 4, torch.float32, device)
    loss, _ = student_loss_forward(logits, feats, torch.tensor(7, device=device), 1.0, 1.0, 1.0)
    assert torch.isnan(loss).all()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_reads_a_strided_loss_gradient(device):
    # loss.sum() hands the backward ones expanded over the networks (stride 0); a mean, a scale;
    # and a strided slice: the kernel reads the gradient through its stride, without a copy
    from cdfast.kernels.student_loss import student_loss_backward, student_loss_forward

    logits, feats = inputs(3, 5, 17, 6, torch.float32, device, seed=4)
    teacher = torch.tensor(1, device=device)
    _, lse = student_loss_forward(logits, feats, teacher, 2.0, 0.7, 0.3)
    for grad in (torch.ones((), device=device).expand(3), torch.tensor(0.25, device=device).expand(3),
                 torch.tensor([0.5, 9.0, -1.0, 9.0, 2.0], device=device)[::2]):
        z, f = logits.clone().requires_grad_(), feats.clone().requires_grad_()
        ref = R.group_student_loss(z, f, teacher, temperature=2.0, alpha=0.7, beta=0.3)
        (ref * grad).sum().backward()
        grad_logits, grad_feats = student_loss_backward(grad, logits, feats, teacher, lse, 2.0, 0.7, 0.3)
        torch.testing.assert_close(grad_logits, z.grad, **TOL[torch.float32])
        torch.testing.assert_close(grad_feats, f.grad, **TOL[torch.float32])


@pytest.mark.cuda
def test_batches_beyond_the_old_65535_grid_cap():
    compare(2, 70_000, 10, 4, 1.0, torch.float32, "cuda")


def test_reference_backward_matches_autograd():
    torch.manual_seed(0)
    logits, feats = torch.randn(3, 5, 7, requires_grad=True), torch.randn(3, 5, 2, 2, requires_grad=True)
    teacher, grad = torch.tensor(2), torch.tensor([0.3, -1.2, 2.0])
    loss = R.group_student_loss(logits, feats, teacher, temperature=3.0, alpha=0.6, beta=1.7)
    want = torch.autograd.grad((loss * grad).sum(), (logits, feats))
    got = R.group_student_loss_backward(grad, logits, feats, teacher, temperature=3.0, alpha=0.6, beta=1.7)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_op_opcheck_and_autograd_on_cpu():
    op = torch.ops.cdfast.group_student_loss.default
    for d in (6, 0):
        torch.manual_seed(d)
        logits = torch.randn(3, 4, 10, requires_grad=True)
        feats = torch.randn(3, 4, d, requires_grad=True)
        torch.library.opcheck(op, (logits, feats, torch.tensor(1), 2.0, 0.5, 0.25))
    # non-contiguous inputs: the fake must promise the strides the kernels really return
    logits_t = torch.randn(10, 4, 3).permute(2, 1, 0).requires_grad_()
    feats_t = torch.randn(6, 4, 3).permute(2, 1, 0).requires_grad_()
    torch.library.opcheck(op, (logits_t, feats_t, torch.tensor(2), 1.5, 1.0, 0.5))
    loss, _ = op(logits, feats, torch.tensor(0), 1.0, 1.0, 1.0)
    loss.sum().backward()
    assert torch.count_nonzero(logits.grad[0]) == 0


def test_op_under_torch_compile_fullgraph():
    torch.manual_seed(0)
    logits, feats = torch.randn(2, 5, 10), torch.randn(2, 5, 8)
    y = torch.randint(0, 10, (5,))

    def step(z, f):
        ce, teacher = cdfast.competitive_ce(z, y)
        loss, _ = torch.ops.cdfast.group_student_loss(z, f, teacher, 1.0, 1.0, 1.0)
        return (ce + loss).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    z1, f1 = logits.clone().requires_grad_(), feats.clone().requires_grad_()
    z2, f2 = logits.clone().requires_grad_(), feats.clone().requires_grad_()
    compiled(z1, f1).backward()
    step(z2, f2).backward()
    torch.testing.assert_close(z1.grad, z2.grad)
    torch.testing.assert_close(f1.grad, f2.grad)


@pytest.mark.cuda
def test_functional_uses_fused_kernels_without_host_sync():
    logits, feats = inputs(4, 256, 1000, 2048, torch.float32, "cuda")
    logits.requires_grad_()
    teacher = torch.tensor(2, device="cuda")
    out = cdfast.group_student_loss(logits, feats, teacher)
    assert "EagerStudentLoss" in type(out.grad_fn).__name__
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cdfast.group_student_loss(logits, feats, teacher).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device_not_the_current_one():
    logits, feats = inputs(2, 3, 10, 4, torch.float32, "cuda:1")
    torch.cuda.set_device(0)
    loss, _ = torch.ops.cdfast.group_student_loss(logits, feats, torch.tensor(0, device="cuda:1"), 1.0, 1.0, 1.0)
    ref = R.group_student_loss(logits, feats, torch.tensor(0, device="cuda:1"))
    torch.testing.assert_close(loss, ref)


@pytest.mark.cuda
def test_inductor_traces_into_the_triton_op():
    logits, feats = inputs(3, 64, 100, 32, torch.float32, "cuda")
    teacher = torch.tensor(1, device="cuda")

    def loss_fn(z, f):
        return torch.ops.cdfast.group_student_loss(z, f, teacher, 2.0, 0.7, 0.3)[0].sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    z1, f1 = logits.clone().requires_grad_(), feats.clone().requires_grad_()
    z2, f2 = logits.clone().requires_grad_(), feats.clone().requires_grad_()
    compiled(z1, f1).backward()
    loss_fn(z2, f2).backward()
    torch.testing.assert_close(z1.grad, z2.grad)
    torch.testing.assert_close(f1.grad, f2.grad)


def test_float64_is_served_by_the_reference_in_float64():
    # The kernels accumulate in float32: a float64 group keeps float64 (the reference) on any device.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, feats = inputs(3, 5, 10, 4, torch.float64, device)
    loss = cdfast.group_student_loss(logits, feats, torch.tensor(1, device=device))
    assert loss.dtype == torch.float64 and loss.grad_fn is None
    torch.testing.assert_close(loss, R.group_student_loss(logits, feats, torch.tensor(1, device=device)))
    from cdfast.ops import student_loss as _student_loss_op
    assert not _student_loss_op.fused_available(torch.device("cuda"), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature_targets", [True, False], ids=["both-targets", "logit-targets-only"])
@pytest.mark.parametrize("n,b,k,d", [(2, 3, 10, 8), (3, 5, 5000, 0), (4, 2, 100, 33)])
def test_per_student_targets_match_the_reference(n, b, k, d, device, feature_targets):
    # Matched inputs: student i's target row is row i of the targets, not the teacher's row. Logit
    # targets alone: the features' target stays the teacher's own rows (as the reference).
    from cdfast.kernels.student_loss import student_loss_backward, student_loss_forward

    logits, feats = inputs(n, b, k, d, torch.float32, device, seed=1)
    target_logits, target_feats = inputs(n, b, k, d, torch.float32, device, seed=2)
    if not feature_targets:
        target_feats = None
    for t in range(n):
        teacher = torch.tensor(t, device=device)
        loss, lse = student_loss_forward(logits, feats, teacher, 2.0, 0.7, 0.3,
                                         target_logits=target_logits, target_feats=target_feats)
        z, f = logits.clone().requires_grad_(), feats.clone().requires_grad_()
        ref = R.group_student_loss(z, f if d else None, teacher, temperature=2.0, alpha=0.7, beta=0.3,
                                   target_logits=target_logits,
                                   target_feats=target_feats if (d and target_feats is not None) else None)
        torch.testing.assert_close(loss, ref.detach(), **TOL[torch.float32])
        grad = torch.linspace(0.5, 1.5, n, device=device)
        (ref * grad).sum().backward()
        gl, gf = student_loss_backward(grad, logits, feats, teacher, lse, 2.0, 0.7, 0.3,
                                       target_logits=target_logits, target_feats=target_feats)
        torch.testing.assert_close(gl, z.grad, **TOL[torch.float32])
        if d:
            torch.testing.assert_close(gf, f.grad, **TOL[torch.float32])
        closed = R.group_student_loss_backward(grad, logits, feats, teacher, temperature=2.0, alpha=0.7, beta=0.3,
                                               target_logits=target_logits, target_feats=target_feats)
        torch.testing.assert_close(closed[0], z.grad, **TOL[torch.float32])
        if d:
            torch.testing.assert_close(closed[1], f.grad, **TOL[torch.float32])


def test_op_with_per_student_targets_opcheck_and_functional_checks():
    logits, feats = inputs(3, 4, 6, 5, torch.float32, "cpu")
    tl_, tf_ = inputs(3, 4, 6, 5, torch.float32, "cpu", seed=3)
    teacher = torch.tensor(1)
    torch.library.opcheck(torch.ops.cdfast.group_student_loss,
                          (logits.requires_grad_(), feats.requires_grad_(), teacher, 1.0, 1.0, 1.0, tl_, tf_))
    with pytest.raises(ValueError, match="target_logits must be shaped like the logits"):
        cdfast.group_student_loss(logits, feats, teacher, target_logits=tl_[:, :2])
    with pytest.raises(ValueError, match="target_feats needs target_logits"):
        cdfast.group_student_loss(logits, feats, teacher, target_feats=tf_)


def test_the_top_level_kernels_folder_is_the_imported_package():
    """kernels/ is the source of truth; cdfast/kernels links to it, so a plain checkout and an
    installed package import the very same files."""
    import cdfast.kernels

    root = Path(__file__).resolve().parents[1]
    assert Path(cdfast.kernels.__file__).resolve() == root / "kernels" / "__init__.py"
    assert (root / "cdfast" / "kernels").resolve() == root / "kernels"



# Lowering to Triton IR for a Hopper target runs Triton's front end (types, shapes, loop-carried
# values) without a GPU. The interpreter skips those checks: a kernel that passed every interpreted
# test failed to compile on the first H200 run (a loop variable reused with another block size).
# It runs in a child process: under TRITON_INTERPRET=1 (this suite's default) there is no compiler.
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_lower_to_triton_ir_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("lower_kernels.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "lowered 28 kernel variants" in done.stdout, done.stdout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_student", [False, True])
@pytest.mark.parametrize("n,b,k,d", [(3, 5, 100, 33), (2, 3, 1001, 0)])
def test_eager_function_matches_the_op_and_the_reference(n, b, k, d, per_student, device):
    # dispatch's eager path (a plain autograd Function, less host time) against the op and the reference
    from cdfast.ops.student_loss import _EagerStudentLoss

    logits, feats = inputs(n, b, k, d, torch.float32, device)
    targets = inputs(n, b, k, d, torch.float32, device, seed=3) if per_student else (None, None)
    teacher = torch.tensor(1, device=device)
    grad = torch.linspace(0.5, 1.5, n, device=device)
    results = []
    for run in ("eager", "op", "reference"):
        z, f = logits.clone().requires_grad_(), feats.clone().requires_grad_()
        if run == "eager":
            loss = _EagerStudentLoss.apply(z, f, teacher, 2.0, 0.7, 0.3, *targets)
        elif run == "op":
            loss = torch.ops.cdfast.group_student_loss(z, f, teacher, 2.0, 0.7, 0.3, *targets)[0]
        else:
            loss = R.group_student_loss(z, f if d else None, teacher, temperature=2.0, alpha=0.7, beta=0.3,
                                        target_logits=targets[0], target_feats=targets[1] if d else None)
        (loss * grad).sum().backward()
        results.append((loss.detach(), z.grad, f.grad if d else None))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            if a is not None:
                torch.testing.assert_close(a, b_, **TOL[torch.float32])
