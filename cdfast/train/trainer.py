"""The training loop: data, group, schedules, evaluation, records, checkpoints and resume."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cdfast.algorithm import CompetitiveDistillation, split_output
from cdfast.data import load_data
from cdfast.models import build_model
from cdfast.train.checkpoint import load_checkpoint, save_atomic, write_text_atomic
from cdfast.train.config import STRUCTURAL_FIELDS, TrainConfig
from cdfast.train.metrics import RunLogger, StepBuffer, read_epochs, truncate_records

CHECKPOINT, CONFIG_FILE, SUMMARY_FILE = "checkpoint.pt", "config.yaml", "summary.txt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    return device


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at an iteration: linear warm-up, then cosine / step / constant."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "step":
        return cfg.lr_gamma ** sum(progress >= m for m in cfg.lr_milestones)
    return 1.0


def check_resumable(saved: dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, now {getattr(cfg, k)!r}"
             for k in STRUCTURAL_FIELDS if saved.get(k) != getattr(cfg, k)]
    if diffs:
        raise ValueError(f"checkpoint {path} does not match the requested run ({'; '.join(diffs)}); "
                         "resume with the run's own settings or start a new run in another --out folder")


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it.

    ``resume``: a run folder (or its checkpoint file) to continue exactly where
    its last checkpoint left off.
    """

    def __init__(self, cfg: TrainConfig, resume: str | Path | None = None):
        self.cfg = cfg.validate()
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out, checkpoint = self._prepare_out(resume)

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        data_device = self.device if cfg.data != "imagefolder" else "cpu"
        self.data = load_data(
            cfg.data, cfg.data_dir, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
            seed=cfg.seed, device=data_device, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
            workers=cfg.workers, image_size=cfg.image_size,
        )
        self.names = list(cfg.models)
        memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        networks = [build_model(name, self.data.num_classes, self.data.input_shape[0], cfg.features)
                    .to(self.device, memory_format=memory_format) for name in cfg.models]
        self.group = CompetitiveDistillation(
            networks,
            optimizers=lambda params: torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                weight_decay=cfg.weight_decay, fused=True if cfg.fused_sgd else None),
            mode=cfg.mode, teachers=cfg.teachers, alpha=cfg.alpha, beta=cfg.beta,
            temperature=cfg.temperature, feature_loss=cfg.feature_loss, perturb=cfg.perturb,
            perturb_prob=cfg.perturb_prob, perturb_ops=cfg.perturb_ops, seed=cfg.seed,
            perturb_bn_stats=cfg.perturb_bn_stats,
            input_shape=self.data.input_shape, autocast_dtype=torch.bfloat16 if cfg.amp else None,
            channels_last=cfg.channels_last, engine=cfg.engine,
            compile=({"mode": cfg.compile_mode} if cfg.compile_mode else cfg.compile),
        ).to(self.device)
        self.steps_per_epoch = len(self.data.train)
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s, self.steps_per_epoch))
            for opt in self.group.optimizers
        ]
        self.epoch, self.step = 0, 0
        self.teacher_counts = [0] * self.group.n
        if checkpoint is not None:
            self._load(checkpoint)
        else:
            cfg.save(self.out / CONFIG_FILE)

    # ---- output folder, checkpoints ---------------------------------------------
    def _prepare_out(self, resume) -> tuple[Path, dict | None]:
        cfg = self.cfg
        if resume is not None:
            resume = Path(resume)
            out = resume.parent if resume.is_file() else resume
            state = load_checkpoint(resume if resume.is_file() else out / CHECKPOINT)
            check_resumable(state["config"], cfg, out)
            return out, state
        out = Path(cfg.out or f"runs/{cfg.data}-{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (out / CHECKPOINT).exists() or (out / "epochs.jsonl").exists():
            raise FileExistsError(f"{out} already holds a run; continue it with --resume {out}, "
                                  "or pass another --out folder (nothing there was touched)")
        out.mkdir(parents=True, exist_ok=True)
        return out, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "group": self.group.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.group.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "pool": self.group.pool.state_dict(),
            "train_loader": self.data.train.state_dict(),
            "teacher_counts": self.teacher_counts,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
            },
        }

    def _load(self, state: dict[str, Any]) -> None:
        try:
            self.group.load_state_dict(state["group"])
            for opt, s in zip(self.group.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(s)
            for sched, s in zip(self.schedulers, state["schedulers"], strict=True):
                sched.load_state_dict(s)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"the checkpoint in {self.out} does not fit this group of networks: {e}") from e
        self.group.pool.load_state_dict(state["pool"])
        self.data.train.load_state_dict(state["train_loader"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.teacher_counts = list(state["teacher_counts"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        random.setstate(state["rng"]["python"])
        truncate_records(self.out, self.step, self.epoch)
        self.cfg.save(self.out / CONFIG_FILE)

    def save_checkpoint(self) -> Path:
        path = self.out / CHECKPOINT
        save_atomic(self.state_dict(), path)
        return path

    # ---- evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Test accuracy and loss of every network and of the ensemble (mean of softmax)."""
        group, n = self.group, self.group.n
        group.eval()
        correct = torch.zeros(n + 1, device=self.device)
        loss_sum = torch.zeros(n, device=self.device)
        seen = 0
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp)
        for x, y in self.data.test:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = torch.stack([split_output(i, net(x))[0] for i, net in enumerate(group.networks)]).float()
            probs = logits.softmax(-1)
            preds = torch.cat([logits.argmax(-1), probs.mean(0).argmax(-1).unsqueeze(0)])  # [n + 1, B]
            correct += (preds == y).sum(-1)
            loss_sum += torch.nn.functional.cross_entropy(logits.transpose(1, 2), y.expand(n, -1), reduction="none").sum(-1)
            seen += y.shape[0]
        group.train()
        acc = (correct / seen).tolist()
        return {"test_acc": acc[:n], "ensemble_acc": acc[n], "test_loss": (loss_sum / seen).tolist()}

    # ---- training -----------------------------------------------------------------
    def fit(self, until_epoch: int | None = None) -> dict[str, Any]:
        """Train up to ``cfg.epochs`` (or stop early after ``until_epoch``); returns the summary."""
        cfg, group = self.cfg, self.group
        last = min(cfg.epochs, until_epoch or cfg.epochs)
        buffer = StepBuffer(group.n)
        self.logger = RunLogger(self.out, group.n, cfg.tensorboard)
        try:
            while self.epoch < last:
                epoch = self.epoch + 1
                t0 = time.perf_counter()
                sums = {"loss": [0.0] * group.n, "ce": [0.0] * group.n, "acc": [0.0] * group.n}
                epoch_teacher = [0] * group.n
                bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                           disable=not cfg.progress, leave=True, dynamic_ncols=True)
                for k, (x, y) in enumerate(self.data.train):
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                    result = group.step(x, y)
                    for sched in self.schedulers:
                        sched.step()
                    self.step += 1
                    buffer.add(self.step, epoch, result)
                    if len(buffer.pending) >= cfg.log_interval or k == self.steps_per_epoch - 1:
                        rows = buffer.drain(self.names)
                        self.logger.write_steps(rows)
                        for row in rows:
                            epoch_teacher[row["teacher"]] += 1
                            for i in range(group.n):
                                sums["loss"][i] += row[f"loss_{i}"]
                                sums["ce"][i] += row[f"ce_{i}"]
                                sums["acc"][i] += row[f"train_acc_{i}"]
                        done = k + 1
                        bar.set_postfix_str(
                            "loss " + "|".join(f"{s / done:.3f}" for s in sums["loss"])
                            + "  teacher " + "|".join(f"{100 * c / done:.0f}%" for c in epoch_teacher))
                    bar.update(1)
                bar.close()
                train_time = time.perf_counter() - t0
                metrics = self.evaluate()
                for i in range(group.n):
                    self.teacher_counts[i] += epoch_teacher[i]
                steps = self.steps_per_epoch
                record = {
                    "epoch": epoch, "step": self.step,
                    "lr": self.schedulers[0].get_last_lr()[0],
                    "train_loss": [s / steps for s in sums["loss"]],
                    "train_ce": [s / steps for s in sums["ce"]],
                    "train_acc": [s / steps for s in sums["acc"]],
                    "teacher_share": [c / steps for c in epoch_teacher],
                    **metrics,
                    "train_seconds": train_time,
                    "images_per_second": steps * cfg.batch_size / train_time,
                }
                self.epoch = epoch
                self.logger.write_epoch(record)
                self.save_checkpoint()
                self._print_epoch(record)
        finally:
            self.logger.close()
        return self.finish() if self.epoch >= cfg.epochs else self.summary()

    def _print_epoch(self, r: dict[str, Any]) -> None:
        accs = "  ".join(f"net{i} {100 * a:.2f}%" for i, a in enumerate(r["test_acc"]))
        share = "|".join(f"{100 * s:.0f}%" for s in r["teacher_share"])
        tqdm.write(f"epoch {r['epoch']}: test acc {accs}  ensemble {100 * r['ensemble_acc']:.2f}%  "
                   f"teacher share {share}  ({r['images_per_second']:.0f} img/s per network)")

    # ---- the end ------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        epochs = read_epochs(self.out)
        if not epochs:
            return {"epochs": 0}
        final = epochs[-1]
        best = [max(epochs, key=lambda e: e["test_acc"][i]) for i in range(self.group.n)]
        total = max(1, sum(self.teacher_counts))
        return {
            "epochs": final["epoch"],
            "final_acc": final["test_acc"],
            "best_acc": [b["test_acc"][i] for i, b in enumerate(best)],
            "best_epoch": [b["epoch"] for b in best],
            "ensemble_acc": final["ensemble_acc"],
            "teacher_share": [c / total for c in self.teacher_counts],
        }

    def summary_table(self, s: dict[str, Any]) -> str:
        lines = [f"{'network':<10}{'model':<22}{'final acc':>10}{'best acc (epoch)':>19}{'teacher share':>15}"]
        for i, name in enumerate(self.names):
            lines.append(f"{'net ' + str(i):<10}{name:<22}{100 * s['final_acc'][i]:>9.2f}%"
                         f"{100 * s['best_acc'][i]:>12.2f}% ({s['best_epoch'][i]:>2})"
                         f"{100 * s['teacher_share'][i]:>14.1f}%")
        lines.append(f"{'ensemble':<10}{'mean of softmax':<22}{100 * s['ensemble_acc']:>9.2f}%")
        return "\n".join(lines)

    def finish(self) -> dict[str, Any]:
        s = self.summary()
        table = self.summary_table(s)
        write_text_atomic(table + "\n", self.out / SUMMARY_FILE)
        if self.cfg.plots:
            from cdfast.train.plots import plot_run

            plot_run(self.out, self.names)
        return s
