"""Throughput of the group step and of the reference losses (pytest-benchmark).

Run: ``make bench`` (CPU) or ``pytest bench --benchmark-only`` on a GPU machine.
Each step benchmark also runs independent training of the same networks in
the same process, so the distillation overhead is read as a ratio.
"""

import pytest
import torch

import cdfast
from cdfast.models import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_group(mode, models=("resnet8", "resnet8"), shape=(1, 28, 28)):
    torch.manual_seed(0)
    nets = [build_model(m, 10, shape[0]).to(DEVICE) for m in models]
    return cdfast.CompetitiveDistillation(nets, mode=mode, input_shape=shape)


@pytest.mark.parametrize("mode", ["independent", "competitive", "dml"])
def test_group_step(benchmark, mode):
    batch = 128
    group = make_group(mode)
    x = torch.randn(batch, 1, 28, 28, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    for _ in range(3):
        group.step(x, y)

    def step():
        group.step(x, y)
        _sync()

    benchmark.pedantic(step, rounds=10 if DEVICE == "cpu" else 50, iterations=1)
    benchmark.extra_info.update(mode=mode, device=DEVICE, networks=2, batch=batch,
                                images_per_second_per_network=batch / benchmark.stats["mean"])


@pytest.mark.parametrize("n,b,k", [(2, 128, 10), (2, 128, 100), (4, 256, 1000)])
def test_reference_losses_forward_backward(benchmark, n, b, k):
    torch.manual_seed(0)
    logits = torch.randn(n, b, k, device=DEVICE, requires_grad=True)
    feats = torch.randn(n, b, 256, device=DEVICE, requires_grad=True)
    y = torch.randint(0, k, (b,), device=DEVICE)

    def run():
        ce, teacher = cdfast.competitive_ce(logits, y)
        (ce + cdfast.group_student_loss(logits, feats, teacher)).sum().backward()
        _sync()

    benchmark(run)
    benchmark.extra_info.update(n=n, b=b, k=k, device=DEVICE)
