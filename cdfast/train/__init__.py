"""Training runs: configuration, the loop, the run folder, checkpoints, records and plots."""

from cdfast.train.checkpoint import CheckpointError, load_checkpoint, load_latest, save_atomic, save_checkpoint
from cdfast.train.config import TrainConfig
from cdfast.train.metrics import NonFiniteLossError
from cdfast.train.run_folder import RunFolderError
from cdfast.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "RunFolderError", "CheckpointError",
           "save_atomic", "save_checkpoint", "load_checkpoint", "load_latest"]
