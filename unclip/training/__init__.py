"""Training: the `Trainer` every stage shares (trainer.py), its checkpoint files (state.py), its settings
(settings.py), clean stops on signals (signals.py) and the train/ scripts' command line (cli.py)."""

from unclip.training.cli import train_main
from unclip.training.settings import check_train_config, lr_at
from unclip.training.signals import stop_signals
from unclip.training.state import CheckpointError, init_weights
from unclip.training.trainer import NonFiniteLossError, RunExistsError, Task, Trainer, micro_batch_seed

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "RunExistsError",
    "Task",
    "Trainer",
    "check_train_config",
    "init_weights",
    "lr_at",
    "micro_batch_seed",
    "stop_signals",
    "train_main",
]
