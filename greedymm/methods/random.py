"""Random re-balancing (paper Sec. 5; SPEC Sec. 5): after the warm-up each step is drawn uniformly from {regular,
re-balance m0, re-balance m1}, from the method's own seeded generator.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.mmtm import FusionMode
from .base import MethodSettings, Rebalancing, StepContext, register


@register
class Random(Rebalancing):
    """After warm-up each step is drawn uniformly from {regular, re-balance m0, re-balance m1}.

    Args:
        settings: RebalancingSettings (warmup_epochs: epochs of regular steps first).
        seed: seed of the schedule's own generator (independent of data order and weights).
    """

    name = "random"
    label = "random"
    color = "tab:orange"
    paper_row = True
    order = 4
    MODES = (FusionMode.FUSED, FusionMode.REBALANCE_M0, FusionMode.REBALANCE_M1)

    def __init__(self, settings: Optional[MethodSettings] = None, seed: int = 0) -> None:
        super().__init__(settings, seed)
        self.warmup_epochs = self.settings.warmup_epochs
        self.generator = torch.Generator().manual_seed(self.seed)

    def next_mode(self, ctx: StepContext) -> FusionMode:
        if ctx.epoch < self.warmup_epochs:
            return FusionMode.FUSED
        return self.MODES[int(torch.randint(3, (), generator=self.generator))]

    def state_dict(self) -> dict:
        return {"schedule": {"generator": self.generator.get_state()}}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["schedule"]["generator"])
