"""The graph engine: one whole training step captured in a CUDA graph and replayed.

Small networks at batch 128 are launch-bound: the host spends longer issuing a
step's hundreds of kernels than the GPU spends running them. Here the complete
step (the perturbation of one network's batch, the N forwards, ``competitive_ce``
and the election, the student losses, the backward and every optimizer step)
is recorded once per (perturbed network, perturbation op) pair and replayed, so
a step costs a handful of host calls whatever the network's depth.

What makes a step replayable, and how this module provides it:

- Choices that select code (which network is perturbed, with which op) are drawn
  on the host and pick the graph; every number inside the step (noise std,
  mixing weight, boxes, matrices, partners) is drawn on the device from the
  pool's generator, which each graph registers so replays advance it.
- Inputs are copied into static buffers (of the first batch's shape, or of
  another once it has come up more often; other shapes, e.g. a short last
  batch, run eagerly); the learning rate is a device
  tensor per parameter group (a scheduler's or a trainer's new value is written
  into it before the next replay); gradients live in the graphs' memory, where
  each replay's captured backward writes them afresh. ``p.grad`` is None after
  every step of this engine (the graphs' gradients are not readable in between).
- What a graph bakes in is watched before every replay, and the graphs are
  dropped (captured again) when it changes: the optimizers' state and settings,
  the group's loss settings (alpha, beta, temperature, mode, ...), every layer's
  train/eval flag, BatchNorm momentum and eps, which parameters take gradients,
  and where the parameters live (``.to()``, a state load).
- A pair's first step runs eagerly on a side stream (PyTorch's warm-up rule:
  lazy initialisation, autotuning and the optimizer's first-step state happen
  outside any capture); its next step captures the graph, then replays it.
- Metrics are copied, inside the graph, into a ring of ``ring_size`` slots,
  so the results a trainer buffers for ``log_interval`` steps stay intact.
- All graphs share one memory pool. That is safe in any replay order because
  every pool tensor is written before it is read within each replay, and a
  replay's outputs are consumed (copied into the ring) before the next replay.

Refused, with the reason: the streams engine inside a graph, ``torch.compile``
modes that use CUDA graphs themselves, BatchNorm with ``momentum=None``,
optimizers that cannot be captured, and perturbation ops that draw from the
host RNG inside the step. On the CPU the engine
is the eager step (with one message), so a config runs everywhere.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

from cdfast.engines.batchnorm import layer_settings

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
    """Every optimizer setting a captured step bakes in (all but the learning rate, a tensor)."""
    return tuple(
        tuple(sorted((k, id(v) if isinstance(v, Tensor) else repr(v)) for k, v in group.items()
                     if k not in ("params", "lr", "initial_lr")))
        for group in optimizer.param_groups
    )


def _group_signature(group: CompetitiveDistillation) -> tuple:
    """The group's settings a captured step bakes in (floats reach the kernels as arguments)."""
    return (group.mode, group.teachers, group.alpha, group.beta, group.temperature, group.feature_loss,
            group.perturbed_bn, group.matched_inputs, group.election, group.autocast_dtype, group.channels_last,
            group.engine_name, group.training, group.label_smoothing, group.ignore_index)


