"""The election op vs the PyTorch composition (N cross-entropies + stack + argmin).

Forward and forward+backward, synced per call (the time the GPU needs), and a
host-overhead variant: many calls, one sync at the end (what a launch-bound step
pays on the CPU side). Each fwd+bwd benchmark also records how many GPU kernels
and memsets one call launches and their summed device time (``launches``, ``gpu_us`` in
extra_info, from torch.profiler, over several calls): where the host is the bottleneck, the
device time says what the op costs once a CUDA graph removes the host's share.
Target (issue 11): the op's fwd+bwd >= 3x the composition at N=2..4, B=128, K=100.
On the CPU this measures the C++ kernel.
"""

import pytest
import torch
import torch.nn.functional as F

from cdfast.ops import competitive_ce as _ops
from gpu_work import gpu_work

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(2, 128, 10), (2, 128, 100), (3, 128, 100), (4, 128, 100), (4, 256, 1000), (8, 1024, 1000)]
HOST_CALLS = 50

pytestmark = pytest.mark.skipif(not _ops.op_available(torch.device(DEVICE)), reason=f"no compiled op for {DEVICE}")


def composition(logits, targets):
    ce = torch.stack([F.cross_entropy(logits[i], targets) for i in range(logits.shape[0])])
    return ce, torch.argmin(ce)


def fused(logits, targets):
    ce, teacher, _ = torch.ops.cdfast.competitive_ce(logits, targets.expand(logits.shape[:-1]), None, None)
    return ce, teacher


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_work(fn, calls: int = 10) -> dict:
    """extra_info of one call of ``fn``: the GPU launches and their device microseconds, averaged over
    ``calls`` calls (empty on the CPU or without profiler data)."""
    work = gpu_work(fn, calls) if DEVICE == "cuda" else None
    return {} if work is None else {"launches": round(work[0]), "gpu_us": work[1]}


def measure_synced(benchmark, call) -> dict:
    """Benchmark ``call`` synced per round, after a warm-up; returns :func:`device_work` of one call."""
    def run():
        call()
        _sync()

    for _ in range(3):
        run()
    work = device_work(call)
    benchmark(run)
    return work


def setup(size, backward):
    n, b, k = size
    torch.manual_seed(0)
    logits = torch.randn(n, b, k, device=DEVICE, requires_grad=backward)
    targets = torch.randint(0, k, (b,), device=DEVICE)  # one label set shared by the group, as in training
    return logits, targets


def one_call(impl, logits, targets, backward):
    def run():
        ce, teacher = impl(logits, targets)
        if backward:
            ce.sum().backward()
            logits.grad = None
    return run


@pytest.mark.parametrize("impl", [composition, fused], ids=["torch", "cdfast"])
@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("size", SIZES, ids=[f"N{n}-B{b}-K{k}" for n, b, k in SIZES])
def test_election(benchmark, impl, pass_, size):
    n, b, k = size
    backward = pass_ == "forward_backward"
    logits, targets = setup(size, backward)
    call = one_call(impl, logits, targets, backward)
    benchmark.group = f"election {pass_} N={n} B={b} K={k} ({DEVICE})"
    work = measure_synced(benchmark, call)
    benchmark.extra_info.update(n=n, b=b, k=k, device=DEVICE, impl=impl.__name__, pass_=pass_, **work)


@pytest.mark.parametrize("impl", [composition, fused], ids=["torch", "cdfast"])
@pytest.mark.parametrize("size", SIZES[1:4], ids=[f"N{n}-B{b}-K{k}" for n, b, k in SIZES[1:4]])
def test_election_host_overhead(benchmark, impl, size):
    """fwd+bwd issued HOST_CALLS times, one sync: the host's cost per call when the GPU keeps up."""
    n, b, k = size
    logits, targets = setup(size, True)
    call = one_call(impl, logits, targets, True)
    benchmark.group = f"election host overhead fwd+bwd x{HOST_CALLS} N={n} B={b} K={k} ({DEVICE})"

    def run():
        for _ in range(HOST_CALLS):
            call()
        _sync()

    run()
    benchmark(run)
    benchmark.extra_info.update(n=n, b=b, k=k, device=DEVICE, impl=impl.__name__, calls=HOST_CALLS,
                                seconds_per_call=benchmark.stats["mean"] / HOST_CALLS if benchmark.stats else None)  # None: --benchmark-disable


# The target forms of modern recipes: label smoothing, ignored labels, class probabilities (MixUp).
FORMS = {"smoothing": dict(label_smoothing=0.1), "ignore": dict(ignore_index=-100), "probabilities": {}}


def form_inputs(form, n, b, k):
    torch.manual_seed(0)
    logits = torch.randn(n, b, k, device=DEVICE, requires_grad=True)
    if form == "probabilities":
        targets = torch.softmax(torch.randn(b, k, device=DEVICE), -1)
    else:
        targets = torch.randint(0, k, (b,), device=DEVICE)
        if form == "ignore":
            targets[::7] = -100
    return logits, targets


@pytest.mark.parametrize("impl", ["torch", "cdfast"])
@pytest.mark.parametrize("form", list(FORMS))
def test_election_target_forms(benchmark, impl, form):
    n, b, k = 4, 128, 100
    logits, targets = form_inputs(form, n, b, k)
    kw = FORMS[form]
    benchmark.group = f"election forward_backward {form} N={n} B={b} K={k} ({DEVICE})"

    def call():
        if impl == "torch":
            ce = torch.stack([F.cross_entropy(logits[i], targets, **kw) for i in range(n)])
            torch.argmin(ce)
        else:
            shape = logits.shape if targets.is_floating_point() else logits.shape[:-1]
            ce = torch.ops.cdfast.competitive_ce(logits, targets.expand(shape), None, None,
                                                 kw.get("label_smoothing", 0.0), kw.get("ignore_index"))[0]
        ce.sum().backward()
        logits.grad = None

    work = measure_synced(benchmark, call)
    benchmark.extra_info.update(n=n, b=b, k=k, device=DEVICE, impl=impl, form=form, **work)
