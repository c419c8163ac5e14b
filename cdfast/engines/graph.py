"""The graph engine: one whole training step captured in a CUDA graph and replayed.

Small networks at batch 128 are launch-bound: the host spends longer issuing a
step's hundreds of kernels than the GPU spends running them. Here the complete
step (the mutation of one network's batch, the N forwards, ``competitive_ce``
and the election, the student losses, the backward and every optimizer step)
is recorded once per (mutated network, perturbation op) pair and replayed, so
a step costs a handful of host calls whatever the network's depth.

What makes a step replayable, and how this module provides it:

- Choices that select code (which network is mutated, with which op) are drawn
  on the host and pick the graph; every number inside the step (noise std,
  mixing weight, boxes, matrices, partners) is drawn on the device from the
  pool's generator, which each graph registers so replays advance it.
- Inputs are copied into static buffers; the learning rate is a device tensor
  per parameter group (a scheduler's or a trainer's new value is written into
  it before the next replay); gradients live in the graphs' memory (never set to
  None between replays).
- A pair's first step runs eagerly on a side stream (PyTorch's warm-up rule:
  lazy initialisation, autotuning and the optimizer's first-step state happen
  outside any capture); its next step captures the graph, then replays it.
- Metrics are copied, inside the graph, into a ring of ``ring_size`` slots,
  so the results a trainer buffers for ``log_interval`` steps stay intact.
- All graphs share one memory pool. That is safe in any replay order because
  every pool tensor is written before it is read within each replay, and a
  replay's outputs are consumed (copied into the ring) before the next replay.

Refused combinations, with the reason: the streams engine inside a graph, and
``torch.compile`` modes that use CUDA graphs themselves. On the CPU the engine
is the eager step (with one message), so a config runs everywhere.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from cdfast.algorithm import CompetitiveDistillation, StepResult

log = logging.getLogger("cdfast")

GRAPH_COMPILE_MODES_REFUSED = ("reduce-overhead", "max-autotune")


def why_not_capturable(optimizer: torch.optim.Optimizer) -> str | None:
    """None when ``optimizer.step()`` can be captured with a tensor learning rate, else why not."""
    for group in optimizer.param_groups:
        if group.get("capturable") or group.get("fused"):
            continue
        name = type(optimizer).__name__
        hint = "fused=True" if isinstance(optimizer, torch.optim.SGD) else "capturable=True (or fused=True)"
        return f"{name} was built without {hint}"
    return None


def _hyper_signature(optimizer: torch.optim.Optimizer) -> tuple:
    """Every setting a captured step bakes in (all but the learning rate, which is a tensor)."""
    return tuple(
        tuple(sorted((k, id(v) if isinstance(v, Tensor) else repr(v)) for k, v in group.items()
                     if k not in ("params", "lr", "initial_lr")))
        for group in optimizer.param_groups
    )


class GraphStep:
    """Runs :meth:`CompetitiveDistillation.step` as CUDA graph replays (see the module docstring)."""

    def __init__(self, group: CompetitiveDistillation, ring_size: int = 1024):
        mode = (group.compile_options or {}).get("mode")
        if mode in GRAPH_COMPILE_MODES_REFUSED:
            raise ValueError(f"torch.compile mode {mode!r} captures CUDA graphs itself; with the graph engine use "
                             "compile=True (the default mode), or that mode with another engine")
        self.group = group
        self.ring_size = ring_size
        self.captures = 0  # graphs recorded so far, over every reset
        self._reset()
        self._warned_fallback = False

    def _reset(self) -> None:
        """Forget every graph (after a state load, a hyper-parameter change or a new batch shape)."""
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.seen: set[tuple[int, int]] = set()
        self.static: tuple[Tensor, Tensor] | None = None
        self.pool = None
        self.ring = self.teacher_ring = self.slot_device = None
        self.slot = 0
        self.lr: list[list[Tensor]] = []
        self.watched: list[tuple] = []
        self.stream: torch.cuda.Stream | None = None

    # ---- what a captured step depends on ---------------------------------------------
    def _check(self, device: torch.device) -> None:
        g = self.group
        for i, opt in enumerate(g.optimizers):
            reason = why_not_capturable(opt)
            if reason is not None:
                raise ValueError(f"the graph engine captures every optimizer step, but network {i}'s {reason}: "
                                 "build it with torch.optim.SGD(..., fused=True) or Adam/AdamW(..., capturable=True)")
        self.lr = [[self._lr_tensor(pg, device) for pg in opt.param_groups] for opt in g.optimizers]

    @staticmethod
    def _lr_tensor(param_group: dict, device: torch.device) -> Tensor:
        lr = param_group["lr"]
        if not (isinstance(lr, Tensor) and lr.device == device and lr.dtype == torch.float32):
            lr = torch.tensor(float(lr), device=device, dtype=torch.float32)
            param_group["lr"] = lr
        return lr

    def _sync_settings(self, device: torch.device) -> None:
        """Before a replay: learning rates into the captured tensors; recapture if anything else moved."""
        g = self.group
        watched = [(id(opt.state), id(opt.param_groups), _hyper_signature(opt)) for opt in g.optimizers]
        if self.watched and watched != self.watched:
            log.info("cdfast: graph engine: optimizer state or settings changed; capturing the step again")
            self._reset()
        if not self.lr:
            self._check(device)
            watched = [(id(opt.state), id(opt.param_groups), _hyper_signature(opt)) for opt in g.optimizers]
        self.watched = watched
        for opt, tensors in zip(g.optimizers, self.lr):
            for pg, t in zip(opt.param_groups, tensors):
                if pg["lr"] is not t:  # a float (or another tensor) was assigned: keep the captured tensor
                    new = pg["lr"]
                    t.copy_(new) if isinstance(new, Tensor) else t.fill_(float(new))
                    pg["lr"] = t

    # ---- the step ------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, mutation: tuple[int, int] | None = None) -> StepResult:
        """One step as a replay. ``mutation``: fixed ``(network, op)`` instead of drawn (engine auto's timing)."""
        g = self.group
        y = g._check_batch(x, y)
        r, op = g._draw_mutation() if mutation is None else mutation
        if not self._can_capture(x.device):
            if not self._warned_fallback:
                log.warning("cdfast: the graph engine needs CUDA; running the eager step on %s", x.device)
                self._warned_fallback = True
            return g._eager_step(x, y, r, op)
        self._sync_settings(x.device)
        if self.static is not None and (self.static[0].shape != x.shape or self.static[0].dtype != x.dtype
                                        or self.static[1].shape != y.shape):
            return self._warmup_step(x, y, r, op)  # e.g. a short last batch: not worth a capture
        key = (r, op)
        if key not in self.seen:  # warm-up: this pair's first step runs eagerly
            self.seen.add(key)
            return self._warmup_step(x, y, r, op)
        if self.static is None:
            self.static = (torch.empty_like(x), torch.empty_like(y))
            n = g.n
            self.ring = torch.zeros(self.ring_size, 4 * n, device=x.device)
            self.teacher_ring = torch.zeros(self.ring_size, dtype=torch.int64, device=x.device)
            self.slot_device = torch.zeros(1, dtype=torch.int64, device=x.device)
            self.pool = self._new_pool()
        self.static[0].copy_(x)
        self.static[1].copy_(y)
        if key not in self.graphs:
            self.graphs[key] = self._capture(r, op)
        self.graphs[key].replay()
        slot, self.slot = self.slot, (self.slot + 1) % self.ring_size
        return self._result(slot, r, op)

    # ---- the CUDA parts (a CPU test replaces these four to run the logic above) ---------------
    @staticmethod
    def _can_capture(device: torch.device) -> bool:
        return device.type == "cuda"

    @staticmethod
    def _new_pool():
        return torch.cuda.graph_pool_handle()

    def _warmup_step(self, x: Tensor, y: Tensor, r: int, op: int) -> StepResult:
        """An eager step on a side stream, as PyTorch asks before a capture."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=x.device)
        main = torch.cuda.current_stream(x.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            result = self.group._eager_step(x, y, r, op)
        main.wait_stream(self.stream)
        for t in (result.loss, result.ce, result.distill, result.teacher, result.correct):
            t.record_stream(main)  # read later on the main stream: keep the memory until then
        return result

    def _record(self, body) -> torch.cuda.CUDAGraph:
        """Capture ``body()`` (the whole step) in a CUDA graph that draws from the pool's generator."""
        device = self.static[0].device
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.group.pool.rng.on(device))
        torch.cuda.synchronize(device)
        # thread_local: a DataLoader's pinning thread may call CUDA while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            body()
        return graph

    def _capture(self, r: int, op: int):
        for opt in self.group.optimizers:
            opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in the pool
        graph = self._record(lambda: self._body(r, op))
        self.captures += 1
        log.debug("cdfast: graph engine: captured the step for mutated network %d, op %d", r, op)
        return graph

    def _body(self, r: int, op: int) -> None:
        """The whole step on the static batch, its metrics into the ring's next slot (on the device)."""
        g = self.group
        x, y = self.static
        out = g._losses(x, y, r, op)
        out.loss.sum().backward()
        for opt in g.optimizers:
            opt.step()
        packed = torch.cat([out.loss.detach(), out.ce.detach(), out.distill.detach(), out.correct]).float()
        self.ring.index_copy_(0, self.slot_device, packed.unsqueeze(0))
        self.teacher_ring.index_copy_(0, self.slot_device, out.teacher.reshape(1))
        self.slot_device.add_(1).remainder_(self.ring_size)

    def _result(self, slot: int, r: int, op: int) -> StepResult:
        from cdfast.algorithm import StepResult

        n = self.group.n
        row = self.ring[slot]
        return StepResult(row[:n], row[n:2 * n], row[2 * n:3 * n], self.teacher_ring[slot], row[3 * n:],
                          r, self.group.pool.names[op] if r >= 0 else None)
