"""The fused Triton student loss against the reference: values and every gradient.

Without a GPU the raw launchers run on CPU tensors under TRITON_INTERPRET=1
(set in conftest.py); with one, on CUDA tensors. bf16 only on a GPU: the
interpreter computes bf16 wrongly.
"""

import os

import pytest
import torch

import cdfast
from cdfast import reference as R
from cdfast.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_kernels = pytest.mark.skipif(not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="needs a GPU or TRITON_INTERPRET=1")

# (N, B, K, D, T): every N, K, D and T of the issue appears, B odd.
CASES = [
    (2, 3, 10, 64, 1.0), (2, 5, 100, 640, 4.0), (2, 1, 1001, 2048, 1.0),
    (3, 3, 1000, 64, 4.0), (3, 7, 10, 2048, 1.0), (3, 5, 1001, 640, 1.0),
    (4, 3, 100, 2048, 4.0), (4, 1, 1000, 640, 1.0), (4, 5, 1001, 64, 4.0), (4, 3, 10, 0, 1.0),
]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def inputs(n, b, k, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(n, b, k, generator=g)).to(DEVICE, dtype)
    feats = torch.randn(n, b, d, generator=g).to(DEVICE, dtype)
    return logits, feats


def compare(n, b, k, d, temperature, dtype, alpha=0.7, beta=0.3):
    from cdfast.kernels.student_loss import student_loss_backward, student_loss_forward

    logits, feats = inputs(n, b, k, d, dtype)
    tol = TOL[dtype]
    for t in range(n):
        teacher = torch.tensor(t, device=DEVICE)
        loss, lse = student_loss_forward(logits, feats, teacher, temperature, alpha, beta)
        z, f = logits.float().clone().requires_grad_(), feats.float().clone().requires_grad_()
        ref = R.group_student_loss(z, f if d else None, teacher, temperature=temperature, alpha=alpha, beta=beta)
        assert loss.dtype == torch.float32 and loss[t].item() == 0.0
        torch.testing.assert_close(loss, ref.detach(), **tol)
        grad = torch.linspace(0.5, 1.5, n, device=DEVICE)
        (ref * grad).sum().backward()
        grad_logits, grad_feats = student_loss_backward(grad, logits, feats, teacher, lse, temperature, alpha, beta)
        assert grad_logits.dtype == dtype and grad_feats.dtype == dtype
        assert torch.count_nonzero(grad_logits[t]) == 0 and torch.count_nonzero(grad_feats[t]) == 0
        torch.testing.assert_close(grad_logits.float(), z.grad, **tol)
        if d:
            torch.testing.assert_close(grad_feats.float(), f.grad, **tol)


@needs_kernels
@pytest.mark.parametrize("n,b,k,d,temperature", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_launchers_match_reference(n, b, k, d, temperature, dtype):
    compare(n, b, k, d, temperature, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("n,b,k,d,temperature", CASES[:4])
def test_launchers_bf16_on_gpu(n, b, k, d, temperature):
    compare(n, b, k, d, temperature, torch.bfloat16)


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
    logits, feats = inputs(4, 256, 1000, 2048, torch.float32)
    logits.requires_grad_()
    teacher = torch.tensor(2, device="cuda")
    out = cdfast.group_student_loss(logits, feats, teacher)
    assert "cdfast_group_student_loss" in type(out.grad_fn).__name__
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cdfast.group_student_loss(logits, feats, teacher).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
