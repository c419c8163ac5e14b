"""What one election for the global batch costs under data parallelism (torch.distributed).

    python bench/distributed_overhead.py [--nproc 2] [--steps 30] [--models resnet8,resnet8] [--batch 128]
                                         [--out bench/results/cpu-distributed-YYYYMMDD.json]

Launches ``--nproc`` ranks (gloo on the CPU, NCCL on GPUs; loopback rendezvous) that each train the
same group on their shard of a global batch of random Fashion-MNIST-sized images, and times, per step
(median over ``--steps`` after warm-up, rank 0's clock; every step ends in a collective, so the ranks
move in lockstep):

- ``competitive``: Competitive Distillation as cdfast runs it data-parallel: the CE all-reduce before
  the election plus the gradient all-reduce;
- ``plain_dp``: the same networks trained independently with the same gradient all-reduce and no
  election (what plain DDP of these networks costs);
- ``election_allreduce``: the election's all-reduce alone (N + 1 floats);
- ``one_process``: the competitive step on one rank's shard with no communication at all.

Bytes per step: the election sends N + 1 float32 values; the gradients all-reduce every parameter.
Not a pytest-benchmark suite: the quantity is a multi-process step, timed inside the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _time(fn, steps: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rank(rank: int, world: int, args, rendezvous: str, out: str) -> None:
    import cdfast
    from cdfast.distributed import global_mean
    from cdfast.models import build_model

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    models = args.models.split(",")
    local = args.batch // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(local, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (local,), generator=g).to(device)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()
        dist.barrier()

    def group(mode, process_group):
        torch.manual_seed(0)
        nets = [build_model(m, 10, 1).to(device) for m in models]
        return cdfast.CompetitiveDistillation(nets, mode=mode, perturb=False, process_group=process_group)

    competitive = group("competitive", "auto")
    plain = group("independent", "auto")
    alone = group("competitive", None)
    ce = torch.rand(len(models), device=device)
    result = {
        "competitive": _time(lambda: competitive.step(x, y), args.steps, sync),
        "plain_dp": _time(lambda: plain.step(x, y), args.steps, sync),
        "election_allreduce": _time(lambda: global_mean(ce, local, dist.group.WORLD), args.steps * 10, sync),
        "one_process": _time(lambda: alone.step(x, y), args.steps, lambda: torch.cuda.synchronize() if on_gpu else None),
    }
    params = sum(p.numel() for net in competitive.networks for p in net.parameters())
    if rank == 0:
        record = {
            "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
            "backend": dist.get_backend(), "world": world, "models": models, "global_batch": args.batch,
            "seconds_per_step_median": result,
            "election_bytes_per_step": 4 * (len(models) + 1),
            "gradient_bytes_per_step": 4 * params,
            "election_share_of_step": result["election_allreduce"] / result["competitive"],
            "competitive_over_plain_dp": result["competitive"] / result["plain_dp"],
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
        }
        Path(out).write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--models", default="resnet8,resnet8")
    p.add_argument("--batch", type=int, default=128, help="global batch (divided among the ranks)")
    p.add_argument("--out", default=f"bench/results/{'gpu' if torch.cuda.is_available() else 'cpu'}-distributed-"
                                     f"{time.strftime('%Y%m%d')}.json")
    args = p.parse_args(argv)
    if args.batch % args.nproc:
        p.error(f"--batch {args.batch} must be a multiple of --nproc {args.nproc}")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(args.nproc, args, os.path.join(tmp, "rendezvous"), args.out),
                           nprocs=args.nproc, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
