"""The uni-modal rows of the paper's Table 1 (paper Sec. 6.4; SPEC Sec. 9): one branch of the two-branch model with a
squeeze-and-excitation block wherever it has an MMTM, trained with CE on its own output, on m0 ("unimodal_m0") or on
m1 ("unimodal_m1"). No CLS and no CUR apply (one modality); every step is a regular step.
"""
from __future__ import annotations

from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..measures.evaluate import Outputs
from ..models.two_branch import UniModalNet
from .base import Method, MethodSettings, StepContext, register


class UniModal(Method):
    """Trains a uni-modal network (`UniModalNet`) on modality `modality` with CE on its output."""

    multimodal = False
    paper_row = True
    modality: ClassVar[int] = 0  # the input the network reads: 0 (m0) or 1 (m1)

    def __init__(self, settings: Optional[MethodSettings] = None, seed: int = 0) -> None:
        super().__init__(settings, seed)
        if self.modality not in (0, 1):
            raise ValueError(f"modality={self.modality} must be 0 (m0) or 1 (m1)")

    def build_model(self, two_branch: nn.Module) -> nn.Module:
        """The uni-modal counterpart of the two-branch model: its branch `modality` with SE blocks."""
        return UniModalNet.from_two_branch(two_branch, self.modality)

    def setup(self, model: nn.Module) -> None:
        if getattr(model, "modality", None) != self.modality or hasattr(model, "cls_groups"):
            raise TypeError(f"algorithm {self.name!r} trains a UniModalNet of modality {self.modality} "
                            f"(UniModalNet.from_two_branch(model, {self.modality})); got {type(model).__name__}"
                            f" with modality {getattr(model, 'modality', None)}")
        return None

    def forward(self, model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, ctx: StepContext) -> Outputs:
        return {"y": model(x1 if self.modality == 1 else x0)}  # (B, K)

    def loss(self, out: Outputs, y: torch.Tensor, ctx: StepContext) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return F.cross_entropy(out["y"].float(), y), {}


@register
class UniModalM0(UniModal):
    """The uni-modal network on m0."""

    name = "unimodal_m0"
    label = "uni-modal m0"
    color = "tab:olive"
    order = 0
    modality = 0


@register
class UniModalM1(UniModal):
    """The uni-modal network on m1."""

    name = "unimodal_m1"
    label = "uni-modal m1"
    color = "tab:cyan"
    order = 1
    modality = 1
