"""What the training loop calls besides the method (SPEC Sec. 4 and 11): the `Callback` hooks, the conditional
learning speed as the built-in callback, a plain `callback(event, record)` function as a callback, and the L1 penalty
of paper Sec. 6.3 as a loss term.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import torch
from torch import nn

from ..measures.cls import CLS_GROUPS, CLSTracker
from ..measures.sparsity import l1_norm
from ..methods.base import StepContext
from ..models.mmtm import FusionMode

Trainer = Any  # greedymm.training.Trainer (which imports this module)
EventCallback = Callable[[str, dict], None]  # callback(event, record), event "step" or "epoch"


class Callback:
    """Hooks into the loop; subclass and override what you need (each default does nothing). Each hook receives the
    Trainer (its model, optimizer, position, `skipped` tensor of the step, ...)."""

    def on_after_backward(self, trainer: Trainer, ctx: StepContext) -> Dict[str, torch.Tensor]:
        """After the backward pass (gradients unscaled), before the method's gradient edits and the optimizer step.

        Returns:
            0-d tensors to log with the step (read with the step's one host synchronisation).
        """
        return {}

    def on_step_end(self, trainer: Trainer, ctx: StepContext, record: dict) -> None:
        """After a step, with its record as logged."""

    def on_train_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """After an epoch's last step, with its record of training figures (add to it); evaluation follows."""

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """After an epoch is evaluated, logged and checkpointed, with its record."""


class CLSCallback(Callback):
    """The conditional learning speed (SPEC Sec. 4): mu of the four groups after every backward pass, before any
    gradient edit, added up over regular steps that were taken; s(m1|m0), s(m0|m1) and d_speed logged every step
    and at the end of every epoch.

    Args:
        model: a two-branch model (its `cls_groups()`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.tracker = CLSTracker(model.cls_groups())
        self.last_speeds = [math.nan] * 3  # s(m1|m0), s(m0|m1), d_speed after the last step

    def on_after_backward(self, trainer: Trainer, ctx: StepContext) -> Dict[str, torch.Tensor]:
        mu = self.tracker.compute_mu()  # (4,)
        skipped = trainer.skipped if trainer.scaler is not None else None  # a skipped fp16 step adds nothing
        speeds = self.tracker.update(mu, regular=ctx.mode is FusionMode.FUSED, skipped=skipped)  # (3,)
        return {**{f"mu_{g}": v for g, v in zip(CLS_GROUPS, mu)},
                "s_m1_m0": speeds[0], "s_m0_m1": speeds[1], "d_speed": speeds[2]}

    def on_step_end(self, trainer: Trainer, ctx: StepContext, record: dict) -> None:
        self.last_speeds = [record["s_m1_m0"], record["s_m0_m1"], record["d_speed"]]

    def on_train_epoch_end(self, trainer: Trainer, record: dict) -> None:
        record.update(zip(("s_m1_m0", "s_m0_m1", "d_speed"), self.last_speeds))


class EventCallbackAdapter(Callback):
    """A plain `callback(event, record)` function as a Callback: called with "step" and "epoch" records."""

    def __init__(self, fn: EventCallback) -> None:
        self.fn = fn

    def on_step_end(self, trainer: Trainer, ctx: StepContext, record: dict) -> None:
        self.fn("step", record)

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        self.fn("epoch", record)


class L1Term:
    """The L1 penalty lambda * sum |theta| over all of the model's parameters (paper Sec. 6.3), a loss term logged
    as "l1" (the unweighted norm)."""

    name = "l1"

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def __call__(self, model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the weighted term added to the loss, the logged value)."""
        norm = l1_norm(model.parameters())
        return self.strength * norm, norm
