"""BatchNorm helpers shared by the engines."""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn


def running_stat_modules(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_batchnorm_stats(net: nn.Module):
    """BatchNorm still normalizes with batch statistics, but its running statistics stay put.

    Used for the mutated network's forward: evaluation sees clean images, so the
    running statistics should describe clean images, not noise or mixed batches.
    """
    norms = running_stat_modules(net)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
