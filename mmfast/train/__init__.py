"""The training loop: ``Trainer`` + ``TrainConfig`` (see ``mmfast/train/trainer.py``)."""

from mmfast.train.config import TrainConfig
from mmfast.train.trainer import NonFiniteLossError, Trainer

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer"]
