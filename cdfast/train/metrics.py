"""Run records: per-step rows (CSV), per-epoch records (JSONL) and TensorBoard.

Per-step values come out of the training step as device tensors; they are
buffered and read in one transfer every ``log_interval`` steps, so the step
itself never waits for the host. Reading them is also where non-finite losses
are caught, before any checkpoint could store the damage.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from cdfast.algorithm import StepResult
from cdfast.safe_write import WriteError, describe, open_append
from cdfast.train.run_folder import EPOCHS_FILE, STEPS_FILE, TENSORBOARD_DIR



class NonFiniteLossError(RuntimeError):
    """A network's loss became NaN or infinite; training stopped."""


def step_columns(n: int) -> list[str]:
    return (["step", "epoch", "teacher", "perturbed", "perturbation"]
            + [f"ce_{i}" for i in range(n)] + [f"loss_{i}" for i in range(n)] + [f"train_acc_{i}" for i in range(n)])


class StepBuffer:
    """Device-side results of the last few steps, read in one host transfer."""

    def __init__(self, n: int):
        self.n = n
        self.pending: list[tuple[int, int, StepResult]] = []

    def add(self, step: int, epoch: int, result: StepResult) -> None:
        self.pending.append((step, epoch, result))

    def drain(self, names: list[str]) -> list[dict[str, Any]]:
        """Rows of the buffered steps; raises :class:`NonFiniteLossError` naming the first bad one."""
        if not self.pending:
            return []
        packed = torch.stack([
            torch.cat([r.teacher.reshape(1).float(), r.ce, r.loss, r.correct]) for _, _, r in self.pending
        ]).cpu()
        rows = []
        n = self.n
        for (step, epoch, r), values in zip(self.pending, packed.tolist()):
            ce, loss, acc = values[1:1 + n], values[1 + n:1 + 2 * n], values[1 + 2 * n:]
            bad_ce = [i for i in range(n) if not math.isfinite(ce[i])]
            bad = bad_ce or [i for i in range(n) if not math.isfinite(loss[i])]
            if bad:
                self.pending.clear()
                i = bad[0]  # a network whose own CE broke is the cause; others may follow through distillation
                others = [j for j in range(n) if j != i and not (math.isfinite(ce[j]) and math.isfinite(loss[j]))]
                also = f" (also non-finite: networks {others})" if others else ""
                raise NonFiniteLossError(
                    f"non-finite loss for network {i} ({names[i]}) at step {step} (epoch {epoch}): "
                    f"ce={ce[i]}, loss={loss[i]}{also}. Training stopped; try a lower --lr, or turn off --amp"
                )
            row = {"step": step, "epoch": epoch, "teacher": int(values[0]), "perturbed": r.perturbed,
                   "perturbation": r.perturbation or ""}
            row.update({f"ce_{i}": ce[i] for i in range(n)})
            row.update({f"loss_{i}": loss[i] for i in range(n)})
            row.update({f"train_acc_{i}": acc[i] for i in range(n)})
            rows.append(row)
        self.pending.clear()
        return rows


