"""BatchNorm and layer-setting helpers shared by the engines."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn


def frozen_set(frozen_bn) -> frozenset[int]:
    """The engines' ``frozen_bn`` argument (an index, -1 for none, or a collection) as a set."""
    if isinstance(frozen_bn, int):
        return frozenset() if frozen_bn < 0 else frozenset((frozen_bn,))
    return frozenset(frozen_bn)


def layer_settings(network: nn.Module) -> tuple:
    """Every layer's train/eval flag, with BatchNorm momentum and eps: the settings a vmapped forward
    takes from network 0 for every network, and that a captured CUDA graph bakes in."""
    return tuple((m.training, m.momentum, m.eps) if isinstance(m, nn.modules.batchnorm._BatchNorm) else m.training
                 for m in network.modules())


def running_stat_modules(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextmanager
def frozen_batchnorm_stats(net: nn.Module):
    """BatchNorm still normalizes with batch statistics, but its running statistics stay put.

    Used for the perturbed network's forward: evaluation sees clean images, so the
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


@contextmanager
def recalibrated_batchnorm(networks, batches, prepare=lambda x: x, autocast=None):
    """Inside: every network's BatchNorm running statistics are the exact average over ``batches``
    (clean training images); afterwards the running statistics are back as they were.

    Running statistics lag the weights when those change fast (lr ~0.1), and an evaluation with
    them shows the lag, not the weights; a few clean batches fix that at the cost of their
    forwards. ``prepare`` maps a batch's images to the networks' device and layout.
    """
    norms = [m for net in networks for m in running_stat_modules(net)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum) for m in norms]
    modes = [net.training for net in networks]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: every calibration batch weighs the same
        with torch.no_grad(), (autocast or nullcontext()):
            for net in networks:
                net.train()
            for x, _ in batches:
                x = prepare(x)
                for net in networks:
                    net(x)
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count, momentum) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
                m.momentum = momentum
        for net, mode in zip(networks, modes):
            net.train(mode)
