"""RUBi (Cadene et al. 2019) adapted to two modalities (paper Table 1; SPEC Sec. 9): a bias-only classifier on the
bias modality's own features (computed without the other modality, detached) masks both branches' logits in the
loss; our documented adaptation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..measures.evaluate import Outputs
from ..models.mmtm import FusionMode
from ..models.two_branch import final_linear, frozen_norm_stats
from .base import Method, MethodSettings, StepContext, register, setting

BIAS_INPUTS = ("unimodal", "fused")
# The mode in which branch b sees its own modality alone: the other modality's fusion scale is its running mean.
UNIMODAL_MODE = {0: FusionMode.REBALANCE_M0, 1: FusionMode.REBALANCE_M1}


@dataclass
class RUBiSettings(MethodSettings):
    """RUBi's setting."""

    rubi_bias: str = "m0"  # the bias modality whose branch feeds the bias-only classifier ("m0" or "m1")
    # what the bias classifier reads: "unimodal", the bias branch computed without the other modality (SPEC Sec. 9);
    # "fused", the fused features (greedymm 0.1's adaptation, which also carry the other modality via the MMTMs)
    rubi_bias_input: str = setting("unimodal", legacy="fused")

    def validate(self) -> None:
        if self.rubi_bias not in ("m0", "m1"):
            raise ValueError(f"rubi_bias={self.rubi_bias!r} is unknown; allowed: 'm0', 'm1'")
        if self.rubi_bias_input not in BIAS_INPUTS:
            raise ValueError(f"rubi_bias_input={self.rubi_bias_input!r} is unknown; allowed: "
                             f"{', '.join(map(repr, BIAS_INPUTS))}")


class RUBiHeads(nn.Module):
    """RUBi's bias-only path: c1, a 2-layer MLP from the bias branch's pooled features to class logits (whose
    sigmoid is the mask), and c2, a linear layer on c1's output trained with its own CE loss.

    Args:
        features: F, the size of the pooled features entering the bias branch's final linear layer.
        num_classes: K.
        hidden: width of c1's hidden layer (F when None).
    """

    def __init__(self, features: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        hidden = hidden or features
        self.c1 = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
        self.c2 = nn.Linear(num_classes, num_classes)

    def forward(self, e_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, F) detached features -> (c1 logits (B, K), c2 logits (B, K))."""
        c1 = self.c1(e_b)
        return c1, self.c2(c1)


@register
class RUBi(Method):
    """RUBi adapted to two modalities (SPEC Sec. 9; the paper gives no details, this adaptation is ours).

    A bias modality b (m0 by default) feeds its branch's pooled final features e_b, detached so that no gradient
    from the bias path reaches the branch, to the bias-only classifier c1; mask = sigmoid(c1(e_b)) multiplies both
    branches' logits in the loss. As RUBi's question-only branch, e_b comes from the bias modality alone: a second
    pass, without gradient and without moving the batch norms' statistics, computes branch b in the re-balancing
    mode of b, where the other modality reaches it only as the running mean of its fusion scales over the previous
    regular steps (at the first step, over that step's regular pass). The fused features would carry the other modality through the MMTMs
    (`rubi_bias_input="fused"`, greedymm 0.1's adaptation). The loss:
        CE(y0_hat * mask, y) + CE(y1_hat * mask, y) + CE(c2(c1(e_b)), y).
    Evaluation, the CLS and the CUR use y0_hat, y1_hat without the mask; c1, c2 belong to no CLS group. Regular
    (fused) steps only. The logged loss0/loss1 are the masked terms the optimizer sees; loss_bias is the third.
    On a late-fusion model (SPEC Sec. 13) e_b is encoder b's output, which sees modality b alone, and the loss is
    CE(z * mask, y) + CE(c2(c1(e_b)), y) (logged as loss_fused and loss_bias).

    Args:
        settings: RUBiSettings (rubi_bias: the bias modality, "m0" or "m1").
        seed: unused.
    """

    name = "rubi"
    label = "RUBi"
    color = "tab:brown"
    paper_row = True
    order = 3
    Settings = RUBiSettings

    def __init__(self, settings: Optional[MethodSettings] = None, seed: int = 0) -> None:
        super().__init__(settings, seed)
        self.bias = int(self.settings.rubi_bias[-1])  # 0 (m0) or 1 (m1)
        self.heads: nn.Module = nn.Identity()

    def setup(self, model: nn.Module) -> nn.Module:
        super().setup(model)
        if getattr(model, "is_late", False):
            self.heads = RUBiHeads(model.features[self.bias], model.num_classes)
            return self.heads
        head = final_linear(model.branch1 if self.bias == 1 else model.branch0)
        self.heads = RUBiHeads(head.in_features, head.out_features)
        return self.heads

    def forward(self, model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, ctx: StepContext) -> Outputs:
        if getattr(model, "is_late", False):  # encoder b sees modality b alone: its features are the bias input
            y0_hat, y1_hat, features = model(x0, x1, ctx.mode, return_features=True)
            c1, c2 = self.heads(features[self.bias].detach())
            return {"y0": y0_hat, "y1": y1_hat, "z": model.predict(y0_hat, y1_hat), "c1": c1, "c2": c2}
        if self.settings.rubi_bias_input == "fused":
            y0_hat, y1_hat, features = model(x0, x1, ctx.mode, return_features=True)
        elif all(m.has_running_scales for m in model.mmtms.values()):  # the running means of the previous steps
            features = self._unimodal_features(model, x0, x1)
            y0_hat, y1_hat = model(x0, x1, ctx.mode)
        else:  # the first step: its regular pass gives the running means their first values
            y0_hat, y1_hat = model(x0, x1, ctx.mode)
            features = self._unimodal_features(model, x0, x1)
        c1, c2 = self.heads(features[self.bias].detach())  # stop-gradient: the bias path never trains the branch
        return {"y0": y0_hat, "y1": y1_hat, "c1": c1, "c2": c2}

    def _unimodal_features(self, model: nn.Module, x0: torch.Tensor, x1: torch.Tensor) -> tuple:
        """(e0, e1) of a pass without gradient, in which branch b sees the other modality only through the running
        means of its fusion scales; the batch norms' statistics stay as they were."""
        with torch.no_grad(), frozen_norm_stats(model):
            return model(x0, x1, UNIMODAL_MODE[self.bias], return_features=True)[2]

    def loss(self, out: Outputs, y: torch.Tensor, ctx: StepContext) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        mask = torch.sigmoid(out["c1"].float())  # (B, K)
        if "z" in out:  # late fusion: the one fused loss, masked (SPEC Sec. 13)
            loss_fused = F.cross_entropy(out["z"].float() * mask, y)
            loss_bias = F.cross_entropy(out["c2"].float(), y)
            return loss_fused + loss_bias, {"loss_fused": loss_fused, "loss_bias": loss_bias}
        loss0 = F.cross_entropy(out["y0"].float() * mask, y)
        loss1 = F.cross_entropy(out["y1"].float() * mask, y)
        loss_bias = F.cross_entropy(out["c2"].float(), y)
        return loss0 + loss1 + loss_bias, {"loss0": loss0, "loss1": loss1, "loss_bias": loss_bias}
