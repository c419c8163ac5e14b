"""``engine="auto"`` on a GPU: time every engine that can run the group, keep the fastest.

Which engine wins depends on the networks, the batch, the precision and the GPU
(launch-bound small networks favour the graph engines, large ones barely care),
so a rule would be a guess. At the group's first :meth:`step` on CUDA, each
candidate runs a few steps on that very batch, with the perturbation fixed (network
0, the pool's first op) so every candidate does the same work; the group's
weights, optimizer state, BatchNorm statistics and random streams are restored
after each, so the measurement leaves no trace in training. The choice and the
timings are logged. On the CPU ``auto`` is the sequential engine (measured
faster there than fused; streams and graphs need CUDA).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cdfast.engines.fused import why_not_fusable
from cdfast.engines.graph import GRAPH_COMPILE_MODES_REFUSED, why_not_capturable

if TYPE_CHECKING:
    from cdfast.algorithm import CompetitiveDistillation

log = logging.getLogger("cdfast")


def candidates(group: CompetitiveDistillation, views: bool = False, data_parallel: bool = False
               ) -> tuple[list[str], list[str]]:
    """The engines worth timing for this group, and why the others are left out.

    ``views``: the loader makes the perturbed views, which a graph engine cannot take."""
    names, left_out = ["sequential", "streams"], []
    fusable = why_not_fusable(group.networks)
    if fusable is None:
        names.append("fused")
    else:
        left_out.append(f"fused ({fusable})")
    not_capturable = next((r for r in map(why_not_capturable, group.optimizers) if r is not None), None)
    mode = (group.compile_options or {}).get("mode")
    if views:
        left_out.append("graph engines (the loader makes the perturbed views; a graph perturbs inside)")
    elif data_parallel or group.process_group is not None:
        left_out.append("graph engines (data parallel: the all-reduces are not captured yet)")
    elif not_capturable is not None:
        left_out.append(f"graph engines ({not_capturable})")
    elif mode in GRAPH_COMPILE_MODES_REFUSED:
        left_out.append(f"graph engines (torch.compile mode {mode!r} captures graphs itself)")
    else:
        names += ["graph"] + (["fused+graph"] if fusable is None else [])
    return names, left_out


def _snapshot(group: CompetitiveDistillation) -> dict:
    return {
        "group": copy.deepcopy(group.state_dict()),
        "optimizers": [copy.deepcopy(opt.state_dict()) for opt in group.optimizers],
        "pool": copy.deepcopy(group.pool.state_dict()),
        "cuda_rng": torch.cuda.get_rng_state_all(),
        "cpu_rng": torch.get_rng_state(),
    }


def _restore(group: CompetitiveDistillation, snap: dict) -> None:
    with torch.no_grad():
        group.load_state_dict(snap["group"])
    for opt, state in zip(group.optimizers, snap["optimizers"]):
        opt.load_state_dict(copy.deepcopy(state))
    group.pool.load_state_dict(copy.deepcopy(snap["pool"]))
    torch.cuda.set_rng_state_all(snap["cuda_rng"])
    torch.set_rng_state(snap["cpu_rng"])


def _time_engine(group: CompetitiveDistillation, x: Tensor, y: Tensor, perturbation: tuple[int, int],
                 warmup: int, steps: int) -> float:
    def one():
        if group._graph_step is not None:
            group._graph_step.step(x, y, perturbation=perturbation)
        else:
            group._eager_step(x, y, *perturbation)

    def sync():
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    for _ in range(warmup):  # graph engines: the pair's eager step, then its capture
        one()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    sync()
    return (time.perf_counter() - t0) / steps


def measure(group: CompetitiveDistillation, x: Tensor, y: Tensor, steps: int = 5, warmup: int = 3,
            views: bool = False, data_parallel: bool = False) -> tuple[str, dict[str, float], list[str]]:
    """Time each candidate engine on ``(x, y)``; returns ``(fastest, seconds per step, left out)``.

    The group ends with its state as before the call, and with the engine it had.
    """
    names, left_out = candidates(group, views, data_parallel)
    perturbation = (0, 0) if group.perturb else (-1, -1)
    if group.compile_options is not None:
        warmup = max(warmup, 10)  # compilation and recompilation happen in the first steps
    snap = _snapshot(group)
    before = group.engine_spec
    seconds: dict[str, float] = {}
    try:
        for name in names:
            group._set_engine(name)
            try:
                seconds[name] = _time_engine(group, x, y, perturbation, warmup, steps)
            except (RuntimeError, ValueError) as e:  # an engine that cannot run here is not a candidate
                left_out.append(f"{name} (failed: {str(e).splitlines()[0][:120]})")
            finally:
                _restore(group, snap)
    finally:
        group._set_engine(before)
    if not seconds:
        raise RuntimeError("engine auto: no engine could run this group; " + "; ".join(left_out))
    return min(seconds, key=seconds.get), seconds, left_out
