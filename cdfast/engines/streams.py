"""The streams engine: each network's forward (and so its backward) on its own CUDA stream.

Autograd runs each backward op on the stream its forward op ran on, so one
``loss.sum().backward()`` also overlaps the N backwards. The engine joins the
streams before the outputs are used (the election and the student loss need
all N), and marks the outputs as used on the joining stream so the caching
allocator does not hand their memory out early (``record_stream``).
Heterogeneous groups gain most: their kernels do not line up for fusion.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._pytree import tree_leaves

from cdfast.engines.batchnorm import frozen_batchnorm_stats, frozen_set
from cdfast.engines.compiled import CompiledNetworks


def _tensors(out) -> list[Tensor]:
    """Every tensor in a network's output, however nested (tuples, lists, dicts of features)."""
    return [t for t in tree_leaves(out) if isinstance(t, Tensor)]


class StreamsEngine(CompiledNetworks):
    name = "streams"

    def __init__(self, compile_options: dict | None = None):
        super().__init__(compile_options)
        self._streams: list[torch.cuda.Stream] = []

    def _side_streams(self, n: int, device: torch.device) -> list[torch.cuda.Stream]:
        if len(self._streams) < n or self._streams[0].device != device:
            self._streams = [torch.cuda.Stream(device=device) for _ in range(n)]
        return self._streams[:n]

    def forward(self, networks: Sequence[nn.Module], inputs: Sequence[Tensor], frozen_bn=-1) -> list:
        frozen = frozen_set(frozen_bn)
        device = inputs[0].device
        if device.type != "cuda":
            raise ValueError(f"the streams engine runs on CUDA tensors, got {device}; use engine='sequential'")
        main = torch.cuda.current_stream(device)
        streams = self._side_streams(len(networks), device)
        outs = []
        for i, (net, x, stream) in enumerate(zip(networks, inputs, streams)):
            stream.wait_stream(main)  # inputs and parameters are ready
            x.record_stream(stream)
            with torch.cuda.stream(stream), (frozen_batchnorm_stats(net) if i in frozen else nullcontext()):
                outs.append(self.runner(net)(x))
        for stream, out in zip(streams, outs):
            main.wait_stream(stream)
            for t in _tensors(out):
                t.record_stream(main)
        return outs
