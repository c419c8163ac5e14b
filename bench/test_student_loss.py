"""The fused student loss vs the eager reference and torch.compile of the reference.

Forward and forward+backward at the sizes of the issue; each fwd+bwd benchmark
records the GPU kernels one call launches and their device time (``launches``, ``gpu_us`` in
extra_info). Targets
(issue 11): fused >= 2x eager and >= torch.compile of the reference. The fused
Triton kernels run on CUDA only, so on a CPU machine this file measures nothing
(every test skips); run it on the GPU machine.
"""

import pytest
import torch

from cdfast.ops import student_loss as _student_loss_op
from cdfast import reference as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(2, 128, 10, 64), (2, 128, 100, 256), (4, 128, 100, 256), (4, 256, 1000, 2048), (8, 1024, 1000, 2048)]

pytestmark = pytest.mark.skipif(not _student_loss_op.fused_available(torch.device(DEVICE)),
                                reason="the fused kernels need CUDA and Triton")


def eager(logits, feats, teacher):
    return R.group_student_loss(logits, feats, teacher)


compiled = torch.compile(eager, fullgraph=True)


def fused(logits, feats, teacher):
    # what cdfast.group_student_loss runs: the Triton kernels from a plain autograd Function in eager
    return _student_loss_op.dispatch(logits, feats, teacher, 1.0, 1.0, 1.0)


def fused_op(logits, feats, teacher):
    # the same kernels through the torch.library triton_op (what torch.compile sees)
    return torch.ops.cdfast.group_student_loss(logits, feats, teacher, 1.0, 1.0, 1.0)[0]


IMPLS = {"eager": eager, "compiled": compiled, "fused": fused, "fused_op": fused_op}


@pytest.mark.parametrize("impl_name", list(IMPLS))
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("size", SIZES, ids=[f"N{n}-B{b}-K{k}-D{d}" for n, b, k, d in SIZES])
def test_student_loss(benchmark, impl_name, pass_, size):
    impl = IMPLS[impl_name]
    n, b, k, d = size
    torch.manual_seed(0)
    backward = pass_ == "forward_backward"
    logits = torch.randn(n, b, k, device=DEVICE, requires_grad=backward)
    feats = torch.randn(n, b, d, device=DEVICE, requires_grad=backward)
    teacher = torch.tensor(1, device=DEVICE)
    benchmark.group = f"student loss {pass_} N={n} B={b} K={k} D={d}"

    def run():
        loss = impl(logits, feats, teacher)
        if backward:
            loss.sum().backward()
            logits.grad = feats.grad = None
        torch.cuda.synchronize()

    for _ in range(5):  # includes torch.compile's compilation
        run()
    from test_competitive_ce import device_work

    work = device_work(run)
    torch.cuda.reset_peak_memory_stats()
    benchmark(run)
    benchmark.extra_info.update(n=n, b=b, k=k, d=d, impl=impl_name, pass_=pass_,
                                peak_memory_bytes=torch.cuda.max_memory_allocated(), **work)


HOST_CALLS = 100


@pytest.mark.parametrize("impl_name", list(IMPLS))
def test_student_loss_host_overhead(benchmark, impl_name):
    """fwd+bwd issued HOST_CALLS times, one sync: the host's cost per call when the GPU keeps up."""
    impl = IMPLS[impl_name]
    n, b, k, d = 2, 128, 100, 256
    torch.manual_seed(0)
    logits = torch.randn(n, b, k, device=DEVICE, requires_grad=True)
    feats = torch.randn(n, b, d, device=DEVICE, requires_grad=True)
    teacher = torch.tensor(1, device=DEVICE)
    benchmark.group = f"student loss host overhead fwd+bwd x{HOST_CALLS} N={n} B={b} K={k} D={d}"

    def run():
        for _ in range(HOST_CALLS):
            impl(logits, feats, teacher).sum().backward()
            logits.grad = feats.grad = None
        torch.cuda.synchronize()

    for _ in range(2):
        run()
    benchmark(run)
    benchmark.extra_info.update(n=n, b=b, k=k, d=d, impl=impl_name, calls=HOST_CALLS,
                                seconds_per_call=benchmark.stats["mean"] / HOST_CALLS if benchmark.stats else None)  # None: --benchmark-disable
