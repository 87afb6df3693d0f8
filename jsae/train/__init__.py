"""Training: optimizer and schedules, the pure train step, the loop, checkpoints, the run."""

from jsae.train.loop import Trainer, spec_from_config
from jsae.train.optim import lr_schedule, make_optimizer, sparsity_schedule
from jsae.train.run import Run
from jsae.train.state import TrainState, init_state
from jsae.train.step import make_train_step

__all__ = [
    "Run", "TrainState", "Trainer", "init_state", "lr_schedule", "make_optimizer", "make_train_step",
    "sparsity_schedule", "spec_from_config",
]
