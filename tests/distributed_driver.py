"""One rank of a small data-parallel job (gloo, loopback); used by test_distributed.

    python tests/distributed_driver.py SCENARIO OUT_DIR RANK WORLD

Scenarios (each rank writes OUT_DIR/rank-<r>.pt with what it saw):
    group       a few CompetitiveDistillation steps on this rank's shard of fixed global batches
    perturbed   the same with perturbation on: the choices and teachers must agree across ranks
    functional  competitive_ce(process_group=...) on shards whose local winners disagree
    dead-rank   rank 1 exits after one step; rank 0 keeps stepping and must get an error, not hang
    placement   one network per rank (NetworkPerRank) on the whole batch, perturbation on
    trainer-nan the trainer on real Fashion-MNIST; rank 1's batch turns NaN at its 3rd step: every rank must stop
    fit-straight / fit-stop / fit-resume
                the trainer for 2 epochs: uninterrupted; stopped by a SIGTERM that only rank 0 gets (at step 3,
                within epoch 1); resumed from that stop to the end
    fit-stop-late  as fit-stop, but rank 1 alone gets it at epoch 1's last step (a stop before the evaluation)
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import cdfast

GLOBAL_BATCH, STEPS, CLASSES = 16, 4, 5


class SmallNet(nn.Module):
    """No BatchNorm: a data-parallel step then equals one process's step on the global batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, CLASSES)

    def forward(self, x):
        f = torch.relu(self.conv(x)).flatten(1)
        return self.fc(f), f


def make_group(process_group="auto", perturb=False, mode="competitive", teachers="best", n=3):
    torch.manual_seed(0)
    nets = [SmallNet() for _ in range(n)]
    return cdfast.CompetitiveDistillation(
        nets, optimizers=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), mode=mode, teachers=teachers,
        perturb=perturb, perturb_ops=["noise", "mixup"], seed=3, process_group=process_group)


def batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    share = t.shape[0] // world
    return t[rank * share:(rank + 1) * share]


def main() -> None:
    scenario, out, rank, world = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    timeout = datetime.timedelta(seconds=10 if scenario in ("dead-rank", "trainer-nan") else 120)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=timeout)
    seen: dict = {}
    if scenario in ("group", "perturbed"):
        teachers = os.environ.get("CDFAST_TEACHERS", "best")
        group = make_group(perturb=scenario == "perturbed", teachers=teachers)
        seen["steps"] = []
        for x, y in batches():
            result = group.step(shard(x, rank, world), shard(y, rank, world))
            seen["steps"].append((int(result.teacher), result.perturbed, result.perturbation))
        seen["params"] = {k: v.detach().clone() for k, v in group.state_dict().items()}
        seen["device_seed"] = group.pool.rng.on(torch.device("cpu")).initial_seed()
    elif scenario == "functional":
        logits = torch.zeros(2, 4, 3)
        y = torch.zeros(4, dtype=torch.int64)
        # network 0 wins on rank 0's shard by a little (CE 0.24 vs 0.37), network 1 on rank 1's by a lot
        # (0.04 vs 1.10): globally network 1
        logits[0, :, 0] = 2.0 if rank == 0 else 0.0
        logits[1, :, 0] = 1.5 if rank == 0 else 4.0
        ce, teacher = cdfast.competitive_ce(logits, y, process_group="auto")
        seen.update(ce=ce, teacher=int(teacher), local=int(cdfast.elect_teacher(ce)))
    elif scenario == "placement":
        from cdfast.placement import NetworkPerRank

        teachers = os.environ.get("CDFAST_TEACHERS", "best")
        torch.manual_seed(0)
        nets = [SmallNet() for _ in range(world)]
        mine = NetworkPerRank(nets[rank], torch.optim.SGD(nets[rank].parameters(), lr=0.1, momentum=0.9),
                              teachers=teachers, perturb=True, perturb_ops=["noise", "mixup"], seed=3)
        seen["steps"] = []
        for x, y in batches():
            result = mine.step(x, y)
            seen["steps"].append((int(result.teacher), result.perturbed, result.perturbation,
                                  [round(float(v), 5) for v in result.ce]))
        seen["params"] = {k: v.detach().clone() for k, v in nets[rank].state_dict().items()}
    elif scenario == "trainer-nan":
        from cdfast.data import FASHION_MNIST_ROOT
        from cdfast.train import NonFiniteLossError, Trainer, TrainConfig

        original = cdfast.CompetitiveDistillation.step
        calls = [0]

        def step(self, x, y, *args, **kwargs):
            calls[0] += 1
            if rank == 1 and calls[0] == 3:
                x = torch.full_like(x, float("nan"))
            return original(self, x, y, *args, **kwargs)

        cdfast.CompetitiveDistillation.step = step
        cfg = TrainConfig(data_dir=str(FASHION_MNIST_ROOT), train_subset=256, test_subset=64, batch_size=32,
                          eval_batch_size=64, epochs=1, out=str(out / "run"), progress=False, tensorboard=False,
                          plots=False, device="cpu", log_interval=1, bn_recalibration=0, perturb=False)
        try:
            Trainer(cfg).fit()
        except NonFiniteLossError as e:
            seen["error"] = str(e).splitlines()[0]
    elif scenario.startswith("fit-"):
        import signal

        from cdfast.data import FASHION_MNIST_ROOT
        from cdfast.train import Trainer, TrainConfig
        from cdfast.train.metrics import StepBuffer
        from cdfast.train.trainer import TrainingStopped

        folder = out / ("straight" if scenario == "fit-straight" else "run")
        if scenario == "fit-resume":
            trainer = Trainer(resume=folder)
        else:
            trainer = Trainer(TrainConfig(
                data_dir=str(FASHION_MNIST_ROOT), train_subset=256, test_subset=64, batch_size=32, eval_batch_size=64,
                epochs=2, out=str(folder), progress=False, tensorboard=False, plots=False, device="cpu",
                log_interval=2, bn_recalibration=1, checkpoint_minutes=0))
        # fit-stop: rank 0 alone gets a SIGTERM at step 3; fit-stop-late: rank 1 alone, at epoch 1's last step
        signalled = {"fit-stop": (0, 3), "fit-stop-late": (1, 8)}.get(scenario)
        if signalled and rank == signalled[0]:
            add = StepBuffer.add

            def add_then_signal(self, step, epoch, result):
                add(self, step, epoch, result)
                if step == signalled[1]:
                    os.kill(os.getpid(), signal.SIGTERM)

            StepBuffer.add = add_then_signal
        try:
            trainer.fit()
        except TrainingStopped as e:
            seen["stopped"] = str(e)
        seen["step"] = trainer.step
        seen["params"] = {k: v.detach().clone() for k, v in trainer.group.state_dict().items()}
    elif scenario == "dead-rank":
        group = make_group()
        for k, (x, y) in enumerate(batches()):
            if k == 1 and rank == 1:
                os._exit(0)  # a rank that dies mid-run (no goodbye to the others)
            try:
                group.step(shard(x, rank, world), shard(y, rank, world))
            except RuntimeError as e:
                seen["error"] = str(e).splitlines()[0]
                break
    torch.save(seen, out / f"rank-{rank}.pt")
    if scenario not in ("dead-rank", "trainer-nan"):
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
