"""Training runs: configuration, the loop, checkpoints, records and plots."""

from cdfast.train.checkpoint import load_checkpoint, save_atomic
from cdfast.train.config import TrainConfig
from cdfast.train.metrics import NonFiniteLossError
from cdfast.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "save_atomic", "load_checkpoint"]
