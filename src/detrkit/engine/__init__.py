"""Training and evaluation: the loops, the optimiser recipe, resumable state, the Trainer."""

from detrkit.engine.loop import evaluate, train_one_epoch
from detrkit.engine.trainer import FitResult, Trainer, resolve_device

__all__ = ["train_one_epoch", "evaluate", "Trainer", "FitResult", "resolve_device"]
