"""The reference engine: run the networks one after another on the current stream."""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from torch import Tensor


class SequentialEngine:
    name = "sequential"

    def forward(self, networks: Sequence[nn.Module], inputs: Sequence[Tensor]) -> list:
        """One forward per network on its own input; returns each network's raw output."""
        return [net(x) for net, x in zip(networks, inputs)]
