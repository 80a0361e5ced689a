"""Guided training (paper Algorithm 1; SPEC Sec. 5): after the warm-up, once a regular step ends with |d_speed| >
epsilon, the next W steps re-balance m0 (d_speed > 0) or m1 (d_speed < 0); then regular steps resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..models.mmtm import FusionMode
from .base import MethodSettings, Rebalancing, RebalancingSettings, StepContext, Sweep, register, setting


@dataclass
class GuidedSettings(RebalancingSettings):
    """Algorithm 1's settings (SPEC Sec. 5-6 and 10)."""

    epsilon: float = setting(0.01, param="EPSILON")  # imbalance tolerance on |d_speed| (0.01 ModelNet40, 0.1 digits)
    window: int = setting(5, param="WINDOW")  # re-balancing steps W taken once |d_speed| > epsilon

    def validate(self) -> None:
        super().validate()
        if not (self.epsilon >= 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon={self.epsilon} must be a finite number >= 0 (the imbalance tolerance)")
        if self.window < 1:
            raise ValueError(f"window={self.window} must be at least 1 (re-balancing steps per window)")


@register
class Guided(Rebalancing):
    """Algorithm 1: after warm-up, once a regular step ends with |d_speed| > epsilon the next `window` steps
    re-balance m0 (d_speed > 0) or m1 (d_speed < 0); then regular steps resume and the check runs after each.

    The d_speed of the last warm-up step is checked before the first step after warm-up; a step the fp16 scaler
    skipped adds nothing to the CLS and is not a new check.

    Args:
        settings: GuidedSettings (epsilon, window, warmup_epochs).
        seed: unused (the schedule is deterministic).
    """

    name = "guided"
    label = "guided"
    color = "tab:blue"
    paper_row = True
    order = 5
    Settings = GuidedSettings
    tolerance = "epsilon"
    # Fig. 9: epsilon swept at the preset W, W at the preset epsilon; the epsilon grids are ours, around each preset.
    sweeps = (Sweep("epsilon", {"renders": (0.001, 0.003, 0.01, 0.03, 0.1), "digits": (0.01, 0.03, 0.1, 0.3, 1.0)},
                    "imbalance tolerance", "$\\varepsilon$", "ε", hold="window", log_x=True, param="SENS_EPSILONS"),
              Sweep("window", (1, 2, 5, 10, 20), "re-balancing window", "$W$", "W", hold="epsilon",
                    param="SENS_WINDOWS"))

    def __init__(self, settings: Optional[MethodSettings] = None, seed: int = 0) -> None:
        super().__init__(settings, seed)
        self.epsilon, self.window = self.settings.epsilon, self.settings.window
        self.warmup_epochs = self.settings.warmup_epochs
        self.remaining = 0  # re-balancing steps left in the current window
        self.window_mode = FusionMode.FUSED
        self.last_d_speed: Optional[float] = None  # d_speed after the last regular step, not yet checked

    def next_mode(self, ctx: StepContext) -> FusionMode:
        if self.remaining > 0:
            self.remaining -= 1
            return self.window_mode
        d = self.last_d_speed
        if ctx.epoch >= self.warmup_epochs and d is not None and abs(d) > self.epsilon:
            # d_speed > 0: branch 0 learns relatively more through the fusion than from m0 -> accelerate m0.
            self.window_mode = FusionMode.REBALANCE_M0 if d > 0 else FusionMode.REBALANCE_M1
            self.remaining = self.window - 1
            self.last_d_speed = None
            return self.window_mode
        return FusionMode.FUSED

    def observe(self, ctx: StepContext, record: dict) -> None:
        if record.get("skipped", False):  # no step was taken and nothing was added to the CLS sums
            self.last_d_speed = None
        elif ctx.mode is FusionMode.FUSED:
            self.last_d_speed = record.get("d_speed", float("nan"))

    def state_dict(self) -> dict:
        return {"schedule": {"remaining": self.remaining, "window_mode": self.window_mode.value,
                             "last_d_speed": self.last_d_speed}}

    def load_state_dict(self, state: dict) -> None:
        schedule = state["schedule"]
        self.remaining = int(schedule["remaining"])
        self.window_mode = FusionMode(schedule["window_mode"])
        self.last_d_speed = schedule["last_d_speed"]
