"""Engines: every engine that runs on the CPU trains exactly like the sequential reference."""

import copy
import logging

import pytest
import torch

import cdfast
from cdfast.engines import FusedEngine, SequentialEngine, get_engine
from cdfast.models import build_model


def group(engine, models=("resnet8", "resnet8"), dtype=torch.float32, **kw):
    torch.manual_seed(0)
    layout = torch.channels_last if kw.get("channels_last") else torch.contiguous_format
    nets = [build_model(m, 10, 1).to(dtype).to(memory_format=layout) for m in models]
    return cdfast.CompetitiveDistillation(nets, engine=engine, input_shape=(1, 12, 12), seed=3, **kw)


# float64: the engines do the same arithmetic, so they agree to rounding. (In float32 the CPU's
# grouped-convolution backward rounds differently, and SGD amplifies it over steps: ~5e-3 after 4.)
# channels_last: the fused engine runs the group contiguous (CUDA batch norm under vmap cannot take
# channels-last tensors), the sequential one channels-last; the results must not tell them apart.
@pytest.mark.parametrize("mode,channels_last", [("competitive", False), ("dml", False), ("competitive", True)])
def test_fused_matches_sequential_after_several_steps(mode, channels_last):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 1, 12, 12, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g))
               for _ in range(4)]
    seq = group("sequential", mode=mode, perturb=True, dtype=torch.float64, channels_last=channels_last)
    fused = group("fused", mode=mode, perturb=True, dtype=torch.float64, channels_last=channels_last)
    assert isinstance(fused.engine, FusedEngine) and isinstance(seq.engine, SequentialEngine)
    for x, y in batches:
        a, b = seq.step(x, y), fused.step(x, y)
        assert a.perturbed == b.perturbed and int(a.teacher) == int(b.teacher)
        torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    sa, sb = seq.state_dict(), fused.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")


# aot_eager: dynamo + AOT autograd tracing without code generation, so the test stays fast on
# 2 cores; inductor is exercised by the GPU tests and benchmarks.
@pytest.mark.parametrize("engine", ["sequential", "fused"])
def test_compiled_engines_train_like_eager(engine):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 1, 12, 12, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g))
               for _ in range(3)]
    eager = group("sequential", perturb=True, dtype=torch.float64)
    compiled = group(engine, perturb=True, dtype=torch.float64, compile={"backend": "aot_eager"})
    assert compiled.engine.compile_options == {"backend": "aot_eager"}
    for x, y in batches:
        a, b = eager.step(x, y), compiled.step(x, y)
        assert a.perturbed == b.perturbed and int(a.teacher) == int(b.teacher)
    sa, sb = eager.state_dict(), compiled.state_dict()
    assert sa.keys() == sb.keys()  # the compiled wrappers stay out of the module tree
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="compile must be"):
        group("sequential", compile="max-autotune")
    assert group("sequential", compile=True).compile_options == {}
    assert group("sequential", compile={}).compile_options == {}  # an empty dict: torch.compile's defaults
    assert group("sequential").compile_options is None


def test_fused_takes_layer_settings_from_the_networks_at_every_step():
    # a BatchNorm put in eval mode (frozen statistics) and another momentum, set after the first
    # step in every network: the fused run must follow, as the sequential one does
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 1, 12, 12, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g))
               for _ in range(4)]
    seq = group("sequential", perturb=False, dtype=torch.float64)
    fused = group("fused", perturb=False, dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        if i == 1:
            for gr in (seq, fused):
                for net in gr.networks:
                    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
                    bns[0].eval()
                    bns[1].momentum = 0.5
        seq.step(x, y), fused.step(x, y)
    for name, value in seq.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, atol=1e-9, rtol=1e-9, msg=lambda m: f"{name}: {m}")
    # settings that differ between the networks cannot run as one forward: a clear error
    next(m for m in fused.networks[1].modules() if isinstance(m, torch.nn.BatchNorm2d)).momentum = 0.3
    with pytest.raises(ValueError, match="network 1's differ"):
        fused.step(*batches[0])


