"""The fused engine: N identical networks run as one, each kernel doing all N networks' work.

The networks' parameters and buffers are stacked every step (``torch.stack``,
differentiable, so each network's own parameters still receive their own
gradients and its own optimizer steps them) and one ``torch.func.vmap`` of
``functional_call`` runs the group: a convolution becomes one grouped
convolution, BatchNorm keeps statistics per network. The updated running
statistics are copied back to each network. Network 0 itself is the vmapped
structure, so its layer settings (train/eval flags, BatchNorm momentum and
eps, dropout) apply to every network, read at each call; networks whose
layer settings differ from network 0's are refused. Parameters, optimizers and
checkpoints stay per network, so engines are interchangeable mid-run.

It pays off where kernel launches dominate (small networks on a GPU); on the
CPU, grouped convolutions are slower than N separate ones (docs/RESULTS.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call, vmap

from cdfast.engines.batchnorm import frozen_set, layer_settings


def why_not_fusable(networks: Sequence[nn.Module]) -> str | None:
    """None when the networks are identical in structure; otherwise the reason, for the user."""
    first = networks[0]
    taps = {(getattr(net, "layer", None), getattr(net, "flatten", None)) for net in networks}
    if type(first).__name__ == "FeatureTap" and len(taps) > 1:
        return f"the networks' features come from different layers {sorted(map(str, taps))}"
    if any(isinstance(net, nn.parallel.DistributedDataParallel) for net in networks):
        return "DistributedDataParallel networks synchronise in their own forward, which one vmapped forward bypasses"
    if any(isinstance(m, nn.SyncBatchNorm) for net in networks for m in net.modules()):
        return "SyncBatchNorm synchronises inside each network's forward, which one vmapped forward cannot do"
    shapes = [(n, tuple(p.shape)) for n, p in first.named_parameters()]
    bufs = [(n, tuple(b.shape)) for n, b in first.named_buffers()]
    for i, net in enumerate(networks[1:], start=1):
        if type(net) is not type(first):
            return f"network {i} is a {type(net).__name__}, network 0 a {type(first).__name__}"
        if [(n, tuple(p.shape)) for n, p in net.named_parameters()] != shapes or \
                [(n, tuple(b.shape)) for n, b in net.named_buffers()] != bufs:
            return f"network {i} has other parameter or buffer shapes than network 0"
    return None


class FusedEngine:
    name = "fused"
    runs_contiguous = True  # whatever the group's layout (see forward): it wants its inputs contiguous

    def __init__(self, compile_options: dict | None = None):
        self.compile_options = compile_options
        self._structure: nn.Module | None = None
        self._group_forward = None

    def forward(self, networks: Sequence[nn.Module], inputs: Sequence[Tensor], frozen_bn=-1) -> list:
        if self._structure is not networks[0]:
            reason = why_not_fusable(networks)
            if reason is not None:
                raise ValueError(f"the fused engine needs identical networks: {reason}; use engine='sequential'")
            # Network 0 itself is the structure: functional_call swaps the stacked weights in for the
            # call only, and every layer setting (train/eval flag, BatchNorm momentum and eps, dropout
            # rate) is network 0's as it is at this call, never a stale copy.
            structure = self._structure = networks[0]

            def one(p, b, x):
                return functional_call(structure, (p, b), (x,))

            self._group_forward = vmap(one, in_dims=(0, 0, 0), randomness="different")
            if self.compile_options is not None:  # one compiled program for the whole group's forward
                self._group_forward = torch.compile(self._group_forward, **self.compile_options)
        settings = [layer_settings(net) for net in networks]
        for i, other in enumerate(settings[1:], start=1):
            if other != settings[0]:
                raise ValueError(f"the fused engine runs every network with network 0's layer settings, and network "
                                 f"{i}'s differ (a layer in eval mode, or another BatchNorm momentum or eps); set them "
                                 "alike in every network, or use engine='sequential'")
        named = [dict(net.named_parameters()) for net in networks]
        named_buffers = [dict(net.named_buffers()) for net in networks]
        # Everything contiguous: PyTorch's CUDA batch norm asks a channels-last input whether it is
        # channels-last, which vmap cannot answer (NYI), and a convolution with channels-last weights
        # makes channels-last outputs. So a channels-last group runs in the default layout here.
        params = {k: torch.stack([p[k] for p in named]).contiguous() for k in named[0]}
        buffers = {k: torch.stack([b[k] for b in named_buffers]) for k in named_buffers[0]}
        out = self._group_forward(params, buffers, torch.stack(list(inputs)).contiguous())
        frozen = frozen_set(frozen_bn)
        with torch.no_grad():  # buffers back to each network; frozen ones keep their running statistics
            for k, stacked in buffers.items():
                keep = [i for i in range(len(networks)) if i not in frozen or not stacked.is_floating_point()]
                if keep:
                    torch._foreach_copy_([named_buffers[i][k] for i in keep], [stacked[i] for i in keep])
        if isinstance(out, Tensor):
            return list(out.unbind(0))
        return list(zip(*(o.unbind(0) for o in out)))
