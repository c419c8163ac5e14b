"""The group a config describes: its networks, their optimizers and the step's options, built in one place.

:class:`~cdfast.train.Trainer` builds its group here, and so can anyone who wants the
group of a :class:`TrainConfig` without the training loop (a benchmark, a notebook).
"""

from __future__ import annotations

from typing import Any

import torch

from cdfast.algorithm import CompetitiveDistillation
from cdfast.engines import split_engine_name
from cdfast.models import build_model
from cdfast.perturb import PerturbationPool
from cdfast.train.config import TrainConfig

__all__ = ["build_group", "sgd_options"]


def sgd_options(cfg: TrainConfig, device: torch.device | str) -> dict[str, Any]:
    """The SGD settings of ``cfg`` but the learning rate (which the schedule owns)."""
    # A graph engine captures the optimizer step: fused SGD reads its learning rate from the device
    # (engine auto on a GPU may choose a graph engine).
    graphed = split_engine_name(cfg.engine)[1] or (cfg.engine == "auto" and torch.device(device).type == "cuda")
    return dict(momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                weight_decay=cfg.weight_decay, fused=True if (cfg.fused_sgd or graphed) else None)


def build_group(cfg: TrainConfig, *, num_classes: int, input_shape: tuple[int, int, int],
                device: torch.device | str, black=None, white=None) -> CompetitiveDistillation:
    """The networks of ``cfg.models`` on ``device`` with SGD optimizers, grouped with ``cfg``'s step options.

    ``input_shape``: ``(C, H, W)`` of one image. ``black`` / ``white``: the normalized levels of a
    black / white pixel, per channel, for the perturbations' padding and fill (default 0 / 1).
    """
    memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
    networks = [build_model(name, num_classes, input_shape[0], cfg.features).to(device, memory_format=memory_format)
                for name in cfg.models]
    if cfg.sync_bn and torch.device(device).type != "cuda":
        raise ValueError(f"sync_bn needs GPUs (torch's SyncBatchNorm synchronises CUDA tensors); this run is on {device}")
    if cfg.sync_bn:  # data parallel: normalise over the global batch (a no-op in one process)
        networks = [torch.nn.SyncBatchNorm.convert_sync_batchnorm(net) for net in networks]
    options = sgd_options(cfg, device)
    return CompetitiveDistillation(
        networks,
        optimizers=lambda params: torch.optim.SGD(params, lr=cfg.lr, **options),
        mode=cfg.mode, teachers=cfg.teachers, alpha=cfg.alpha, beta=cfg.beta, temperature=cfg.temperature,
        feature_loss=cfg.feature_loss, perturb=cfg.perturb, perturb_prob=cfg.perturb_prob,
        perturb_every=cfg.perturb_every, seed=cfg.seed,
        # (an empty pool is valid only with perturbation off, where the pool's ops are never used)
        perturb_ops=PerturbationPool(cfg.perturb_ops or None, seed=cfg.seed, fill=black, white=white),
        perturbed_bn=cfg.perturbed_bn, matched_inputs=cfg.matched_inputs, election=cfg.election,
        label_smoothing=cfg.label_smoothing,
        input_shape=input_shape, autocast_dtype=torch.bfloat16 if cfg.amp else None,
        channels_last=cfg.channels_last, engine=cfg.engine,
        compile=({"mode": cfg.compile_mode} if cfg.compile_mode else cfg.compile),
    ).to(device)
