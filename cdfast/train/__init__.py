"""Training runs: configuration, the loop, the run folder, checkpoints, records and plots.

The names below are imported on first use (PEP 562), so ``cdfast --help`` and the
config code do not pull in the trainer's dependencies (tqdm, TensorBoard, matplotlib).
"""

from importlib import import_module

_HOME = {
    "TrainConfig": "cdfast.train.config",
    "Trainer": "cdfast.train.trainer",
    "build_group": "cdfast.train.group",
    "NonFiniteLossError": "cdfast.train.metrics",
    "RunFolderError": "cdfast.train.run_folder",
    "CheckpointError": "cdfast.train.checkpoint",
    "save_atomic": "cdfast.train.checkpoint",
    "save_checkpoint": "cdfast.train.checkpoint",
    "load_checkpoint": "cdfast.train.checkpoint",
    "load_latest": "cdfast.train.checkpoint",
}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'cdfast.train' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
