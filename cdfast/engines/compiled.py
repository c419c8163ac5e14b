"""``torch.compile`` for the engines that call each network on its own."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class CompiledNetworks:
    """Holds ``compile_options`` (None: eager) and one compiled wrapper per network.

    The wrapper (``torch.compile(net)``) shares the network's parameters and is kept
    out of the module tree, so state dicts, optimizers and checkpoints do not change.
    """

    def __init__(self, compile_options: dict | None = None):
        self.compile_options = compile_options
        self._compiled: dict[int, Callable] = {}

    def runner(self, net: nn.Module) -> Callable:
        if self.compile_options is None:
            return net
        key = id(net)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(net, **self.compile_options)
        return self._compiled[key]
