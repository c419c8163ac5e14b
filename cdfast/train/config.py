"""The training configuration: one flat dataclass, read from YAML and overridden on the command line.

Every field documents itself (``help``) and carries its valid range, and the
``cdfast train`` flags are generated from these fields, so the CLI, the config
files and the code cannot drift apart. :meth:`TrainConfig.validate` checks
every value's type strictly (``epochs: 1.5``, ``lr: "0.1"`` or ``perturb: "no"``
are refused, not coerced) and its range; the hyper-parameters the group shares
take their ranges from :mod:`cdfast.options`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdfast.data import DATASETS, LOADERS
from cdfast.data.dali import DALI_OPS
from cdfast.engines import ENGINE_CHOICES, split_engine_name
from cdfast.models import FEATURE_MODES, check_model_name
from cdfast.options import CHOICES, RANGES, check_choice, check_flag, check_number, check_teachers, perturbs
from cdfast.perturb import DEFAULT_OPS, OPS, PRESETS, expand_presets
from cdfast.safe_write import atomic_write

_PRESETS_HELP = ", ".join(f"{name} ({'+'.join(ops)})" for name, ops in PRESETS.items())
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
RANGE_KEYS = ("ge", "gt", "le", "lt")


def _f(default, help: str, **kw):
    """A config field: its default, its help text, and optionally ``choices`` or bounds (ge/gt/le/lt)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # data
    data: str = _f("fashion-mnist", f"data set: {', '.join(DATASETS)}", choices=DATASETS)
    data_dir: str | None = _f(None, "folder of the data set (default for fashion-mnist: /usr/share/datasets/fashion-mnist)")
    train_subset: int | None = _f(None, "train on a random subset of this many images", ge=1)
    test_subset: int | None = _f(None, "evaluate on a random subset of this many test images (the same for every seed)", ge=1)
    image_size: int = _f(224, "crop size for imagefolder data", ge=8)
    workers: int = _f(4, "DataLoader workers for imagefolder data (any number gives the same batches)", ge=0)
    loader: str = _f("torch", "input pipeline: torch (in-memory batches; a DataLoader for image folders) or dali "
                              "(NVIDIA DALI on the run's device: decoding, augmentation and the perturbed view in one "
                              f"pipeline; ops {', '.join(DALI_OPS)}; needs pip install 'cdfast[dali]')",
                     choices=LOADERS)
    skip_bad_images: bool = _f(False, "imagefolder: skip unreadable or empty images with a counted warning "
                                      "(default: stop and name the file)")
    # group
    models: list[str] = _f(["resnet8", "resnet8"], "the group's networks, comma-separated (cdfast models lists them)")
    features: str = _f("pooled", "feature tensor for the L2 loss: pooled penultimate or last feature map", choices=FEATURE_MODES)
    mode: str = _f("competitive", "who learns from whom: competitive (an elected teacher), dml (every network from "
                                  "every other), independent (labels only)", choices=CHOICES["mode"])
    teachers: str = _f("best", "competitive mode's teachers: best (the elected network teaches all) or all-better "
                               "(each network learns from every better one)", choices=CHOICES["teachers"])
    alpha: float = _f(1.0, "weight of the KL term", **RANGES["alpha"])
    beta: float = _f(1.0, "weight of the feature L2 term", **RANGES["beta"])
    temperature: float = _f(1.0, "softmax temperature of the KL term", **RANGES["temperature"])
    label_smoothing: float = _f(0.0, "label smoothing of every network's cross-entropy (as F.cross_entropy)",
                                ge=0.0, le=1.0)
    feature_loss: bool = _f(True, "add the feature L2 term to the students' losses")
    perturb: bool | None = _f(None, "perturb one random network's batch per step (default: on for competitive, off otherwise)")
    perturb_prob: float = _f(1.0, "probability of a perturbation in an eligible step", **RANGES["perturb_prob"])
    perturb_every: int = _f(1, "a perturbation is possible every this many steps (paper: 1; the authors' code: 10)",
                            **RANGES["perturb_every"])
    perturb_ops: list[str] = _f(list(DEFAULT_OPS), f"perturbation pool, comma-separated from: {', '.join(OPS)}; or a "
                                                   f"preset: {_PRESETS_HELP}")
    perturbed_bn: str = _f("frozen", "the perturbed network's BatchNorm statistics: frozen (untouched by the perturbed "
                                     "batch), updated by it, or clean (updated by a no-grad forward of the clean batch)",
                           choices=CHOICES["perturbed_bn"])
    matched_inputs: bool = _f(False, "distil each student towards the teacher's output on the student's own input "
                                     "(one extra no-grad forward per network in perturbed steps)")
    election: str = _f("ce", "who teaches: ce (lowest cross-entropy, the paper) or clean-equivalent (a mixed-label "
                             "CE minus the entropy of its label mix)", choices=CHOICES["election"])
    engine: str = _f("auto", "how the networks execute: auto (GPU: every engine that can run the group is "
                     "timed on the first batch and the fastest kept; CPU: sequential), sequential, streams, fused; graph or fused+graph capture the whole step in "
                     "CUDA graphs (fused SGD; eager on the CPU)",
                     choices=ENGINE_CHOICES)
    sync_bn: bool = _f(False, "data parallel on GPUs (torchrun): BatchNorm statistics over the global batch "
                              "(torch.nn.SyncBatchNorm; not with the fused or graph engines)")
    compile: bool = _f(False, "torch.compile the networks' forwards (inductor; the first steps compile)")
    compile_mode: str | None = _f(None, "torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, "
                                        "max-autotune-no-cudagraphs; implies --compile")
    # optimisation
    epochs: int = _f(5, "number of epochs", ge=1)
    batch_size: int = _f(128, "training batch size", ge=1)
    eval_batch_size: int = _f(1000, "evaluation batch size", ge=1)
    lr: float = _f(0.1, "initial learning rate", gt=0)
    momentum: float = _f(0.9, "SGD momentum", ge=0, lt=1)
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay", ge=0)
    schedule: str = _f("cosine", "learning-rate schedule, stepped every iteration", choices=("cosine", "step", "constant"))
    lr_milestones: list[float] = _f([0.5, 0.75], "step schedule: fractions of training where the lr drops", gt=0, lt=1)
    lr_gamma: float = _f(0.1, "step schedule: lr factor at each milestone", gt=0)
    warmup_epochs: float = _f(0.0, "linear learning-rate warm-up, in epochs", ge=0)
    fused_sgd: bool = _f(False, "PyTorch's fused SGD kernel (all parameters of a network in one step kernel); "
                                "default: foreach on CUDA, per-parameter on the CPU; always fused with a graph engine")
    # execution
    seed: int = _f(0, "random seed (models, data order, augmentation, perturbations)", ge=0, lt=2**63)
    device: str = _f("auto", "cpu, cuda, cuda:N, mps or auto (cuda when available)")
    amp: bool = _f(False, "bf16 autocast for the forward passes")
    channels_last: bool = _f(False, "channels-last memory format for models and batches")
    threads: int | None = _f(None, "CPU threads for torch (default: torch's choice)", ge=1)
    # output
    out: str | None = _f(None, "output folder (default: runs/<data>-<mode>-<time>); must be new, empty, or a cdfast run")
    checkpoint_minutes: float = _f(30.0, "also checkpoint within an epoch every this many minutes; 0: at epoch "
                                         "ends only",
                                   ge=0)
    log_interval: int = _f(20, "steps between metric reads (host syncs) and progress updates", ge=1, le=1000)
    bn_recalibration: int = _f(10, "evaluate with BatchNorm statistics recomputed on this many clean training batches "
                                   "(the running-statistics accuracy is recorded too, so the test set is evaluated twice); "
                                   "0: only the running statistics", ge=0, le=1000)
    tensorboard: bool = _f(True, "also write TensorBoard event files")
    plots: bool = _f(True, "write PNG plots at the end")
    progress: bool = _f(True, "show progress bars")

    def validate(self) -> "TrainConfig":
        """Check every value's type and range; raises TypeError / ValueError naming the option."""
        hints = typing.get_type_hints(type(self))
        try:
            for f in dataclasses.fields(self):
                value = getattr(self, f.name)
                if isinstance(value, os.PathLike):  # Path objects from Python code: stored as text
                    setattr(self, f.name, value := os.fspath(value))
                elif isinstance(value, tuple):  # a tuple of models or ops from Python code: stored as a list
                    setattr(self, f.name, value := list(value))
                _check_field(f, value, hints[f.name])
            self._check_relations()
        except (TypeError, ValueError) as e:
            raise type(e)(f"invalid config: {e}") from None
        return self

    def _check_relations(self) -> None:
        """What no single field's range can say."""
        if len(self.models) < 2:
            raise ValueError(f"a group needs at least 2 models, got {self.models}")
        for name in self.models:
            check_model_name(name)
        unknown = [op for op in self.perturb_ops if op not in OPS and op not in PRESETS]
        if unknown:
            raise ValueError(f"unknown perturbation ops {unknown}; available: {', '.join(OPS)}, or a preset: "
                             f"{', '.join(PRESETS)}")
        if not self.perturb_ops and self.perturbs:
            raise ValueError("perturb_ops is empty; name at least one op or turn perturbation off (--no-perturb)")
        check_teachers(self.mode, self.teachers)
        if self.loader == "dali":
            self._check_dali()
        if self.sync_bn and (self.device == "cpu" or split_engine_name(self.engine)[0] == "fused"
                             or split_engine_name(self.engine)[1]):
            raise ValueError("sync_bn needs GPUs (torch's SyncBatchNorm synchronises CUDA tensors) and an engine that "
                             "runs each network's own forward (sequential, streams or auto), got device="
                             f"{self.device}, engine={self.engine}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(map(str, COMPILE_MODES))}, got {self.compile_mode!r}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device must be cpu, cuda, cuda:N, mps or auto, got {self.device!r}")

    @property
    def perturbs(self) -> bool:
        """Whether the run perturbs one network's batch (``perturb``; None: on in competitive mode)."""
        return perturbs(self.perturb, self.mode)

    def perturb_op_names(self) -> list[str]:
        """The pool's op names, presets expanded (the DALI loader makes exactly these)."""
        return [op for op in expand_presets(self.perturb_ops) if isinstance(op, str)]

    def _check_dali(self) -> None:
        if split_engine_name(self.engine)[1]:
            raise ValueError(f"engine {self.engine} perturbs inside its CUDA graphs and cannot take the DALI "
                             "loader's perturbed views; use --engine auto, sequential, streams or fused with --loader dali")
        missing = [op for op in self.perturb_op_names() if op not in DALI_OPS]
        if self.perturbs and missing:
            raise ValueError(f"the DALI pipeline has no {', '.join(missing)} op (it has {', '.join(DALI_OPS)}); choose "
                             "--perturb-ops among those, or use --loader torch")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        values = upgrade_legacy_keys(values)
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
        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def upgrade_legacy_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Settings written by an earlier cdfast (a run folder's config.yaml or checkpoint) in today's names.

    ``mutated_bn`` is now ``perturbed_bn``; ``perturb_bn_stats: true`` is ``perturbed_bn: updated``.
    """
    values = dict(values)
    legacy_bn = values.pop("mutated_bn", None)
    updated = values.pop("perturb_bn_stats", False)
    if "perturbed_bn" not in values and (legacy_bn is not None or updated is True):
        values["perturbed_bn"] = legacy_bn or "updated"
    return values


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping, with clear errors for a missing file, bad YAML or another shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{what} {path} is not valid YAML{where}: {problem}; fix the file there "
                         "(lists are written [a, b], mappings key: value)") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not a text file ({e.reason})") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold a mapping of keys to values, not a {type(values).__name__}")
    bad_keys = [k for k in values if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"{what} {path} has keys that are not names: {bad_keys}")
    return values


def _check_field(f: dataclasses.Field, value: Any, hint: Any) -> None:
    """Strict type and range check of one field's value."""
    name = f.name
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
    bounds = {k: f.metadata[k] for k in RANGE_KEYS if k in f.metadata}
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            example = ", ".join(str(v).strip() for v in str(value).split(",")) if isinstance(value, str) else "..."
            raise TypeError(f"{name} must be a list, got {type(value).__name__} {value!r}; in YAML write "
                            f"[{example}] (the command-line flag takes a comma-separated string)")
        for k, v in enumerate(value):
            _check_scalar(f"{name}[{k}]", v, item, bounds)
    else:
        _check_scalar(name, value, hint, bounds)
    choices = f.metadata.get("choices")
    if choices:
        check_choice(name, value, choices)


def _check_scalar(name: str, value: Any, kind: type, bounds: dict[str, float]) -> None:
    if kind is bool:
        check_flag(name, value)
    elif kind in (int, float):
        check_number(name, value, integer=kind is int, **bounds)
    elif kind is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    else:  # pragma: no cover - a field type this checker does not know yet
        raise TypeError(f"{name}: unsupported field type {kind}")


# How a resume may differ from the checkpoint it continues (see Trainer):
# RESUME_FREE settings change how the run executes or reports, never what it computes beyond floating-point
# rounding; RESUME_FIXED settings define what the checkpoint holds and can never change; every other setting
# (device and skip_bad_images included: they change the random draws) changes the training
# trajectory and may change only with --resume-with-changes, which records it.
RESUME_FREE = ("engine", "compile", "compile_mode", "channels_last", "fused_sgd", "threads", "eval_batch_size",
               "out", "workers", "checkpoint_minutes", "log_interval", "tensorboard", "plots", "progress", "bn_recalibration")
RESUME_FIXED = ("data", "models", "features", "seed", "train_subset", "batch_size", "image_size")
_unknown = set(RESUME_FREE + RESUME_FIXED) - set(TrainConfig.__dataclass_fields__)
assert not _unknown, f"RESUME_FREE / RESUME_FIXED name no config field: {_unknown}"