def test_fused_keeps_running_stats_of_the_mutated_network():
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))
    fused = group("fused", perturb=True)
    before = [copy.deepcopy(n.stem[1].running_mean) for n in fused.networks]
    r = fused.step(x, y).perturbed
    assert torch.equal(fused.networks[r].stem[1].running_mean, before[r])
    assert not torch.equal(fused.networks[1 - r].stem[1].running_mean, before[1 - r])


def test_fused_falls_back_for_different_networks():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("cdfast").addHandler(handler)
    try:
        engine = group("fused", models=("resnet8", "resnet14")).engine  # resolved for the networks' device
    finally:
        logging.getLogger("cdfast").removeHandler(handler)
    assert isinstance(engine, SequentialEngine)
    assert any("identical networks" in r.getMessage() for r in records)


def test_auto_and_unknown_engines():
    nets = [build_model("resnet8", 10, 1) for _ in range(2)]
    assert isinstance(get_engine("auto", nets), SequentialEngine)  # CPU: sequential is faster
    with pytest.raises(ValueError, match="unknown engine"):
        get_engine("warp-drive", nets)
    with pytest.raises(ValueError, match="unknown engine"):
        cdfast.CompetitiveDistillation(nets, engine="warp-drive")


@pytest.mark.cuda
def test_auto_picks_fused_on_gpu():
    nets = [build_model("resnet8", 10, 1).cuda() for _ in range(2)]
    assert isinstance(get_engine("auto", nets), FusedEngine)


def test_streams_engine_falls_back_on_cpu():
    assert isinstance(group("streams").engine, SequentialEngine)


@pytest.mark.cuda
@pytest.mark.parametrize("engine,channels_last", [("streams", False), ("fused", False), ("fused", True)])
def test_gpu_engines_match_sequential(engine, channels_last):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 1, 12, 12, generator=g, dtype=torch.float64).cuda(),
                torch.randint(0, 10, (32,), generator=g).cuda()) for _ in range(4)]
    ref = group("sequential", models=("resnet8", "resnet14"), dtype=torch.float64, perturb=True).cuda()
    other = group(engine, models=("resnet8", "resnet14") if engine == "streams" else ("resnet8", "resnet8"),
                  dtype=torch.float64, perturb=True, channels_last=channels_last).cuda()
    if engine == "fused":
        ref = group("sequential", dtype=torch.float64, perturb=True, channels_last=channels_last).cuda()
    assert other.engine.name == engine
    for x, y in batches:
        ref.step(x, y)
        other.step(x, y)
    torch.cuda.synchronize()
    for (name, p), q in zip(ref.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-8, rtol=1e-8, msg=lambda m: f"{name}: {m}")


@pytest.mark.cuda
def test_fused_engine_takes_float32_channels_last_on_gpu():
    """The case that crashed on the H200 (cuDNN batch norm asking a channels-last BatchedTensor for its
    layout under vmap): float32, where cuDNN runs the batch norm (float64 never reaches it)."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 1, 12, 12, generator=g).cuda(), torch.randint(0, 10, (32,), generator=g).cuda())
               for _ in range(3)]
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        ref = group("sequential", perturb=True, channels_last=True).cuda()
        fused = group("fused", perturb=True, channels_last=True).cuda()
        assert fused.engine.name == "fused"
        for x, y in batches:
            a, b = ref.step(x, y), fused.step(x, y)
            assert torch.isfinite(b.loss).all()
            # float32 grouped and single convolutions round differently: close, not equal
            torch.testing.assert_close(a.loss, b.loss, atol=1e-3, rtol=1e-3)


def test_streams_engine_finds_every_output_tensor_however_nested():
    from cdfast.engines.streams import _tensors

    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    found = _tensors((a, {"pooled": b, "maps": [c, None]}))
    assert len(found) == 3 and all(any(t is f for f in found) for t in (a, b, c))
