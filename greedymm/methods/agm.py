"""AGM (adaptive gradient modulation; Li et al., ICCV 2023), our adaptation to any two-branch fusion (issue 19; SPEC
Sec. 13): Shapley mono-modal responses of the fused prediction give each modality's score, and each encoder's
gradients are scaled by how far the current score gap departs from its running average.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..measures.evaluate import Outputs
from ..models.mmtm import FusionMode
from ..models.two_branch import frozen_norm_stats
from .base import Method, MethodSettings, StepContext, Sweep, register, setting
from .contract import encoder_parameters, is_late

# A response's probability of the true class is floored here before its log (their code: 1e-8).
MIN_PROB = 1e-8
# The exponent alpha * (eta - r) is capped here (their two-modality code: 10).
MAX_GAP = 10.0


@dataclass
class AGMSettings(MethodSettings):
    """AGM's setting."""

    agm_alpha: float = setting(0.1, param="AGM_ALPHA")  # alpha in kappa_k = exp(alpha min(eta_k - r_k, 10)) (ours; theirs is per dataset)

    def validate(self) -> None:
        if not (self.agm_alpha >= 0 and math.isfinite(self.agm_alpha)):
            raise ValueError(f"agm_alpha={self.agm_alpha} must be a finite number >= 0 (0 modulates nothing)")


def shapley_responses(model: nn.Module, y0_hat: torch.Tensor, y1_hat: torch.Tensor,
                      y0_alone: torch.Tensor, y1_alone: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two modalities' Shapley responses of the fused prediction P = model.predict (linear in its inputs).

    v({0,1}) = P(y0_hat, y1_hat); v({k}) = P of branch k's logits when the other modality is absent (its partial
    logits 0, and branch k sees it only through its running mean: `y0_alone`, `y1_alone`); v({}) = P(0, 0) = 0.
    phi_0 = [(v({0,1}) - v({1})) + (v({0}) - v({}))] / 2, phi_1 likewise; phi_0 + phi_1 = v({0,1}).

    Args:
        model: the two-branch model (its `predict`).
        y0_hat, y1_hat: (B, K) partial logits of the regular pass.
        y0_alone, y1_alone: (B, K) branch k's logits with the other modality at its mean (late fusion: y_k_hat).
    Returns:
        (phi_0, phi_1), (B, K) each.
    """
    zero = torch.zeros_like(y0_hat)
    full, only0, only1 = model.predict(y0_hat, y1_hat), model.predict(y0_alone, zero), model.predict(zero, y1_alone)
    return (full - only1 + only0) / 2, (full - only0 + only1) / 2


def response_scores(phi0: torch.Tensor, phi1: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each response's mean CE with the true class floored at MIN_PROB, (2,) float64: s_k = mean_i -log max(
    softmax(phi_k_i)[y_i], 1e-8)."""
    index = y[:, None]
    return torch.stack([-F.softmax(p.detach().float(), 1).gather(1, index).clamp_min(MIN_PROB).log().mean()
                        for p in (phi0, phi1)]).double()


def agm_coefficients(s: torch.Tensor, s_avg: torch.Tensor, alpha: float) -> torch.Tensor:
    """AGM's gradient coefficients (their two-modality code), (2,): r_0 = exp(s_1 - s_0), eta_0 = exp(avg s_1 -
    avg s_0) (r_1, eta_1 the other way round), kappa_k = exp(alpha min(eta_k - r_k, 10)).

    Args:
        s: (2,) this step's scores (`response_scores`).
        s_avg: (2,) their running averages over the previous steps (0 before the first).
        alpha: the modulation strength.
    """
    r = torch.exp(torch.stack([s[1] - s[0], s[0] - s[1]]))
    eta = torch.exp(torch.stack([s_avg[1] - s_avg[0], s_avg[0] - s_avg[1]]))
    return torch.exp(alpha * (eta - r).clamp(max=MAX_GAP))


