"""The training loop (SPEC Sec. 4-6): the Trainer and its callbacks, checkpoints and their identity checks, and the
per-run logs."""
from .checkpoint import RunSettingsError, load_checkpoint, model_signature
from .logs import read_epochs, read_steps
from .callbacks import Callback, CLSCallback, L1Term
from .trainer import NonFiniteLossError, RunResult, Trainer, train

__all__ = ["CLSCallback", "Callback", "L1Term", "NonFiniteLossError", "RunResult", "RunSettingsError", "Trainer",
           "load_checkpoint", "model_signature", "read_epochs", "read_steps", "train"]
