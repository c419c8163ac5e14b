"""Data-parallel Competitive Distillation on torch.distributed: one election for the global batch.

Every rank holds all N networks and a shard of each batch. Three things make the
method exact across ranks:

- **One election.** Each network's CE on the rank's shard is all-reduced (weighted by
  the shard's size) before the argmin, so every rank elects the same teacher from the
  global batch (:func:`global_mean`; ``competitive_ce(..., process_group=...)``).
- **One update.** After the backward, every network's gradients are averaged across
  ranks in a few flat buckets (:func:`average_gradients`, the all-reduce DDP would do,
  after the backward instead of overlapped with it; networks the caller already wrapped
  in ``DistributedDataParallel`` are left to DDP).
- **One perturbation choice.** The pool's host RNG has the same seed on every rank, so the
  perturbed network and the op agree; the op's per-sample draws come from device
  generators offset by the rank, so shards are not perturbed identically.

Gloo on the CPU and NCCL on GPUs both work; nothing here reads a device value on the host.
"""

from __future__ import annotations

import datetime
import os
from typing import Iterable, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["resolve_process_group", "local_cuda_index", "rank_and_world", "global_mean", "average_gradients", "all_reduce_sum",
           "gather_objects", "init_from_environment", "broadcast_state", "any_rank", "BUCKET_BYTES"]

BUCKET_BYTES = 64 * 2**20  # gradients are all-reduced in flat buckets of at most this size (DDP uses 25 MiB)

GroupSpec = Union[None, str, "dist.ProcessGroup"]


def init_from_environment() -> bool:
    """Join the job torchrun describes (``WORLD_SIZE`` > 1 in the environment); False when there is none.

    Gloo for CPU tensors, NCCL for CUDA ones (``cpu:gloo,cuda:nccl`` where CUDA is available; each
    rank drives GPU ``LOCAL_RANK``). A collective that waits longer than ``CDFAST_DIST_TIMEOUT``
    seconds (default 600) fails, so a rank that died stops the others instead of hanging them.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    timeout = datetime.timedelta(seconds=float(os.environ.get("CDFAST_DIST_TIMEOUT", "600")))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_cuda_index())
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return True


def local_cuda_index() -> int:
    """The GPU this process drives: ``LOCAL_RANK`` among the visible GPUs (torchrun), or, where a launcher
    shows each process only its own GPUs (Slurm's ``--gpus-per-task``, ``CUDA_VISIBLE_DEVICES`` per rank),
    ``LOCAL_RANK`` modulo their number (0 with one)."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())


def resolve_process_group(spec: GroupSpec):
    """The process group to elect and average over, or None (one process).

    ``"auto"``: the default group when torch.distributed is initialised with more than one
    rank (as under ``torchrun``), else None. ``None``: single-process behaviour even inside a
    distributed job. A ``ProcessGroup``: that group.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"process_group must be 'auto', None or a torch.distributed ProcessGroup, got {spec!r}")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("a process_group was given but torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (torchrun sets up the environment for it)")
    return spec


def rank_and_world(group) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` without one."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_mean(values: Tensor, count: int | Tensor, group) -> Tensor:
    """Per-network means over the global batch from the means over this rank's ``count`` samples.

    ``sum_r values_r * count_r / sum_r count_r``, all-reduced in one call; detached, float32.
    """
    if group is None:
        return values.detach().float()
    flat = values.detach().float().reshape(-1)
    # a host number becomes a device tensor by a fill (a kernel), not a copy: no sync
    count = (count.float().reshape(1).to(flat.device) if isinstance(count, Tensor)
             else flat.new_full((1,), float(count)))
    buf = torch.cat([flat * count, count])
    dist.all_reduce(buf, group=group)
    return (buf[:-1] / buf[-1]).view(values.shape)


def all_reduce_sum(tensors: list[Tensor], group) -> list[Tensor]:
    """The sums over ranks of ``tensors`` (float32, one all-reduce); the tensors themselves without a group."""
    if group is None:
        return tensors
    flat = torch.cat([t.float().reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def broadcast_state(modules: Iterable[torch.nn.Module], group, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank, in place (as DDP does)."""
    if group is None:
        return
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for module in modules:
            tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
            for t in tensors:
                dist.broadcast(t.data, src=src, group=group)


def any_rank(flag: bool, group, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on any rank (one small all-reduce; ``flag`` itself without a group)."""
    if group is None:
        return flag
    t = torch.full((1,), 1.0 if flag else 0.0, device=device)
    dist.all_reduce(t, group=group)
    return bool(t.item() > 0)


def gather_objects(obj, group) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a group."""
    if group is None:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def average_gradients(params: Iterable[Tensor], group, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average ``params``' gradients across the ranks of ``group``, in place.

    Every rank must pass the same parameters in the same order. A parameter without a
    gradient gets zeros first, so all ranks flatten the same list (a network's parameter
    unused on one rank's shard would otherwise shift every later bucket).
    """
    if group is None:
        return
    world = dist.get_world_size(group)
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[Tensor] = []
    size = 0
    for g in grads + [None]:  # None flushes the last bucket
        if g is not None and bucket and (size + g.numel() * g.element_size() > bucket_bytes
                                         or g.dtype != bucket[0].dtype or g.device != bucket[0].device):
            _reduce_bucket(bucket, world, group)
            bucket, size = [], 0
        if g is None:
            if bucket:
                _reduce_bucket(bucket, world, group)
            break
        bucket.append(g)
        size += g.numel() * g.element_size()


def _reduce_bucket(grads: list[Tensor], world: int, group) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
