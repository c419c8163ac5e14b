"""Runs (or resumes) a tiny training run and SIGKILLs itself at a chosen point; used by test_fault_injection.

    python tests/fault_driver.py CONFIG_JSON RUN_DIR [--resume] [--kill POINT:N] [--weights OUT.pt]

POINT (the N-th time it is reached in this process):
    step            inside a training step (before its row is written)
    steps-row       halfway through writing a steps.csv row
    epoch-record    right after an epochs.jsonl record is appended (before the checkpoint)
    ckpt-write      halfway through writing a checkpoint's bytes
    ckpt-rotate     after the latest checkpoint became the previous one, before the new one is in place
    records-rewrite after a resume rewrote one record file to its checkpoint, before the next
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch

from cdfast import CompetitiveDistillation
from cdfast.train import Trainer, TrainConfig, checkpoint, run_folder
from cdfast.train.metrics import RunLogger


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, n: int) -> None:
    """Patch the code so the process kills itself the n-th time ``point`` is reached."""
    count = {"hits": 0}

    def hit() -> bool:
        count["hits"] += 1
        return count["hits"] == n

    if point == "step":
        original = CompetitiveDistillation.step

        def step(self, x, y, *args, **kwargs):
            if hit():
                die()
            return original(self, x, y, *args, **kwargs)
        CompetitiveDistillation.step = step
    elif point == "steps-row":
        original = RunLogger.write_steps

        def write_steps(self, rows):
            if hit():
                self._steps_file.write(",".join(str(v) for v in rows[0].values())[:7])
                self._steps_file.flush()
                die()
            return original(self, rows)
        RunLogger.write_steps = write_steps
    elif point == "epoch-record":
        original = RunLogger.write_epoch

        def write_epoch(self, record):
            original(self, record)
            if hit():
                die()
        RunLogger.write_epoch = write_epoch
    elif point == "ckpt-write":
        original = checkpoint.atomic_write

        def atomic_write(path, content):
            if hit():
                fd, _ = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=Path(path).parent)
                os.write(fd, content[: len(content) // 2])
                os.fsync(fd)
                die()
            return original(path, content)
        checkpoint.atomic_write = atomic_write
    elif point == "ckpt-rotate":
        original = checkpoint._keep_as_previous

        def keep(latest, prev):
            original(latest, prev)
            if hit():
                die()
        checkpoint._keep_as_previous = keep
    elif point == "records-rewrite":
        original = run_folder.atomic_write

        def rewrite(path, content):
            original(path, content)
            if Path(path).name in ("steps.csv", "epochs.jsonl") and hit():
                die()
        run_folder.atomic_write = rewrite
    else:
        raise SystemExit(f"unknown kill point {point}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill")
    parser.add_argument("--weights")
    args = parser.parse_args()
    if args.kill:
        point, n = args.kill.split(":")
        arm(point, int(n))
    if args.resume:
        trainer = Trainer(resume=args.run_dir)
    else:
        trainer = Trainer(TrainConfig(**json.loads(args.config), out=args.run_dir))
    trainer.fit()
    if args.weights:
        torch.save(trainer.group.state_dict(), args.weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
