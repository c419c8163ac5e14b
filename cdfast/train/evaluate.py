"""Evaluation of a group: every member and the ensemble (mean of softmax) on a test set.

Used by the trainer after every epoch and by ``cdfast evaluate RUN`` (:func:`evaluate_run`),
which reads a run's latest checkpoint and writes nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from cdfast.distributed import all_reduce_sum
from cdfast.engines.batchnorm import recalibrated_batchnorm
from cdfast.models import split_output

__all__ = ["EvaluationInterrupted", "evaluate_group", "evaluate_once", "evaluate_run"]


class EvaluationInterrupted(Exception):
    """Raised between two test batches when ``interrupted()`` says so (a stop requested during it)."""


def evaluate_once(group, batches: Iterable, prepare: Callable, device: torch.device, amp: bool = False,
                  process_group=None, interrupted: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Accuracy and loss of every network and the ensemble's accuracy over ``batches`` (as the networks are).
    ``interrupted``: asked before each batch; True raises :class:`EvaluationInterrupted`."""
    n = group.n
    group.eval()
    correct = torch.zeros(n + 1, device=device)
    loss_sum = torch.zeros(n, device=device)
    seen = 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    try:
        with torch.no_grad():
            for x, y, *_ in batches:
                if interrupted is not None and interrupted():
                    raise EvaluationInterrupted
                x, y = prepare(x), y.to(device, non_blocking=True)
                with autocast:  # through the training engine (fused, streams, compiled), in eval mode
                    outs = group.engine.forward(group.networks, [x] * n)
                    logits = torch.stack([split_output(i, o)[0] for i, o in enumerate(outs)]).float()
                probs = logits.softmax(-1)
                preds = torch.cat([logits.argmax(-1), probs.mean(0).argmax(-1).unsqueeze(0)])  # [n + 1, B]
                correct += (preds == y).sum(-1)
                loss_sum += torch.nn.functional.cross_entropy(logits.transpose(1, 2), y.expand(n, -1),
                                                              reduction="none").sum(-1)
                seen += y.shape[0]
    finally:
        group.train()
    # data parallel: each rank evaluated its shard of the test set
    correct, loss_sum, total = all_reduce_sum([correct, loss_sum, torch.tensor(float(seen), device=device)],
                                              process_group)
    if float(total) == 0:
        raise ValueError("the test set is empty: nothing to evaluate")
    acc = (correct / total).tolist()
    return {"test_acc": acc[:n], "ensemble_acc": acc[n], "test_loss": (loss_sum / total).tolist()}


def evaluate_group(group, test: Iterable, prepare: Callable, device: torch.device, *, amp: bool = False,
                   calibration: Iterable | None = None, process_group=None,
                   interrupted: Callable[[], bool] | None = None) -> dict[str, Any]:
    """:func:`evaluate_once`, and with ``calibration`` (clean training batches) the headline numbers with
    BatchNorm statistics recomputed on them; the running-statistics numbers then come as ``*_running_stats``.
    The networks' own statistics, and the random number generators, are back as they were afterwards
    (also when ``interrupted``, see :func:`evaluate_once`, stops it)."""
    # The random number generators are as they were afterwards, whatever the networks drew (dropout in
    # the recalibration's train-mode forwards): training goes on the same after an evaluation, and after
    # one that a stop interrupted and the resume ran again.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        running = evaluate_once(group, test, prepare, device, amp, process_group, interrupted)
        if calibration is None:
            return running
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
        with recalibrated_batchnorm(group.networks, calibration, prepare, autocast):
            metrics = evaluate_once(group, test, prepare, device, amp, process_group, interrupted)
    metrics.update({f"{k}_running_stats": v for k, v in running.items()})
    return metrics


def evaluate_run(run_dir: str | Path, **overrides) -> tuple[dict[str, Any], Any]:
    """Evaluate a run's latest checkpoint; returns ``(metrics, config)``. Writes nothing.

    ``overrides``: settings of how to evaluate (``device``, ``data_dir``, ``test_subset``,
    ``eval_batch_size``, ``bn_recalibration``, ``engine``, ...).
    """
    from cdfast.data import load_data
    from cdfast.train import run_folder
    from cdfast.train.checkpoint import load_latest
    from cdfast.train.config import TrainConfig
    from cdfast.train.group import build_group
    from cdfast.train.trainer import resolve_device

    folder = run_folder.resolve_resume(run_dir)
    loaded = load_latest(folder)
    if loaded is None:
        raise FileNotFoundError(f"{folder} holds no readable checkpoint to evaluate")
    state = loaded.state
    # evaluation needs no synchronised BatchNorm (and may run where SyncBatchNorm cannot)
    cfg = dataclasses.replace(TrainConfig.from_dict(state["config"]), **{"sync_bn": False, **overrides},
                              out=None).validate()
    device = resolve_device(cfg.device)
    data = load_data(cfg.data, cfg.data_dir, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                     seed=cfg.seed, device="cpu" if cfg.data == "imagefolder" and cfg.loader == "torch" else device,
                     train_subset=cfg.train_subset, test_subset=cfg.test_subset, workers=cfg.workers,
                     image_size=cfg.image_size, skip_bad_images=cfg.skip_bad_images, loader=cfg.loader)
    group = build_group(cfg, num_classes=data.num_classes, input_shape=data.input_shape, device=device,
                        black=data.black, white=data.white)
    group.load_state_dict(state["group"])

    def prepare(x):
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

    calibration = (data.calibration(cfg.bn_recalibration * cfg.batch_size)
                   if cfg.bn_recalibration and data.calibration is not None else None)
    metrics = evaluate_group(group, data.test, prepare, device, amp=cfg.amp, calibration=calibration)
    metrics.update(epoch=state["epoch"], step=state["step"], epoch_progress=state.get("epoch_progress"),
                   test_images=data.test_size)
    return metrics, cfg