class RunLogger:
    """Appends to ``steps.csv`` and ``epochs.jsonl`` and writes TensorBoard events in ``out``.

    ``first_step``: the step the run continues from; TensorBoard events after it
    (from an attempt that crashed before its next checkpoint) are purged.
    """

    def __init__(self, out: Path, n: int, tensorboard: bool, first_step: int = 0):
        self.n = n
        self.steps_path, self.epochs_path = out / STEPS_FILE, out / EPOCHS_FILE
        self._steps_file = open_append(self.steps_path, newline="")
        self._steps = csv.DictWriter(self._steps_file, fieldnames=step_columns(n))
        if self._steps_file.tell() == 0:
            self._steps.writeheader()
        self.tb = None
        if tensorboard:
            tb_dir = out / TENSORBOARD_DIR
            if tb_dir.is_symlink() or (tb_dir.exists() and not tb_dir.is_dir()):
                self._steps_file.close()
                raise WriteError(0, f"{tb_dir} is a link or a file; cdfast writes TensorBoard events only into a "
                                    "folder it created (remove it, or pass --no-tensorboard)")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tb_dir), purge_step=first_step + 1 if first_step else None)
            except ImportError:
                print("cdfast: TensorBoard is not installed; no event files this run (pip install 'cdfast[viz]', "
                      "or pass --no-tensorboard)")

    def write_steps(self, rows: list[dict[str, Any]]) -> None:
        try:
            self._steps.writerows(rows)
            self._steps_file.flush()
        except OSError as e:
            raise WriteError(e.errno, describe(e, self.steps_path)) from e
        if self.tb is not None:
            for row in rows:
                for i in range(self.n):
                    self.tb.add_scalar(f"train/loss_{i}", row[f"loss_{i}"], row["step"])
                    self.tb.add_scalar(f"train/ce_{i}", row[f"ce_{i}"], row["step"])
                self.tb.add_scalar("train/teacher", row["teacher"], row["step"])

    def write_epoch(self, record: dict[str, Any]) -> None:
        """Append the epoch's record; it and the step rows are on disk before the checkpoint is written."""
        line = json.dumps(record, allow_nan=False) + "\n"  # NaN is not JSON; the trainer checks first
        try:
            with open_append(self.epochs_path) as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            os.fsync(self._steps_file.fileno())
        except WriteError:
            raise
        except OSError as e:
            raise WriteError(e.errno, describe(e, self.epochs_path)) from e
        if self.tb is not None:  # logged at the global step, so a resume's purge_step covers them too
            step = record["step"]
            for i, acc in enumerate(record["test_acc"]):
                self.tb.add_scalar(f"test/acc_{i}", acc, step)
                self.tb.add_scalar(f"teacher_share/{i}", record["teacher_share"][i], step)
            self.tb.add_scalar("test/acc_ensemble", record["ensemble_acc"], step)
            self.tb.flush()

    def sync(self) -> None:
        """Put the step rows written so far on disk (before a checkpoint that counts them)."""
        try:
            self._steps_file.flush()
            os.fsync(self._steps_file.fileno())
        except OSError as e:
            raise WriteError(e.errno, describe(e, self.steps_path)) from e
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self._steps_file.close()
        if self.tb is not None:
            self.tb.close()


class EpochMeter:
    """The running sums of one epoch's step rows: loss, CE and accuracy per network, teacher counts."""

    def __init__(self, n: int):
        self.n, self.steps = n, 0
        self.loss, self.ce, self.acc = [0.0] * n, [0.0] * n, [0.0] * n
        self.teacher = [0] * n

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.steps += 1
            self.teacher[row["teacher"]] += 1
            for i in range(self.n):
                self.loss[i] += row[f"loss_{i}"]
                self.ce[i] += row[f"ce_{i}"]
                self.acc[i] += row[f"train_acc_{i}"]

    def state_dict(self) -> dict[str, Any]:
        """The sums so far (a checkpoint within an epoch carries them)."""
        return {"steps": self.steps, "loss": list(self.loss), "ce": list(self.ce), "acc": list(self.acc),
                "teacher": list(self.teacher)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if any(len(state[k]) != self.n for k in ("loss", "ce", "acc", "teacher")):
            raise ValueError(f"the saved epoch sums are for another number of networks than {self.n}")
        self.steps = int(state["steps"])
        self.loss, self.ce, self.acc = list(state["loss"]), list(state["ce"]), list(state["acc"])
        self.teacher = list(state["teacher"])

    def postfix(self) -> str:
        """For the progress bar: mean loss and teacher share per network so far."""
        k = max(1, self.steps)
        return ("loss " + "|".join(f"{v / k:.3f}" for v in self.loss)
                + "  teacher " + "|".join(f"{100 * c / k:.0f}%" for c in self.teacher))

    def record(self) -> dict[str, list[float]]:
        """The epoch record's training part."""
        k = max(1, self.steps)
        return {"train_loss": [v / k for v in self.loss], "train_ce": [v / k for v in self.ce],
                "train_acc": [v / k for v in self.acc], "teacher_share": [c / k for c in self.teacher]}


def summarize_epochs(epochs: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's summary from its epoch records: the one place where final and best accuracy and the
    teacher share are computed (the trainer's summary, grid records and reports all use it).

    The teacher share is over all steps: each epoch's share weighted by its number of steps.
    """
    if not epochs:
        return {"epochs": 0}
    n = len(epochs[-1]["test_acc"])
    best = [max(epochs, key=lambda e: e["test_acc"][i]) for i in range(n)]
    steps = [e["step"] - prev for e, prev in zip(epochs, [0] + [e["step"] for e in epochs[:-1]])]
    total = max(1, sum(steps))
    return {
        "epochs": epochs[-1]["epoch"],
        "final_acc": epochs[-1]["test_acc"],
        "best_acc": [b["test_acc"][i] for i, b in enumerate(best)],
        "best_epoch": [b["epoch"] for b in best],
        "ensemble_acc": epochs[-1]["ensemble_acc"],
        "teacher_share": [sum(e["teacher_share"][i] * k for e, k in zip(epochs, steps)) / total for i in range(n)],
    }
