"""The training loop: data, group, schedules, evaluation, records, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cdfast.distributed import (any_rank, broadcast_state, gather_objects, local_cuda_index, rank_and_world,
                                resolve_process_group)
from cdfast.data import BadImageError, load_data
from cdfast.safe_write import WriteError, atomic_write, fsync_dir
from cdfast.train import run_folder
from cdfast.train.checkpoint import CHECKPOINT, PREV_CHECKPOINT, load_checkpoint, load_latest, save_checkpoint, set_aside
from cdfast.train.config import RESUME_FIXED, RESUME_FREE, TrainConfig, upgrade_legacy_keys
from cdfast.train.evaluate import EvaluationInterrupted, evaluate_group
from cdfast.train.group import build_group, sgd_options
from cdfast.train.metrics import EpochMeter, NonFiniteLossError, RunLogger, StepBuffer, summarize_epochs
from cdfast.train.run_folder import CONFIG_FILE, SUMMARY_FILE, RunFolderError, read_epochs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but Apple's MPS backend is not available here; use --device cpu")
    return device


def portable_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with hyper-parameters as numbers: a graph engine keeps the learning
    rate as a device tensor, and a checkpoint must load on any device (and with weights_only)."""
    state = opt.state_dict()
    for group in state["param_groups"]:
        for key in ("lr", "initial_lr"):
            if isinstance(group.get(key), torch.Tensor):
                group[key] = float(group[key])
    return state


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


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The settings that would change the run's trajectory: ``{name: (saved value, new value)}``."""
    saved = upgrade_legacy_keys(saved)
    before = dataclasses.replace(TrainConfig(), **{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    return {f.name: (getattr(before, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(TrainConfig)
            if f.name not in RESUME_FREE and getattr(before, f.name) != getattr(cfg, f.name)}


class ResumeChangeError(ValueError):
    """A resume would change settings that change the training; ``changes`` lists them."""

    def __init__(self, changes: dict[str, tuple[Any, Any]], message: str):
        super().__init__(message)
        self.changes = changes


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


class TrainingStopped(Exception):
    """SIGTERM or SIGINT asked the run to stop: it stopped at a step boundary, after its checkpoint."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))


def evaluation_pending(progress: dict[str, Any] | None) -> bool:
    """Whether a checkpoint's epoch progress is a trained epoch whose evaluation is left to the resume
    (a stop after the epoch's last metric read or during its evaluation)."""
    return bool(progress) and bool(progress.get("evaluation_pending"))


def position(epoch: int, step: int, progress: dict[str, Any] | None = None, steps_per_epoch: int | None = None) -> str:
    """Where a checkpoint stands, in words: 'epoch 3, step 1404' (the end of epoch 3),
    'epoch 4 after batch 120 of 468, step 1524' (within epoch 4) or 'epoch 4 after its last
    batch, before its evaluation, step 1872' (a stop that came as epoch 4's training ended)."""
    if not progress:
        return f"epoch {epoch}, step {step}"
    if evaluation_pending(progress):
        return f"epoch {epoch + 1} after its last batch, before its evaluation, step {step}"
    of = f" of {steps_per_epoch}" if steps_per_epoch else ""
    return f"epoch {epoch + 1} after batch {progress['batches']}{of}, step {step}"


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it.

    ``resume``: a run folder (or its checkpoint file) to continue exactly where its
    last checkpoint left off (a folder with no checkpoint yet starts again from step 0).
    With ``resume``, ``cfg`` may be None: the run's own settings are used, updated by
    ``overrides``. Checkpoints come at every epoch's end and every ``checkpoint_minutes``
    within an epoch; SIGTERM or SIGINT during :meth:`fit` stops the run
    at the next metric read (within ``log_interval`` steps) after a checkpoint there,
    or as the epoch's training ends or during its evaluation (one process), with a checkpoint
    that leaves the evaluation to the resume (:class:`TrainingStopped`). A resume may change only how the run executes and reports
    (:data:`~cdfast.train.config.RESUME_FREE`); any setting that changes the training
    trajectory is refused unless ``allow_changes``, which applies it for real from the
    resumed step on (optimizer hyper-parameters included) and records it in
    ``changes.jsonl``. What the checkpoint holds (models, data, seed, batch size, ...)
    never changes.
    """

    def __init__(self, cfg: TrainConfig | None = None, resume: str | Path | None = None, *,
                 overrides: dict[str, Any] | None = None, allow_changes: bool = False):
        self.lock = None
        self._resumed_file: Path | None = None  # a checkpoint file named by --resume
        # Data parallel (torch.distributed initialised with several ranks, e.g. under torchrun): every rank
        # trains on its shard; rank 0 alone owns the run folder, the others write into a scratch folder
        # that is removed at the end, so every code path is the same on every rank.
        self.process_group = resolve_process_group("auto")
        self.rank, self.world = rank_and_world(self.process_group)
        self.is_main = self.rank == 0
        self._scratch: Path | None = None
        state = self._agree_on_opening(lambda: self._open_folder(cfg, resume, overrides or {}, allow_changes))
        try:
            self._build()
            if state is not None:
                self._load(state)
            elif resume is not None:
                run_folder.reset_records(self.out)  # no checkpoint yet: the run starts again from step 0
            # Only now, with everything built and loaded, is the folder brought up to date.
            run_folder.mark(self.out)
            for path in self.corrupt if self.is_main else []:  # rank 0 alone touches the run folder
                print(f"cdfast: set the unreadable {path.name} aside as {set_aside(path, 'corrupt').name}")
            self.cfg.save(self.out / CONFIG_FILE)
            run_folder.write_changes(self.out, self.changes)
        except BaseException:
            self.close()
            raise

    # ---- the run folder: a new run, or the same run resumed ---------------------------
    def _open_folder(self, cfg, resume, overrides, allow_changes) -> dict[str, Any] | None:
        """Validate the settings, claim and lock the folder, load the checkpoint: the state to resume or None."""
        self.corrupt: list[Path] = []
        if resume is None:
            cfg = dataclasses.replace(cfg or TrainConfig(), **overrides)
            self.cfg = cfg.validate()
            self.device = self._rank_device(resolve_device(cfg.device))
            self.changes, self.epoch, self.step, self.saved_at = [], 0, 0, None
            self._epoch_progress = None
            if not self.is_main:
                self.run_dir = Path(self._from_rank0(None))
                self.out = self._scratch_folder()
                return None
            try:
                self.out = Path(cfg.out) if cfg.out else run_folder.new_run_folder(
                    f"runs/{cfg.data}-{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}")
                self.lock, restarted = run_folder.claim_new(self.out)
            except BaseException as e:
                self._from_rank0(f"error: {e}")  # the other ranks stop with it instead of waiting
                raise
            self.run_dir = Path(self._from_rank0(str(self.out)))
            if restarted:
                print(f"cdfast: {self.out} held a run that stopped before its first checkpoint; starting it again")
            self.changes, self.epoch, self.step, self.saved_at = [], 0, 0, None
            self._epoch_progress = None
            return None
        folder = run_folder.resolve_resume(resume)
        self.run_dir = folder
        self.lock = run_folder.lock_folder(folder) if self.is_main else None  # the others only read it
        try:
            out = overrides.get("out")
            if out and Path(out).resolve() != folder.resolve():
                raise ValueError(f"--out {out} with --resume {resume}: a resumed run continues in its own folder "
                                 f"({folder}). To branch it off, copy that folder and resume the copy")
            self._resumed_file = Path(resume) if Path(resume).is_file() else None
            if self._resumed_file is not None:  # a checkpoint named explicitly: that one, no fallback
                state = load_checkpoint(resume)
            else:
                loaded = load_latest(folder)
                state = loaded.state if loaded else None
                self.corrupt = loaded.corrupt if loaded else []
            if state is None and self.is_main:  # the run starts again from step 0: only if that loses nothing
                run_folder.check_restartable(folder)
            saved = state["config"] if state else self._saved_config(folder)
            base = cfg if cfg is not None else TrainConfig.from_dict(saved)
            self.cfg = dataclasses.replace(base, **{**overrides, "out": str(folder)}).validate()
            self.device = self._rank_device(resolve_device(self.cfg.device))
            self.out = folder
            self.changes = list(state.get("changes", [])) if state else []
            self.epoch, self.step = (state["epoch"], state["step"]) if state else (0, 0)
            # how far a checkpoint saved within an epoch had got into epoch + 1
            self._epoch_progress = state.get("epoch_progress") if state else None
            # (epoch, step, progress within the next epoch) of the checkpoint on disk
            self.saved_at = (self.epoch, self.step, self._epoch_progress) if state else None
            self._check_changes(saved, state is not None, allow_changes, state.get("device_type") if state else None)
            if state is not None and state.get("torch_version", torch.__version__) != torch.__version__ and self.is_main:
                print(f"cdfast: warning: {folder} was trained under torch {state['torch_version']} and resumes under "
                      f"{torch.__version__}: the run goes on, but not bit for bit as it would have")
            if state is not None and not allow_changes and self.is_main:
                self._warn_if_config_file_differs(saved)
            if state is not None and state.get("world_size", 1) != self.world:
                raise ValueError(f"{folder} was trained by {state.get('world_size', 1)} process(es), and this resume "
                                 f"runs {self.world}: the batch shards and the perturbations' per-rank draws would "
                                 f"differ. Resume with {state.get('world_size', 1)} (torchrun --nproc_per_node="
                                 f"{state.get('world_size', 1)}), or start a new run in another --out folder")
            if not self.is_main:
                self.out = self._scratch_folder()
        except BaseException:
            self.close()
            raise
        return state

    @staticmethod
    def _saved_config(folder: Path) -> dict[str, Any]:
        """Settings of a run that has no checkpoint yet (it starts again from step 0)."""
        if not (folder / CONFIG_FILE).is_file():
            raise RunFolderError(
                f"{folder} holds no checkpoint and no {CONFIG_FILE}: the run stopped before it began. Start it "
                f"again with `cdfast train --out {folder}` and its settings (a folder without a checkpoint is accepted)")
        return TrainConfig.from_yaml(folder / CONFIG_FILE).to_dict()

    def _check_changes(self, saved: dict[str, Any], has_state: bool, allow: bool,
                       saved_device: str | None = None) -> None:
        folder = self.out
        changes = config_changes(saved, self.cfg)
        if saved_device and saved_device != self.device.type and "device" not in changes:
            # the same setting (e.g. auto) resolved to another kind of device: other random draws, other kernels
            changes["device"] = (f"{saved.get('device')}, ran on {saved_device}", f"{self.cfg.device}, now {self.device.type}")
        if not changes:
            return
        fixed = {k: v for k, v in changes.items() if k in RESUME_FIXED}
        if fixed and has_state:
            raise ValueError(f"cannot resume {folder} with other {', '.join(fixed)} ({_listed(fixed)}): its "
                             "checkpoint holds networks and data order made with the saved values; start a new run "
                             "in another --out folder instead")
        if not allow:
            raise ResumeChangeError(
                changes,
                f"resuming {folder} with these flags would change the run: {_listed(changes)}. Resume without "
                "them to continue the same run, pass --resume-with-changes to apply them from step "
                f"{self.step + 1} on (recorded in {run_folder.CHANGES_FILE}), or start a new run in another --out folder")
        # a checkpoint that leaves only its epoch's evaluation to do has trained that epoch too
        trained = self.epoch + (1 if evaluation_pending(self._epoch_progress) else 0)
        if self.cfg.epochs < trained:
            raise ValueError(f"epochs={self.cfg.epochs} is below the {trained} epochs {folder} has already trained")
        if has_state and self.cfg.epochs == trained:
            raise ValueError(f"{folder} has trained all {trained} epochs: nothing is left to train with the "
                             f"changed settings (to train longer, pass --epochs N > {trained} with them)")
        self.changes.append({"first_step": self.step + 1, "epoch": trained + 1,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}})
        print(f"cdfast: from step {self.step + 1} on: {_listed(changes)} (recorded in {run_folder.CHANGES_FILE})")

    def _warn_if_config_file_differs(self, saved: dict[str, Any]) -> None:
        """A --resume-with-changes that never reached a checkpoint leaves config.yaml ahead of it: say so."""
        try:
            written = TrainConfig.from_yaml(self.out / CONFIG_FILE)
        except (OSError, ValueError, TypeError):
            return
        lost = config_changes(saved, written)
        if lost:
            print(f"cdfast: warning: {self.out / CONFIG_FILE} holds settings its checkpoint does not ({_listed(lost)}): "
                  "a --resume-with-changes that never reached a checkpoint, or an edit. Continuing with the "
                  "checkpoint's settings; pass the changes again with --resume-with-changes to apply them")

    def close(self) -> None:
        """Release the run folder (also done at the end of :meth:`fit`)."""
        run_folder.unlock_folder(self.lock)
        self.lock = None

    def _agree_on_opening(self, open_folder):
        """Open the run folder on every rank; data parallel: all ranks stop if any could not, and they must
        have loaded the same checkpoint (the run folder must be the same folder on every node)."""
        try:
            state = open_folder()
            status = ("ok", state["step"] if state else 0)
        except BaseException as e:
            if self.world == 1:
                raise
            status, error = ("error", f"{type(e).__name__}: {e}"), e
            gather_objects(status, self.process_group)
            raise error
        if self.world == 1:
            return state
        statuses = gather_objects(status, self.process_group)
        failed = [(k, why) for k, (kind, why) in enumerate(statuses) if kind == "error"]
        if failed:
            self.close()
            raise RuntimeError(f"rank {failed[0][0]} could not open the run: {failed[0][1]}")
        if len({step for _, step in statuses}) > 1:
            self.close()
            raise RuntimeError(f"the ranks loaded checkpoints of different steps {[step for _, step in statuses]}: "
                               "every node must see the same run folder (a shared filesystem)")
        return state

    def _from_rank0(self, value: str | None) -> str:
        """Rank 0's ``value`` on every rank (a run folder's path, or ``"error: ..."`` when it could not open one)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(self.process_group, 0),
                                                group=self.process_group)
        if box[0].startswith("error: "):
            raise RuntimeError(f"rank 0 could not open the run folder: {box[0][len('error: '):]}")
        return box[0]

    def _scratch_folder(self) -> Path:
        """Where a rank other than 0 writes what rank 0 writes into the run folder (removed at the end)."""
        self._scratch = Path(tempfile.mkdtemp(prefix=f"cdfast-rank{self.rank}-"))
        weakref.finalize(self, shutil.rmtree, self._scratch, ignore_errors=True)  # also at interpreter exit
        return self._scratch

    def _rank_device(self, device: torch.device) -> torch.device:
        """Under torchrun each rank drives its own GPU: cuda means cuda:LOCAL_RANK."""
        if device.type == "cuda":
            # fixed batch shapes: let cuDNN time its algorithms once per shape (a short last batch adds
            # one more), as every CNN training script does; its default picks by heuristics
            torch.backends.cudnn.benchmark = True
        if self.world > 1 and device.type == "cuda":
            return torch.device("cuda", local_cuda_index() if "LOCAL_RANK" in os.environ
                                else self.rank % torch.cuda.device_count())
        return device

    def __del__(self):
        self.close()

    def _build(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.world > 1 and cfg.skip_bad_images:
            raise ValueError("--skip-bad-images is not available with several processes yet (a rank whose share "
                             "of a batch is unreadable would fall a step behind the others); fix or remove the "
                             "images, or train in one process")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        # the torch loader reads image folders on the host (DataLoader workers); everything else on the run's device
        data_device = "cpu" if cfg.data == "imagefolder" and cfg.loader == "torch" else self.device
        self.data = load_data(
            cfg.data, cfg.data_dir, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
            seed=cfg.seed, device=data_device, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
            workers=cfg.workers, image_size=cfg.image_size, skip_bad_images=cfg.skip_bad_images,
            loader=cfg.loader, perturb_ops=cfg.perturb_op_names() if cfg.perturbs else (),
            rank=self.rank, world=self.world,
        )
        self.names = list(cfg.models)
        self.group = build_group(cfg, num_classes=self.data.num_classes, input_shape=self.data.input_shape,
                                 device=self.device, black=self.data.black, white=self.data.white)
        if self.rank > 0:  # the same networks on every rank (built above), each rank's own random stream from here
            torch.manual_seed(cfg.seed + 1_000_003 * self.rank)
            random.seed(cfg.seed + 1_000_003 * self.rank)
        self.steps_per_epoch = len(self.data.train)
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s, self.steps_per_epoch))
            for opt in self.group.optimizers
        ]
        self._engine_reported = False
        self._calibration = None  # clean training batches for BatchNorm recalibration, made at first use

    def _apply_hyperparameters(self) -> None:
        """Optimizer and schedule settings from the config, also over what a checkpoint restored.

        ``Optimizer.load_state_dict`` brings back the saved hyper-parameters; a resume that
        changed them (--resume-with-changes) must really use the new ones.
        """
        options = sgd_options(self.cfg, self.device)
        factor = lr_factor(self.cfg, self.step, self.steps_per_epoch)
        for opt, sched in zip(self.group.optimizers, self.schedulers, strict=True):
            sched.base_lrs = [self.cfg.lr] * len(opt.param_groups)
            for group in opt.param_groups:
                group.update(options, initial_lr=self.cfg.lr, lr=self.cfg.lr * factor)

    # ---- output folder, checkpoints ---------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        pool, rng = self.group.pool.state_dict(), self._rng_state()  # this rank's, read once
        return {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "group": self.group.state_dict(),
            "optimizers": [portable_optimizer_state(opt) for opt in self.group.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "pool": pool,
            "pool_ranks": gather_objects(pool, self.process_group),
            "world_size": self.world,
            "model_io": {"num_classes": self.data.num_classes, "input_shape": list(self.data.input_shape)},
            "train_loader": self.data.train.state_dict(),
            "changes": self.changes,
            "device_type": self.device.type,  # what device=auto resolved to: a resume elsewhere is a change
            "torch_version": str(torch.__version__),  # a plain str: TorchVersion would not load with weights_only
            "rng": rng,  # rank 0's (and the one of a single process)
            "rng_ranks": gather_objects(rng, self.process_group),
        }

    def _cuda_index(self) -> int | None:
        """The index of the run's GPU, or None for a run on another device."""
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _rng_state(self) -> dict[str, Any]:
        # only the run's own GPU: a run resumed where fewer GPUs are visible (CUDA_VISIBLE_DEVICES) still loads
        index = self._cuda_index()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(index) if index is not None else None,
            "python": random.getstate(),
        }

    def _set_cuda_rng_state(self, saved) -> None:
        index = self._cuda_index()
        if isinstance(saved, (list, tuple)):  # checkpoints before 2026-11-27 hold every visible GPU's state
            saved = saved[index] if index is not None and index < len(saved) else None
        if saved is not None and index is not None:
            torch.cuda.set_rng_state(saved, index)

    def _load(self, state: dict[str, Any]) -> None:
        saved_keys, keys = set(state["group"]), set(self.group.state_dict())
        if saved_keys != keys and {k.split(".")[0] for k in saved_keys ^ keys} == {"adapters"}:
            raise ValueError(
                f"the checkpoint in {self.out} was trained {'with' if any(k.startswith('adapters') for k in saved_keys) else 'without'}"
                " feature adapters, and these settings (feature_loss, beta, mode) would build the group "
                f"{'without' if any(k.startswith('adapters') for k in saved_keys) else 'with'} them; a heterogeneous "
                "group cannot switch its feature loss on or off mid-run. Resume with the run's own settings, or start "
                "a new run in another --out folder")
        try:
            self.group.load_state_dict(state["group"])
            for opt, s in zip(self.group.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(s)
            for sched, s in zip(self.schedulers, state["schedulers"], strict=True):
                sched.load_state_dict(s)
            pools = state.get("pool_ranks") or [state["pool"]]
            self.group.pool.load_state_dict(pools[self.rank])
            rng = (state.get("rng_ranks") or [state["rng"]])[self.rank]
            torch.set_rng_state(rng["torch"])
            self._set_cuda_rng_state(rng.get("cuda"))
            python_state = rng["python"]
            random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"the checkpoint in {self.out} does not fit this group of networks: {e}") from e
        try:
            # within an epoch, its loader holds the position; after the epoch's last batch, the epoch's end
            within = bool(self._epoch_progress) and not evaluation_pending(self._epoch_progress)
            if within and not getattr(self.data.train, "resumes_mid_epoch", False):
                raise ValueError("it was saved within an epoch, and this run's loader resumes only at epoch starts "
                                 f"(use the loader it was trained with: {state['config'].get('loader')})")
            if ("next_batch" in state["train_loader"]) != within:
                raise ValueError("its loader's position within the epoch and the epoch's progress disagree "
                                 "(a damaged checkpoint)")
            self.data.train.load_state_dict(state["train_loader"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"the checkpoint in {self.out} does not fit this data set's loader: {e}") from e
        self._apply_hyperparameters()
        if self._resumed_file is not None and self.is_main:
            self._supersede_newer_checkpoints()
        if self.is_main and self.epoch < self.cfg.epochs:  # the run goes on: its old summary no longer holds
            (self.out / SUMMARY_FILE).unlink(missing_ok=True)
        run_folder.truncate_records(self.out, self.step, self.epoch)

    def _supersede_newer_checkpoints(self) -> None:
        """Resuming from a checkpoint named explicitly abandons what came after it, so that a later
        plain --resume, or the 'previous' checkpoint after the next save, never mixes the abandoned
        line with this one: from checkpoint.prev.pt, checkpoint.pt is set aside; from a file outside
        the rotation (a copy), both are, and the file named becomes checkpoint.pt."""
        latest, prev, named = self.out / CHECKPOINT, self.out / PREV_CHECKPOINT, self._resumed_file
        if latest.is_file() and latest.samefile(named):
            return  # the latest itself: nothing came after it
        in_rotation = prev.is_file() and prev.samefile(named)
        for path in (latest,) if in_rotation else (latest, prev):
            if path.is_file():
                print(f"cdfast: resuming from {named.name}, so {path.name} is set aside as "
                      f"{set_aside(path, 'superseded').name}")
        if not in_rotation:  # the named state becomes the run's latest (copied whole, then put in place)
            staged = latest.with_name(f".{CHECKPOINT}.copy.tmp")
            shutil.copyfile(named, staged)
            with open(staged, "rb") as f:  # on disk before it replaces anything, as save_checkpoint's staging
                os.fsync(f.fileno())
            os.replace(staged, latest)
            fsync_dir(self.out)

    def save_checkpoint(self, progress: dict[str, Any] | None = None) -> Path:
        """Checkpoint the run; ``progress``: how far into the next epoch (a checkpoint within an epoch;
        a resumed one whose epoch has not started again yet keeps its own)."""
        state = self.state_dict()  # on every rank: it gathers the ranks' perturbation streams
        progress = progress if progress is not None else self._epoch_progress
        if progress is not None:
            state["epoch_progress"] = progress
        path = save_checkpoint(state, self.out) if self.is_main else self.out
        self.saved_at = (self.epoch, self.step, progress)
        self._last_save = time.monotonic()
        return path

    def checkpoint_note(self) -> str:
        """Where the run stands on disk, for error messages: true whether or not a checkpoint exists."""
        folder = getattr(self, "run_dir", self.out)
        if self.saved_at is None:
            return (f"No checkpoint exists yet in {folder}; `cdfast train --resume {folder}` starts the run "
                    "again from step 0")
        where = position(*self.saved_at, getattr(self, "steps_per_epoch", None))
        return f"The last checkpoint ({where}) in {folder} is intact; continue with --resume {folder}"

    # ---- evaluation ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, *, stoppable: bool = False) -> dict[str, Any]:
        """Test accuracy and loss of every network and of the ensemble (mean of softmax).

        With ``bn_recalibration`` > 0 the headline numbers use BatchNorm statistics recomputed on
        that many clean training batches (the same ones every time); the numbers with the running
        statistics come along as ``*_running_stats``. Training is not affected either way.
        """
        # data parallel: BatchNorm running statistics drift apart on the ranks' shards; evaluate (and
        # checkpoint) rank 0's on every rank, as DDP would
        broadcast_state(self.group.networks, self.process_group, buffers_only=True)
        calibration = None
        if self.cfg.bn_recalibration and self.data.calibration is not None:
            if self._calibration is None:
                self._calibration = self.data.calibration(self.cfg.bn_recalibration * self.cfg.batch_size)
            calibration = self._calibration
        # ``stoppable`` (fit's evaluations), one process: a stop requested during the evaluation ends it at
        # the next test batch (EvaluationInterrupted). Data-parallel ranks hold test shards of different
        # lengths, so they could not agree on where to end: they finish it.
        interrupted = (lambda: self.stop_requested is not None) if stoppable and self.world == 1 else None
        return evaluate_group(self.group, self.data.test, self._to_device, self.device, amp=self.cfg.amp,
                              calibration=calibration, process_group=self.process_group, interrupted=interrupted)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    # ---- training -----------------------------------------------------------------
    def fit(self, until_epoch: int | None = None) -> dict[str, Any]:
        """Train up to ``cfg.epochs`` (or stop early after ``until_epoch``); returns the summary.

        A failure (non-finite loss or weights, a full disk, an unreadable image) stops the run
        with a message that says whether and where the last checkpoint is intact.
        """
        cfg = self.cfg
        last = min(cfg.epochs, until_epoch or cfg.epochs)
        if self.stop_requested:
            raise RuntimeError(f"this Trainer stopped on {self.stop_requested}; continue the run with "
                               f"Trainer(resume={str(self.run_dir)!r}).fit() (or cdfast train --resume {self.run_dir})")
        if self.lock is None:
            self.lock = run_folder.lock_folder(self.out)
        self.logger = None
        self._last_save = time.monotonic()
        handlers = self._catch_stop_signals()
        try:
            try:
                self.logger = RunLogger(self.out, self.group.n, cfg.tensorboard, first_step=self.step)
                while self.epoch < last:
                    record = self._train_epoch(self.epoch + 1)
                    self.epoch = record["epoch"]
                    self.logger.write_epoch(record)
                    self.save_checkpoint()
                    self._print_epoch(record)
                    if self.epoch < last and self._stop_agreed():
                        raise self._stopped()
                if self.world > 1 and self.stop_requested is None and self._stop_agreed():
                    self._stop_signal = "SIGTERM"  # another rank's, as the run finished: every rank says so
            except (NonFiniteLossError, BadImageError, WriteError) as e:
                message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise type(e)(f"{message}. {self.checkpoint_note()}") from e
            except torch.distributed.DistError as e:  # a rank died, or the network between them broke
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RuntimeError(
                    f"rank {self.rank} of {self.world}: a collective operation failed ({first[:300]}): another rank "
                    f"stopped or the network between the ranks broke; see the other ranks' errors. "
                    f"{self.checkpoint_note()} with the same number of processes") from e
            finally:
                if self.logger is not None:
                    self.logger.close()
            return self.finish() if self.epoch >= cfg.epochs else self.summary()
        finally:
            try:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
            finally:
                self.close()

    # ---- stopping on request: SIGTERM (a scheduler's preemption, kill) or SIGINT (Ctrl-C) ----------
    @property
    def stop_requested(self) -> str | None:
        """The signal (SIGTERM / SIGINT) that asked the last :meth:`fit` to stop, or None. A run that finished
        its last epoch anyway returns normally with this set (a grid then stops before its next run)."""
        return getattr(self, "_stop_signal", None)

    def _catch_stop_signals(self) -> dict:
        """Turn the first SIGTERM / SIGINT into a request to stop after a checkpoint. A second SIGINT (Ctrl-C
        twice) stops at once (KeyboardInterrupt); a repeated SIGTERM is ignored, since schedulers deliver it
        more than once (Slurm signals every process of a job, torchrun forwards it again) and escalate with
        SIGKILL themselves. Returns the handlers to put back (none outside the main thread)."""
        self._stop_signal: str | None = None
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_signal is not None:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt("Ctrl-C again: stopped at once")
                return
            self._stop_signal = name
            again = " (Ctrl-C again stops at once, losing the steps since the last checkpoint)" if signum == signal.SIGINT else ""
            # os.write, not print: a handler may run in the middle of a print
            os.write(2, f"\ncdfast: {name}: stopping at the next metric read (within {self.cfg.log_interval} steps), "
                        f"or before the epoch's evaluation, after a checkpoint there{again}\n".encode())

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            before = signal.signal(sig, request_stop)
            previous[sig] = before if before is not None else signal.SIG_DFL  # None: set outside Python
        return previous

    def _stop_agreed(self) -> bool:
        """Whether a stop was requested (data parallel: on any rank, so that all stop at the same step)."""
        return any_rank(self.stop_requested is not None, self.process_group, self.device)

    def _stopped(self) -> TrainingStopped:
        name = self.stop_requested
        if name is None:  # data parallel: the signal reached another rank
            self._stop_signal = "SIGTERM"
            return TrainingStopped(f"stopped: another rank got a stop signal. {self.checkpoint_note()}", "SIGTERM")
        return TrainingStopped(f"stopped on {name}. {self.checkpoint_note()}", name)

    def _checkpoint_within_epoch(self, batches: int, meter: EpochMeter, seconds: float) -> None:
        """At a metric read inside an epoch: checkpoint when ``checkpoint_minutes`` have passed or a stop
        was requested (then stop). Loaders that resume only at epoch starts skip the checkpoint."""
        minutes = self.cfg.checkpoint_minutes
        due = (self.stop_requested is not None
               or (minutes > 0 and time.monotonic() - self._last_save >= 60 * minutes))
        if not any_rank(due, self.process_group, self.device):
            return
        stopping = self._stop_agreed()
        if not getattr(self.data.train, "resumes_mid_epoch", False):
            if stopping and self.is_main:
                print(f"cdfast: this loader resumes only at epoch starts: the {batches} steps of epoch "
                      f"{self.epoch + 1} are trained again on resume")
        elif "next_batch" not in self.data.train.state_dict():
            return  # it has handed out its last batch (some were empty: unreadable images): the epoch's end saves
        else:
            self._save_epoch_progress({"batches": batches, "train_seconds": seconds, "meter": meter.state_dict()})
        self._last_save = time.monotonic()
        if stopping:
            raise self._stopped()

    def _save_epoch_progress(self, progress: dict[str, Any]) -> None:
        """Checkpoint part of an epoch (within it, or its training without the evaluation): the weights
        checked finite first, so that a diverged network is never saved as the last good one, and the
        step rows the checkpoint counts on disk before it."""
        self._on_every_rank(lambda: self._check_finite_weights(f"step {self.step} (epoch {self.epoch + 1})"))
        self.logger.sync()
        self.save_checkpoint(progress)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training data and the evaluation after it: the epoch's record."""
        cfg, group, n = self.cfg, self.group, self.group.n
        buffer = StepBuffer(n)
        meter = EpochMeter(n)
        progress, self._epoch_progress = self._epoch_progress, None  # a checkpoint saved within this epoch
        done, before = 0, 0.0  # batches and training seconds of this epoch before this attempt
        if progress:
            meter.load_state_dict(progress["meter"])
            done, before = progress["batches"], progress["train_seconds"]
        t0 = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=done, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not cfg.progress or not self.is_main, leave=True, dynamic_ncols=True)

        def seconds() -> float:  # this epoch's training time (a DALI resume's re-run batches left out)
            return before + time.perf_counter() - t0 - getattr(self.data.train, "replay_seconds", 0.0)

        def drain(last: bool = False):
            rows = self._on_every_rank(lambda: buffer.drain(self.names))
            self.logger.write_steps(rows)
            meter.add(rows)
            bar.set_postfix_str(meter.postfix())
            if not last and done < self.steps_per_epoch:  # the epoch's end has its own checkpoint
                self._checkpoint_within_epoch(done, meter, seconds())

        # resumed after the epoch's last batch (a stop came then): only its evaluation is left
        evaluation_only = evaluation_pending(progress)
        try:
            for x, y, *view in () if evaluation_only else self.data.train:  # DALI adds the perturbed view
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                result = group.step(x, y, perturbed=view[0] if view else None)
                if group.engine_choice is not None and not self._engine_reported:
                    self._engine_reported = True
                    if self.is_main:
                        bar.write(self._engine_choice_line())
                for sched in self.schedulers:
                    sched.step()
                self.step += 1
                done += 1
                buffer.add(self.step, epoch, result)
                if len(buffer.pending) >= cfg.log_interval:
                    drain()
                bar.update(1)
            drain(last=True)
        finally:
            bar.close()
        if done == 0:
            raise ValueError(f"epoch {epoch} had no training batches; the training set is smaller than one batch")
        train_time = seconds()

        def engine_name() -> str:  # the one that trained the epoch (auto: the one it chose)
            if evaluation_only and progress.get("engine"):
                return progress["engine"]
            return group.engine_spec if group.engine_spec != "auto" else group.engine.name

        def stop_before_the_evaluation():
            # The evaluation can take minutes (ImageNet, BatchNorm recalibration), beyond a scheduler's
            # grace period: checkpoint the trained epoch now and evaluate it on resume.
            self._save_epoch_progress({"batches": done, "train_seconds": train_time, "meter": meter.state_dict(),
                                       "evaluation_pending": True, "engine": engine_name()})
            return self._stopped()

        if not evaluation_only and self._stop_agreed():  # the stop came in the epoch's last steps
            raise stop_before_the_evaluation()
        try:
            metrics = self.evaluate(stoppable=True)
        except EvaluationInterrupted:  # one process, a stop during the evaluation
            raise stop_before_the_evaluation() from None
        self._check_finite(epoch, metrics)
        return {
            "epoch": epoch, "step": self.step,
            "lr": float(self.schedulers[0].get_last_lr()[0]),  # a device tensor with a graph engine
            "engine": engine_name(),
            **meter.record(),
            **metrics,
            "train_seconds": train_time,
            "images_per_second": done * cfg.batch_size / train_time,
        }

    def _engine_choice_line(self) -> str:
        choice = self.group.engine_choice
        return f"cdfast: engine auto -> {choice['engine']} (per step: {choice['timings']})"

    def _on_every_rank(self, check):
        """``check()``; data parallel: if it raised NonFiniteLossError on any rank, it raises on every rank
        (a rank that stopped alone would leave the others waiting in the next collective)."""
        try:
            result, error = check(), None
        except NonFiniteLossError as e:
            result, error = None, e
        if any_rank(error is not None, self.process_group, self.device) and error is None:
            error = NonFiniteLossError("another rank found a non-finite loss or weights (see its error); "
                                       "nothing of this step on was saved")
        if error is not None:
            raise error
        return result

    def _check_finite(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Never record NaN, never checkpoint a diverged network as the last good one."""
        self._on_every_rank(lambda: self._check_finite_here(epoch, metrics))

    def _check_finite_weights(self, when: str) -> None:
        """Never checkpoint a diverged network as the last good one."""
        for i, net in enumerate(self.group.networks):
            bad = [name for name, t in net.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
            if bad:
                raise NonFiniteLossError(
                    f"network {i} ({self.names[i]}) has non-finite weights after {when} ({', '.join(bad[:3])}"
                    f"{', ...' if len(bad) > 3 else ''}); nothing since the last checkpoint was saved. Try a lower "
                    "--lr, or turn off --amp")

    def _check_finite_here(self, epoch: int, metrics: dict[str, Any]) -> None:
        self._check_finite_weights(f"epoch {epoch}")
        values = {"test_loss": metrics["test_loss"], "test_acc": metrics["test_acc"], "ensemble_acc": [metrics["ensemble_acc"]]}
        for key, vals in values.items():
            bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
            if bad:
                raise NonFiniteLossError(f"evaluation after epoch {epoch} gave a non-finite {key} for network(s) "
                                         f"{bad}; nothing of this epoch was saved")

    def _print_epoch(self, r: dict[str, Any]) -> None:
        if not self.is_main:
            return
        accs = "  ".join(f"net{i} {100 * a:.2f}%" for i, a in enumerate(r["test_acc"]))
        share = "|".join(f"{100 * s:.0f}%" for s in r["teacher_share"])
        tqdm.write(f"epoch {r['epoch']}: test acc {accs}  ensemble {100 * r['ensemble_acc']:.2f}%  "
                   f"teacher share {share}  ({r['images_per_second']:.0f} img/s per network)")

    # ---- the end ------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return summarize_epochs(read_epochs(self.out))

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
        if not s.get("epochs"):
            return s  # no epoch records (removed by hand?): nothing to summarise
        table = self.summary_table(s)
        atomic_write(self.out / SUMMARY_FILE, table + "\n")
        if self.cfg.plots:
            from cdfast.train.plots import plot_run

            try:
                plot_run(self.out, self.names)
            except ImportError:
                print(f"cdfast: matplotlib is not installed; no plots (pip install 'cdfast[viz]'; then "
                      f"cdfast.train.plots.plot_run('{self.out}', names) draws them from the run's records)")
        return s
