"""Gradient Blending (Wang et al., CVPR 2020), our adaptation to the two-branch MMTM network (SPEC Sec. 12): three
heads (y0_hat, y1_hat, the fused prediction) in a weighted loss whose weights are re-estimated every n epochs from
the heads' generalization and overfitting on the validation split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..measures.evaluate import Outputs
from ..models.two_branch import TwoBranchNet
from .base import Method, MethodSettings, StepContext, Sweep, register, setting


@dataclass
class GBlendSettings(MethodSettings):
    """Gradient Blending's setting (SPEC Sec. 12)."""

    gblend_period: int = setting(3, param="GBLEND_PERIOD")  # n, the epochs between two re-estimations of the weights
    gblend_scale: float = setting(2.0, legacy=1.0)  # the weights' sum: 2 = vanilla's scale CE(y0) + CE(y1); 1 = theirs

    def validate(self) -> None:
        if self.gblend_period < 1:
            raise ValueError(f"gblend_period={self.gblend_period} must be at least 1 (epochs between re-estimations)")
        if not (self.gblend_scale > 0 and math.isfinite(self.gblend_scale)):
            raise ValueError(f"gblend_scale={self.gblend_scale} must be a positive finite number (the sum of the "
                             "blending weights; 2 trains at vanilla's gradient scale)")


BLEND_HEADS = ("0", "1", "fused")  # y0_hat, y1_hat and the fused (y0_hat + y1_hat) / 2


def head_losses(record: dict) -> Tuple[List[float], List[float]]:
    """G and O of the three heads at the end of an epoch, from its record.

    G = validation loss, O = validation loss - training loss, for y0_hat (val_loss0, train_loss0), y1_hat and the
    fused head (val_loss_fused, train_loss_fused). The training loss is the epoch's running mean over its batches
    (the trainer's train_<term>), not a separate pass over D_train.

    Args:
        record: an epoch record with val_loss0/1/_fused and train_loss0/1/_fused.
    Returns:
        (G, O), three values each in BLEND_HEADS order.
    """
    terms = ("loss0", "loss1", "loss_fused")  # in BLEND_HEADS order
    missing = [f"{split}_{t}" for split in ("val", "train") for t in terms if f"{split}_{t}" not in record]
    if missing:
        raise ValueError(f"Gradient Blending estimates its weights on the validation split, and the epoch record lacks "
                         f"{missing}: train gblend with a val_loader")
    g = [float(record[f"val_{t}"]) for t in terms]
    return g, [gv - float(record[f"train_{t}"]) for gv, t in zip(g, terms)]


def blend_weights(g_start: Sequence[float], o_start: Sequence[float], g_end: Sequence[float],
                  o_end: Sequence[float]) -> List[float]:
    """Gradient Blending's weights from one window N -> N + n (Wang et al. 2020, their OGR-based estimate).

    Per head: dG = G(N) - G(N+n), dO = O(N+n) - O(N), raw = max(dG / dO^2, 0); the weights are raw / sum(raw).
    Cases: dO = 0 with dG > 0 is the limit dG / dO^2 = +inf, a head that generalised without overfitting: such heads
    share the weight equally, the others get 0; dO = 0 with dG <= 0 gives 0; a non-finite dG or dO gives 0; when every
    raw is 0 (no head generalised better), the weights are equal.

    Args:
        g_start, o_start: G and O of each head at the window's start (epoch N).
        g_end, o_end: the same at its end (epoch N + n).
    Returns:
        One weight per head, >= 0, summing to 1.
    """
    if not len(g_start) == len(o_start) == len(g_end) == len(o_end) >= 1:
        raise ValueError("blend_weights needs G and O of the same heads at the window's start and end")
    raw = []
    for gs, os_, ge, oe in zip(g_start, o_start, g_end, o_end):
        d_g, d_o = gs - ge, oe - os_
        if not (math.isfinite(d_g) and math.isfinite(d_o)):
            raw.append(0.0)
        elif d_o == 0:
            raw.append(math.inf if d_g > 0 else 0.0)
        else:
            raw.append(max(d_g / d_o ** 2, 0.0))  # may overflow to inf for a tiny dO: the limit case below
    n = len(raw)
    if any(math.isinf(r) for r in raw):
        best = [r for r in raw if math.isinf(r)]
        return [1.0 / len(best) if math.isinf(r) else 0.0 for r in raw]
    total = sum(raw)
    if total == 0:
        return [1.0 / n] * n
    return [r / total for r in raw]


