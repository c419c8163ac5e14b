"""Group-step throughput per engine, precision and mode (pytest-benchmark).

Each group runs in ``independent`` mode (the same networks trained separately,
same engine, same process) and in ``competitive`` mode, so the cost of
Competitive Distillation reads as a ratio of the two means. images/s per
network is in each benchmark's extra_info. ``test_one_network_alone`` times one
network's plain training step (CE + SGD), the yardstick of "N networks for the
price of one"; eager, compiled, and captured whole in a CUDA graph (its device time,
times N, is the group's serial floor in bench/summarize.py: overlapped or batched work,
streams or fused, can go below it). On the GPU, each case
also records the device time and launches of one step (``gpu_ms``, ``launches``, from
torch.profiler): a step whose device time is close to its wall time is GPU-bound. On the CPU only the small groups in fp32 run (the GPU groups and
bf16 would take minutes per round there).

Graph engines are timed once every (perturbed network, op) pair is captured: the
warm-up runs until then, since the pairs' first steps are eager by design.
"""

import pytest
import torch

import cdfast
from cdfast.models import build_model
from gpu_work import gpu_work

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# name: (models, image shape, batch, classes, GPU only)
GROUPS = {
    "2xresnet20-fmnist": (("resnet20", "resnet20"), (1, 28, 28), 128, 10, False),
    "2xresnet32-cifar": (("resnet32", "resnet32"), (3, 32, 32), 128, 100, False),
    "resnet20+resnet56-cifar": (("resnet20", "resnet56"), (3, 32, 32), 128, 100, True),
    "resnet56+resnet110-cifar": (("resnet56", "resnet110"), (3, 32, 32), 128, 100, True),
    "4xresnet32-cifar": (("resnet32",) * 4, (3, 32, 32), 128, 100, True),
    "2xresnet50-224": (("resnet50", "resnet50"), (3, 224, 224), 128, 1000, True),
}
# "+compile": the networks' forwards under torch.compile (inductor), GPU only: on 2 CPU cores the
# compilation alone takes minutes per group.
ENGINES = ["sequential", "fused"] + (["streams", "graph", "fused+graph", "sequential+compile", "fused+compile"]
                                     if ON_GPU else [])
PRECISIONS = ["fp32"] + (["bf16"] if ON_GPU else [])


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["independent", "competitive"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("group_name", list(GROUPS))
def test_group_step(benchmark, group_name, engine, precision, mode):
    models, shape, batch, classes, gpu_only = GROUPS[group_name]
    if gpu_only and not ON_GPU:
        pytest.skip("GPU-sized group")
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = ON_GPU  # as the trainer does on CUDA
    memory_format = torch.channels_last if ON_GPU else torch.preserve_format
    nets = [build_model(m, classes, shape[0]).to(DEVICE, memory_format=memory_format) for m in models]
    compiled = engine.endswith("+compile")
    engine_name = engine.removesuffix("+compile")
    graphed = engine_name.endswith("graph")
    group = cdfast.CompetitiveDistillation(
        nets, mode=mode, perturb=True, engine=engine_name, compile=compiled, input_shape=shape,
        channels_last=ON_GPU,
        autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
        optimizers=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                             **({"fused": True} if graphed else {"foreach": True})))
    x = torch.randn(batch, *shape, device=DEVICE)
    y = torch.randint(0, classes, (batch,), device=DEVICE)
    warmup = 10 if compiled else 3
    if graphed and ON_GPU:  # until every (network, op) pair has its graph (each pair's first step is eager)
        pairs = len(models) * len(group.pool.ops) if group.perturb else 1
        warmup = 0
        while group._graph_step.captures < pairs and warmup < 40 * pairs:
            group.step(x, y)
            warmup += 1
    for _ in range(warmup if not (graphed and ON_GPU) else 2):
        group.step(x, y)
    _sync()

    def step():
        group.step(x, y)
        _sync()

    benchmark.group = f"{group_name} {precision} ({DEVICE})"
    benchmark.pedantic(step, rounds=20 if ON_GPU else 5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(group=group_name, engine=engine_name if graphed else group.engine.name,
                                compiled=bool(compiled),
                                precision=precision, mode=mode,
                                device=DEVICE, images_per_second_per_network=batch / benchmark.stats["mean"],
                                **device_work(lambda: group.step(x, y)))


def device_work(step, steps: int = 3) -> dict:
    """extra_info entries: one step's device time (ms) and launches, on the GPU (after the timing:
    the profiler slows the host while it records)."""
    work = gpu_work(step, steps)
    return {} if work is None else {"launches": round(work[0]), "gpu_ms": work[1] / 1e3}


# One network trained alone (CE + fused SGD, channels-last): what a group's per-network images/s is
# compared with. Eager and under the default torch.compile, as a user would run it.
ALONE = {"resnet32-cifar": ("resnet32", (3, 32, 32), 128, 100), "resnet50-224": ("resnet50", (3, 224, 224), 128, 1000)}


@pytest.mark.parametrize("how", ["eager", "compile", "graph"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(ALONE))
def test_one_network_alone(benchmark, name, precision, how):
    if not ON_GPU:
        pytest.skip("the yardstick of the GPU groups")
    model, shape, batch, classes = ALONE[name]
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # like the groups
    net = build_model(model, classes, shape[0]).to(DEVICE, memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)
    forward = torch.compile(net) if how == "compile" else net
    x = torch.randn(batch, *shape, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=DEVICE)
    # a graph replays its casts: autocast must not cache them across replays
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=how != "graph")

    def train_step():
        opt.zero_grad(set_to_none=how != "graph")  # a graph keeps its gradients' memory
        with autocast:
            logits, _ = forward(x)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        opt.step()

    if how == "graph":  # warm up on a side stream (cuDNN autotuning, momentum buffers), then capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                train_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            train_step()
        call = graph.replay
    else:
        call = train_step

    def step():
        call()
        _sync()

    for _ in range(10 if how == "compile" else 3):
        step()
    benchmark.group = f"alone {name} {precision} ({DEVICE})"
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(group=name, engine="alone+graph" if how == "graph" else "alone",
                                compiled=how == "compile", precision=precision, mode="alone", device=DEVICE,
                                images_per_second_per_network=batch / benchmark.stats["mean"], **device_work(call))
