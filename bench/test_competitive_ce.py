"""The election op vs the PyTorch composition (N cross-entropies + stack + argmin).

Forward and forward+backward at the sizes of the issue; pytest-benchmark groups
put both implementations of one size side by side. Run on the GPU machine to
measure the CUDA kernel; on CPU it measures the C++ kernel.
"""

import pytest
import torch
import torch.nn.functional as F

from cdfast import _ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(2, 128, 10), (2, 128, 100), (4, 256, 1000), (8, 1024, 1000)]

pytestmark = pytest.mark.skipif(not _ops.op_available(torch.device(DEVICE)), reason=f"no compiled op for {DEVICE}")


def composition(logits, targets):
    ce = torch.stack([F.cross_entropy(logits[i], targets[i]) for i in range(logits.shape[0])])
    return ce, torch.argmin(ce)


def fused(logits, targets):
    ce, teacher, _ = torch.ops.cdfast.competitive_ce(logits, targets, None, None)
    return ce, teacher


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", [composition, fused], ids=["torch", "cdfast"])
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("size", SIZES, ids=[f"N{n}-B{b}-K{k}" for n, b, k in SIZES])
def test_election(benchmark, impl, pass_, size):
    n, b, k = size
    torch.manual_seed(0)
    logits = torch.randn(n, b, k, device=DEVICE, requires_grad=pass_ == "forward_backward")
    targets = torch.randint(0, k, (n, b), device=DEVICE)
    benchmark.group = f"election {pass_} N={n} B={b} K={k} ({DEVICE})"

    def run():
        ce, teacher = impl(logits, targets)
        if pass_ == "forward_backward":
            ce.sum().backward()
            logits.grad = None
        _sync()

    for _ in range(3):
        run()
    benchmark(run)
    benchmark.extra_info.update(n=n, b=b, k=k, device=DEVICE, impl=impl.__name__, pass_=pass_)
