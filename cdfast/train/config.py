"""The training configuration: one flat dataclass, read from YAML and overridden on the command line.

Every field documents itself (``help``), and the ``cdfast train`` flags are
generated from these fields, so the CLI, the config files and the code cannot
drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdfast.algorithm import MODES, TEACHER_RULES
from cdfast.data import DATASETS
from cdfast.engines import ENGINE_CHOICES
from cdfast.models import FEATURE_MODES, check_model_name
from cdfast.perturb import DEFAULT_OPS, OPS
from cdfast.train.checkpoint import write_text_atomic


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # data
    data: str = _f("fashion-mnist", f"data set: {', '.join(DATASETS)}", choices=DATASETS)
    data_dir: str | None = _f(None, "folder of the data set (default for fashion-mnist: /usr/share/datasets/fashion-mnist)")
    train_subset: int | None = _f(None, "train on a random subset of this many images")
    test_subset: int | None = _f(None, "evaluate on a random subset of this many images")
    image_size: int = _f(224, "crop size for imagefolder data")
    workers: int = _f(4, "DataLoader workers for imagefolder data")
    # group
    models: list[str] = _f(["resnet8", "resnet8"], "the group's networks, comma-separated (cdfast models lists them)")
    features: str = _f("pooled", "feature tensor for the L2 loss: pooled penultimate or last feature map", choices=FEATURE_MODES)
    mode: str = _f("competitive", "training mode", choices=MODES)
    teachers: str = _f("best", "competitive teacher rule: best (argmin) or all-better", choices=TEACHER_RULES)
    alpha: float = _f(1.0, "weight of the KL term")
    beta: float = _f(1.0, "weight of the feature L2 term")
    temperature: float = _f(1.0, "softmax temperature of the KL term")
    feature_loss: bool = _f(True, "add the feature L2 term to the students' losses")
    perturb: bool | None = _f(None, "mutate one random network's batch per step (default: on for competitive, off otherwise)")
    perturb_prob: float = _f(1.0, "probability of a mutation in a step")
    perturb_ops: list[str] = _f(list(DEFAULT_OPS), f"perturbation pool, comma-separated from: {', '.join(OPS)}")
    perturb_bn_stats: bool = _f(False, "let perturbed batches update the mutated network's BatchNorm running statistics")
    engine: str = _f("auto", "how the networks execute: auto (GPU: fused for identical networks, else streams; "
                     "CPU: sequential), sequential, streams, fused",
                     choices=ENGINE_CHOICES)
    compile: bool = _f(False, "torch.compile the networks' forwards (inductor; the first steps compile)")
    compile_mode: str | None = _f(None, "torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, "
                                        "max-autotune-no-cudagraphs; implies --compile")
    # optimisation
    epochs: int = _f(5, "number of epochs")
    batch_size: int = _f(128, "training batch size")
    eval_batch_size: int = _f(1000, "evaluation batch size")
    lr: float = _f(0.1, "initial learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay")
    schedule: str = _f("cosine", "learning-rate schedule, stepped every iteration", choices=("cosine", "step", "constant"))
    lr_milestones: list[float] = _f([0.5, 0.75], "step schedule: fractions of training where the lr drops")
    lr_gamma: float = _f(0.1, "step schedule: lr factor at each milestone")
    warmup_epochs: float = _f(0.0, "linear learning-rate warm-up, in epochs")
    fused_sgd: bool = _f(False, "PyTorch's fused SGD kernel (all parameters of a network in one step kernel); "
                                "default: foreach on CUDA, per-parameter on the CPU")
    # execution
    seed: int = _f(0, "random seed (models, data order, augmentation, perturbations)")
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    amp: bool = _f(False, "bf16 autocast for the forward passes")
    channels_last: bool = _f(False, "channels-last memory format for models and batches")
    threads: int | None = _f(None, "CPU threads for torch (default: torch's choice)")
    # output
    out: str | None = _f(None, "output folder (default: runs/<data>-<mode>-<time>)")
    log_interval: int = _f(20, "steps between metric reads (host syncs) and progress updates")
    tensorboard: bool = _f(True, "also write TensorBoard event files")
    plots: bool = _f(True, "write PNG plots at the end")
    progress: bool = _f(True, "show progress bars")

    def validate(self) -> "TrainConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"invalid config: {msg}")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"invalid config: {f.name}={getattr(self, f.name)!r}; choose one of {', '.join(choices)}")
        need(len(self.models) >= 2, f"a group needs at least 2 models, got {self.models}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0.0 <= self.perturb_prob <= 1.0, f"perturb_prob must lie in [0, 1], got {self.perturb_prob}")
        need(self.compile_mode in COMPILE_MODES, f"compile_mode must be one of {', '.join(map(str, COMPILE_MODES))}, "
                                                 f"got {self.compile_mode!r}")
        need(self.log_interval >= 1, f"log_interval must be >= 1, got {self.log_interval}")
        need(self.mode == "competitive" or self.teachers == "best", "teachers=all-better needs mode=competitive")
        need(all(0 < m < 1 for m in self.lr_milestones), f"lr_milestones are fractions in (0, 1), got {self.lr_milestones}")
        for name in self.models:
            check_model_name(name)
        unknown = [op for op in self.perturb_ops if op not in OPS]
        need(not unknown, f"unknown perturbation ops {unknown}; available: {', '.join(OPS)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        values = read_yaml_mapping(path, "config file")
        return cls.from_dict({k.replace("-", "_"): v for k, v in values.items()})

    def save(self, path: str | Path) -> None:
        write_text_atomic(yaml.safe_dump(self.to_dict(), sort_keys=False), path)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping, with clear errors for a missing file or another shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold a mapping of keys to values")
    return values


# Fields that define what a checkpoint holds; a resume must not change them.
STRUCTURAL_FIELDS = ("data", "models", "features", "mode", "teachers", "feature_loss", "batch_size",
                     "epochs", "schedule", "lr", "seed", "train_subset")