def why_not_graphable(group: CompetitiveDistillation) -> str | None:
    """None when the group's networks can be captured as they are; else the reason."""
    for i, net in enumerate(group.networks):
        for name, m in net.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is None:
                return (f"network {i}'s {name or 'module'} is a BatchNorm with momentum=None (a cumulative average "
                        "that reads its step count on the host)")
    return None


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
        self.resets = 0  # times the graphs were dropped because something they bake in changed
        self._warned_fallback = self._warned_resets = self._warned_shape = False
        self._reset()

    def _reset(self) -> None:
        """Forget every graph (after a state load, a hyper-parameter change or a new batch shape)."""
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.seen: set[tuple[int, int]] = set()
        self.shape: tuple | None = None  # (x shape, x dtype, y shape) that the graphs take
        self.shape_counts: dict[tuple, int] = {}  # batches of each shape since the graphs took theirs
        self.static: tuple[Tensor, Tensor] | None = None
        self.pool = None
        self.ring = self.teacher_ring = self.slot_device = None
        self.slot = 0
        self.lr: list[list[Tensor]] = []
        self.watched: tuple | None = None
        self.params: list[Tensor] = []
        self.stream: torch.cuda.Stream | None = None  # the warm-ups' side stream
        self.capture_stream: torch.cuda.Stream | None = None

    # ---- what a captured step depends on ---------------------------------------------
    def _check(self, device: torch.device) -> None:
        g = self.group
        reason = why_not_graphable(g)
        if reason is not None:
            raise ValueError(f"the graph engine cannot capture this group: {reason}; use another engine")
        for i, opt in enumerate(g.optimizers):
            reason = why_not_capturable(opt)
            if reason is not None:
                raise ValueError(f"the graph engine captures every optimizer step, but network {i}'s {reason}: "
                                 "build it with torch.optim.SGD(..., fused=True) or Adam/AdamW(..., capturable=True)")
        self.lr = [[self._lr_tensor(pg, device) for pg in opt.param_groups] for opt in g.optimizers]
        self.params = list(g.parameters())

    @staticmethod
    def _lr_tensor(param_group: dict, device: torch.device) -> Tensor:
        lr = param_group["lr"]
        if not (isinstance(lr, Tensor) and lr.device == device and lr.dtype == torch.float32):
            lr = torch.tensor(float(lr), device=device, dtype=torch.float32)
            param_group["lr"] = lr
        return lr

    def _watch(self, device: torch.device) -> tuple:
        """Everything a captured step bakes in: objects compared by identity, values by equality.

        Besides the optimizers and the group: every layer's train/eval flag (one layer put in eval,
        e.g. a frozen BatchNorm), BatchNorm momentum and eps (kernel arguments), and which
        parameters take a gradient (a layer frozen after the capture must stop being stepped)."""
        g = self.group
        return (device, tuple(opt.state for opt in g.optimizers), tuple(opt.param_groups for opt in g.optimizers),
                tuple(_hyper_signature(opt) for opt in g.optimizers), _group_signature(g),
                tuple(p.data_ptr() for p in self.params), tuple(p.requires_grad for p in self.params),
                tuple(layer_settings(net) for net in g.networks))

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        return (a[0] == b[0] and all(x is y for x, y in zip(a[1], b[1])) and all(x is y for x, y in zip(a[2], b[2]))
                and a[3:] == b[3:])

    def _sync_settings(self, device: torch.device) -> None:
        """Before a replay: learning rates into the captured tensors; recapture if anything else moved."""
        if self.lr and not self._same(self._watch(device), self.watched):  # one look per step
            self.resets += 1
            log.info("cdfast: graph engine: the optimizers, the group's settings or the parameters changed; "
                     "capturing the step again")
            if self.resets >= 5 and not self._warned_resets:
                self._warned_resets = True
                log.warning("cdfast: the graph engine has dropped its graphs %d times: a setting it captures "
                            "changes every few steps (a momentum schedule? a loss weight ramp?); every step then "
                            "runs eagerly. Keep such settings fixed, or use another engine", self.resets)
            self._reset()
        if not self.lr:
            self._check(device)  # after a reset or at the first step: adopt the lr tensors, then look
            self.watched = self._watch(device)
        for opt, tensors in zip(self.group.optimizers, self.lr):
            for pg, t in zip(opt.param_groups, tensors):
                if pg["lr"] is not t:  # a float (or another tensor) was assigned: keep the captured tensor
                    new = pg["lr"]
                    t.copy_(new) if isinstance(new, Tensor) else t.fill_(float(new))
                    pg["lr"] = t

    # ---- the step ------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor, perturbation: tuple[int, int] | None = None) -> StepResult:
        """One step as a replay. ``perturbation``: fixed ``(network, op)`` instead of drawn (engine auto's timing)."""
        g = self.group
        y = g._check_batch(x, y)
        r, op = g._draw_perturbation() if perturbation is None else perturbation
        if not self._can_capture(x.device):
            if not self._warned_fallback:
                log.warning("cdfast: the graph engine needs CUDA; running the eager step on %s", x.device)
                self._warned_fallback = True
            return g._eager_step(x, y, r, op)
        self._sync_settings(x.device)
        if self.ring is not None and self.ring.shape[0] != self.ring_size:
            self._reset()  # ring_size changed: the graphs bake in the old one
            self._sync_settings(x.device)
        shape = (tuple(x.shape), x.dtype, tuple(y.shape))
        if self.shape is None:
            self.shape = shape  # the first batch after a reset sets the shape the graphs take...
        counts = self.shape_counts
        if len(counts) > 8 and shape not in counts:
            counts.clear()  # many shapes: keep the counts bounded
        counts[shape] = counts.get(shape, 0) + 1
        if shape != self.shape and counts[shape] >= 2 and counts[shape] > counts.get(self.shape, 0):
            # ...until another shape is the more common one (the first batch was a short one, e.g. a
            # resume at an epoch's last batch): the graphs take that shape instead
            log.info("cdfast: graph engine: batches of shape %s are the common ones; capturing for them",
                     list(x.shape))
            self._reset()
            self._sync_settings(x.device)
            self.shape, self.shape_counts = shape, {shape: counts[shape]}
        if shape != self.shape:
            if not self._warned_shape:
                self._warned_shape = True
                log.info("cdfast: graph engine: a batch of shape %s runs eagerly (the graphs take %s)",
                         list(x.shape), list(self.shape[0]))
            return self._warmup_step(x, y, r, op)  # e.g. a short last batch: not worth a capture
        key = (r, op)
        if key not in self.seen:  # warm-up: this pair's first step runs eagerly
            host = g.pool.rng.host.getstate()
            result = self._warmup_step(x, y, r, op)
            if g.pool.rng.host.getstate() != host:  # a capture would draw it once and replay it forever
                raise ValueError(f"perturbation {g.pool.names[op]!r} draws from the host RNG (rng.host) inside the "
                                 "step: a CUDA graph would replay the same numbers every time. Draw its random "
                                 "numbers on the device (rng.on(x.device)), or use an engine without 'graph'")
            self.seen.add(key)  # only a warm-up that went through counts (a capture needs one before it)
            return result
        if self.static is None:
            self.static = (torch.empty_like(x), torch.empty_like(y))
            n = g.n
            self.ring = torch.zeros(self.ring_size, 4 * n, device=x.device, dtype=torch.float32)
            self.teacher_ring = torch.zeros(self.ring_size, dtype=torch.int64, device=x.device)
            self.slot_device = torch.zeros(1, dtype=torch.int64, device=x.device)
            self.pool = self._new_pool(x.device)
        self.static[0].copy_(x)
        self.static[1].copy_(y)
        if key not in self.graphs:
            self.graphs[key] = self._capture(r, op)
        self._replay(self.graphs[key])
        slot, self.slot = self.slot, (self.slot + 1) % self.ring_size
        return self._result(slot, r, op)

    # ---- the CUDA parts (a CPU test replaces these five to run the logic above) ---------------
    @staticmethod
    def _can_capture(device: torch.device) -> bool:
        return device.type == "cuda"

    @staticmethod
    def _new_pool(device: torch.device):
        with torch.cuda.device(device):
            return torch.cuda.graph_pool_handle()

    def _warmup_step(self, x: Tensor, y: Tensor, r: int, op: int) -> StepResult:
        """An eager step on a side stream, as PyTorch asks before a capture."""
        with torch.cuda.device(x.device):
            if self.stream is None:
                self.stream = torch.cuda.Stream(device=x.device)
            main = torch.cuda.current_stream(x.device)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                result = self.group._eager_step(x, y, r, op)
            main.wait_stream(self.stream)
            for t in (result.loss, result.ce, result.distill, result.teacher, result.correct):
                t.record_stream(main)  # read later on the main stream: keep the memory until then
        for opt in self.group.optimizers:
            opt.zero_grad(set_to_none=True)  # as after a replay: this engine leaves no gradients behind
        return result

    def _record(self, body) -> torch.cuda.CUDAGraph:
        """Capture ``body()`` (the whole step) in a CUDA graph that draws from the pool's generator."""
        device = self.static[0].device
        with torch.cuda.device(device):  # the capture stream, the pool and the RNG state: on the tensors' GPU
            if self.capture_stream is None:
                self.capture_stream = torch.cuda.Stream(device=device)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.group.pool.rng.on(device))
            torch.cuda.synchronize(device)
            # thread_local: a DataLoader's pinning thread may call CUDA while this thread captures
            with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream,
                                  capture_error_mode="thread_local"):
                body()
        return graph

    def _replay(self, graph) -> None:
        with torch.cuda.device(self.static[0].device):
            graph.replay()

    def _capture(self, r: int, op: int):
        for opt in self.group.optimizers:
            opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in the pool
        graph = self._record(lambda: self._body(r, op))
        for opt in self.group.optimizers:
            opt.zero_grad(set_to_none=True)  # p.grad would alias pool memory other graphs reuse
        self.captures += 1
        log.debug("cdfast: graph engine: captured the step for perturbed network %d, op %d", r, op)
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