@register
class AGM(Method):
    """Adaptive gradient modulation (Li et al., ICCV 2023) on any two-branch fusion, our adaptation.

    Every step is regular, with each fusion's own loss (MMTM: CE(y0_hat) + CE(y1_hat); late: CE(z)). The Shapley
    responses phi_k of the fused prediction (`shapley_responses`) give the scores s_k (`response_scores`); after
    the backward pass and the CLS the gradients of encoder k's weights (its parameters of 2 or more dimensions, as
    in the benchmark's port) are multiplied by kappa_k (`agm_coefficients`); then the running averages of the
    scores over all steps so far take this step's.

    Our adaptation: theirs pads a missing modality's input with zeros and scales the responses' gradients by hooks;
    here an absent modality contributes no partial logits and the remaining branch sees it only through its running
    mean (the contract's re-balance modes), and the encoders' gradients are scaled directly (as the benchmark's
    port). On late fusion a branch's partial logits do not depend on the other modality, so phi_k = z_k and no
    extra pass is run; on MMTM the two re-balance passes run without gradient and without moving the batch norms'
    statistics. Their gradient clipping of the fusion layer is left out. Logged: agm_s0, agm_s1, agm_k0, agm_k1.

    Args:
        settings: AGMSettings (agm_alpha).
        seed: unused (deterministic).
    """

    name = "agm"
    label = "AGM"
    color = "teal"  # tab:cyan is uni-modal m1
    order = 11
    Settings = AGMSettings
    sweeps = (Sweep("agm_alpha", (0.05, 0.1, 0.3, 1.0), "AGM modulation strength", "$\\alpha$", "α", log_x=True,
                    param="SENS_AGM_ALPHAS"),)

    def __init__(self, settings: Optional[MethodSettings] = None, seed: int = 0) -> None:
        super().__init__(settings, seed)
        self.alpha = float(self.settings.agm_alpha)
        self.weights: Tuple[List[nn.Parameter], List[nn.Parameter]] = ([], [])
        self.s_avg = torch.zeros(2, dtype=torch.float64)  # running averages of s_0, s_1 over the steps so far

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self.weights = tuple([p for p in encoder_parameters(model, k) if p.dim() >= 2] for k in (0, 1))
        for k, params in enumerate(self.weights):
            if not params:
                raise ValueError(f"algorithm {self.name!r} scales the weights of encoder {k}, which has none")
        self.s_avg = self.s_avg.to(self.weights[0][0].device)
        return None

    def forward(self, model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, ctx: StepContext) -> Outputs:
        out = super().forward(model, x0, x1, ctx)
        y0_hat, y1_hat = out["y0"].detach(), out["y1"].detach()
        if is_late(model):  # z_k reads e_k only, so v({k}) = z_k and the Shapley responses are z_0, z_1 exactly
            out["phi0"], out["phi1"] = y0_hat, y1_hat
            return out
        with torch.no_grad(), frozen_norm_stats(model):  # after the regular pass, which fills the running means
            alone0 = model(x0, x1, FusionMode.REBALANCE_M0)[0]
            alone1 = model(x0, x1, FusionMode.REBALANCE_M1)[1]
        out["phi0"], out["phi1"] = shapley_responses(model, y0_hat, y1_hat, alone0, alone1)
        return out

    @torch.no_grad()
    def after_backward(self, model: nn.Module, out: Outputs, y: torch.Tensor,
                       ctx: StepContext) -> Dict[str, torch.Tensor]:
        """Scale each encoder's weight gradients by its kappa; update the running scores.

        Returns:
            {"agm_s0", "agm_s1", "agm_k0", "agm_k1"}.
        """
        s = response_scores(out["phi0"], out["phi1"], y).to(self.s_avg.device)  # (2,)
        kappa = agm_coefficients(s, self.s_avg, self.alpha)  # (2,)
        for k in (0, 1):
            grads = [p.grad for p in self.weights[k] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, kappa[k].to(grads[0].dtype))
        t = ctx.step  # 1-based: the average over steps 1..t
        self.s_avg = self.s_avg * ((t - 1) / t) + s / t
        return {"agm_s0": s[0], "agm_s1": s[1], "agm_k0": kappa[0], "agm_k1": kappa[1]}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "s_avg": self.s_avg.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.s_avg = state["s_avg"].to(self.s_avg.device, torch.float64).clone()
