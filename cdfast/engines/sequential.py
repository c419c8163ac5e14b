"""The reference engine: run the networks one after another on the current stream."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch.nn as nn
from torch import Tensor

from cdfast.engines.batchnorm import frozen_batchnorm_stats, frozen_set
from cdfast.engines.compiled import CompiledNetworks


class SequentialEngine(CompiledNetworks):
    name = "sequential"

    def forward(self, networks: Sequence[nn.Module], inputs: Sequence[Tensor], frozen_bn=-1) -> list:
        """One forward per network on its own input; network ``frozen_bn`` keeps its BatchNorm running stats."""
        frozen = frozen_set(frozen_bn)
        outs = []
        for i, (net, x) in enumerate(zip(networks, inputs)):
            with frozen_batchnorm_stats(net) if i in frozen else nullcontext():
                outs.append(self.runner(net)(x))
        return outs