@register
class GradientBlending(Method):
    """Gradient Blending (Wang et al., CVPR 2020) on the two-branch MMTM network (SPEC Sec. 12).

    Three heads, y0_hat, y1_hat and the fused (y0_hat + y1_hat) / 2, and the loss sum_h w_h CE(head_h, y). The
    weights start equal (scale/3); the first window starts at the end of epoch 1 (the first time both a validation and a
    training loss exist), and at the end of epochs 1 + n, 1 + 2n, ... they are re-estimated from the last window by
    `blend_weights`. The held-out data is the validation split, which thereby also shapes the model that it then
    picks as the best checkpoint. Every step is a regular (fused) step.

    Our adaptation: their heads are separate classifiers on each modality's features and on the late-fused features;
    here y_k_hat is branch k's own head (which sees the other modality through the MMTMs), and the fused head is the
    model's prediction. Their weights sum to 1, which with equal weights gives half the gradient of the paper's
    loss CE(y0_hat) + CE(y1_hat): a comparison at half the learning rate. Here they sum to `gblend_scale` (2 by
    default, vanilla's scale; 1 restores their formulation), so every row of a table trains at the same step size.

    On a late-fusion model (SPEC Sec. 13) the heads are the partial logits z0, z1 and the fused z (the model's
    prediction), closer to their formulation; the scale stays `gblend_scale`.

    Logged: w0, w1, w_fused every step (the weights of that step) and every epoch (those it trained with, and
    next_w0, next_w1, next_w_fused for the next epoch); loss0, loss1, loss_fused are the unweighted CE of each head.

    Args:
        settings: GBlendSettings (gblend_period: n, epochs between re-estimations; gblend_scale: the weights' sum).
        seed: unused.
    """

    name = "gblend"
    label = "Gradient Blending"
    color = "tab:purple"
    order = 7
    Settings = GBlendSettings
    sweeps = (Sweep("gblend_period", (1, 3, 5, 10), "Gradient Blending period, epochs", "$n$", "n",
                    param="SENS_PERIODS"),)  # ours

    def __init__(self, settings: Optional[MethodSettings] = None, seed: int = 0) -> None:
        super().__init__(settings, seed)
        self.period = int(self.settings.gblend_period)
        self.scale = float(self.settings.gblend_scale)
        self.weights = self._as_float32([self.scale / 3] * 3)  # w0, w1, w_fused, summing to the scale
        self.anchor: Optional[dict] = None  # {"epoch", "G", "O"} at the start of the current window
        self._w = torch.tensor(self.weights)  # (3,) on the model's device after setup

    @staticmethod
    def _as_float32(weights: Sequence[float]) -> List[float]:
        # The loss uses float32 weights: keep exactly those values, so the step and epoch logs agree.
        return torch.tensor(weights, dtype=torch.float32).tolist()

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self._w = torch.tensor(self.weights, dtype=torch.float32, device=next(model.parameters()).device)
        return None

    def _set_weights(self, weights: Sequence[float]) -> None:
        self.weights = self._as_float32(weights)
        self._w = torch.tensor(self.weights, dtype=torch.float32, device=self._w.device)  # once per re-estimation

    def loss(self, out: Outputs, y: torch.Tensor, ctx: StepContext) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """sum_h w_h CE(head_h, y) over y0_hat, y1_hat and the fused head.

        Returns:
            (loss, {"loss0", "loss1", "loss_fused"}: the unweighted CE of each head).
        """
        y0_hat, y1_hat = out["y0"].float(), out["y1"].float()
        fused = out["z"].float() if "z" in out else TwoBranchNet.predict(y0_hat, y1_hat)  # late fusion: z
        losses = torch.stack([F.cross_entropy(y0_hat, y), F.cross_entropy(y1_hat, y),
                              F.cross_entropy(fused, y)])  # (3,)
        return (self._w * losses).sum(), {"loss0": losses[0], "loss1": losses[1], "loss_fused": losses[2]}

    def after_backward(self, model: nn.Module, out: Outputs, y: torch.Tensor,
                       ctx: StepContext) -> Dict[str, torch.Tensor]:
        return {f"w{h}" if h != "fused" else "w_fused": self._w[i] for i, h in enumerate(BLEND_HEADS)}

    def end_epoch(self, record: dict, ctx: StepContext) -> dict:
        """Record G and O of the heads; at the end of epochs 1 + n, 1 + 2n, ... re-estimate the weights.

        Returns:
            w0, w1, w_fused (the weights this epoch trained with) and next_w0, next_w1, next_w_fused.
        """
        used = list(self.weights)
        epoch = int(record["epoch"])  # 1-based: the epoch just completed
        g, o = head_losses(record)
        if (epoch - 1) % self.period == 0:  # a window boundary: epochs 1, 1 + n, 1 + 2n, ...
            if self.anchor is not None:
                self._set_weights([self.scale * w for w in blend_weights(self.anchor["G"], self.anchor["O"], g, o)])
            self.anchor = {"epoch": epoch, "G": g, "O": o}
        names = ["w0", "w1", "w_fused"]
        return {**dict(zip(names, used)), **{f"next_{k}": w for k, w in zip(names, self.weights)}}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "weights": list(self.weights), "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        self._set_weights(state["weights"])
        self.anchor = state["anchor"]
