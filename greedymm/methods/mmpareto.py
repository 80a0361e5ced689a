"""MMPareto (Wei & Hu, ICML 2024: boosting multimodal learning with innocent uni-modal assistance), our adaptation to
any two-branch fusion (issue 19; SPEC Sec. 12-13): a multimodal and two uni-modal losses; per encoder, conflicting
multimodal and uni-modal gradients are combined by the two-objective min-norm (Pareto) weights, rescaled, boosted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..measures.evaluate import Outputs
from .base import Method, MethodSettings, StepContext, Sweep, register, setting
from .contract import encoder_parameters


@dataclass
class MMParetoSettings(MethodSettings):
    """MMPareto's setting."""

    mmpareto_gamma: float = setting(1.5, param="MMPARETO_GAMMA")  # gamma, the magnitude boost of every encoder gradient (their code: 1.5)

    def validate(self) -> None:
        if not (self.mmpareto_gamma > 0 and math.isfinite(self.mmpareto_gamma)):
            raise ValueError(f"mmpareto_gamma={self.mmpareto_gamma} must be a positive finite number (the encoder "
                             "gradients' boost; 1 leaves their magnitude as combined)")


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i <a_i, b_i> over lists of tensors, as a 0-d float64 tensor."""
    return torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)]).sum()


def pareto_combine(g_mm: Sequence[torch.Tensor], g_uni: Sequence[torch.Tensor], gamma: float,
                   g_total: Optional[Sequence[torch.Tensor]] = None
                   ) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One encoder's MMPareto gradient from its multimodal and uni-modal gradients (their Alg. 1 and code).

    cos = <g_mm, g_u> / (|g_mm| |g_u|) over the whole encoder. No conflict (cos >= 0): each tensor's gradient is
    gamma (g_mm + g_u), the plain sum boosted. Conflict (cos < 0): the min-norm weight of the multimodal gradient
    w = <g_u, g_u - g_mm> / |g_mm - g_u|^2 (in (0, 1) under a conflict), the direction n = 2 (w g_mm + (1 - w) g_u)
    per tensor, whose norm is raised to that of the tensor's summed gradient when smaller: gamma * max(1,
    |g_mm + g_u| / |n|) * n. Their code treats cos = 0 as a conflict; a measure-zero difference.

    Args:
        g_mm: the multimodal gradient of each of the encoder's parameter tensors.
        g_uni: the uni-modal gradient of each, in the same order and shapes.
        gamma: the magnitude boost.
        g_total: the summed gradient of each tensor, when known (g_mm + g_u otherwise).
    Returns:
        (the new gradients, cos, w) with cos and w 0-d float64 tensors (w = 0.5 without conflict).
    """
    uu, mm, um = _dot(g_uni, g_uni), _dot(g_mm, g_mm), _dot(g_uni, g_mm)
    cos = um / (uu * mm).sqrt().clamp_min(1e-300)  # 0 when either gradient is 0: no conflict
    conflict = um < 0
    w = torch.where(conflict, (uu - um) / (uu + mm - 2 * um).clamp_min(1e-300), torch.full_like(um, 0.5))
    out = []
    totals = g_total if g_total is not None else [a + b for a, b in zip(g_mm, g_uni)]
    for a, b, total in zip(g_mm, g_uni, totals):  # total: what the summed losses ask of this tensor
        wa = w.to(a.dtype)
        n = 2 * (wa * a + (1 - wa) * b)
        n_norm, t_norm = n.norm(), total.norm()
        factor = torch.where(n_norm > 0, (t_norm / n_norm.clamp_min(1e-30)).clamp_min(1.0), torch.ones_like(n_norm))
        out.append(gamma * torch.where(conflict, n * factor, total))
    return out, cos, w


@register
class MMPareto(Method):
    """MMPareto (Wei & Hu, ICML 2024) on any two-branch fusion, our adaptation (issue 19).

    The loss is L_mm + L_0 + L_1, the multimodal loss L_mm = CE(model.predict(y0_hat, y1_hat)) (MMTM: the mean of the
    branches' logits; late fusion: z) and the uni-modal losses L_k = CE(yk_hat) (MMTM: branch k's head; late fusion:
    the partial logits z_k). Per encoder k (`model.encoder(k)`): its uni-modal gradient g_u = grad L_k and its
    multimodal gradient g_mm = grad (L - L_k) are combined by `pareto_combine`; every other parameter (heads, MMTMs,
    the late-fusion layer) keeps the plain sum's gradient.

    Our adaptation: on late fusion L_{1-k} does not reach encoder k, and g_mm is grad L_mm as in their code. On MMTM
    the other branch's uni-modal loss reaches encoder k through the MMTMs; it is cross-modal learning, so it is
    counted with the multimodal gradient (g_mm + g_u is then the whole gradient of encoder k, as in their code).
    The uni-modal gradients come from two extra partial backward passes (`torch.autograd.grad`, retained graph),
    taken without the fp16 loss scale. The CLS is measured by the trainer on the summed loss's gradient, before the
    combination (what the three losses ask for). Logged: cos0, cos1 (multimodal vs uni-modal gradient of encoder k)
    and w_mm0, w_mm1 (the weight of its multimodal gradient; 0.5 without conflict). Regular (fused) steps only.

    Args:
        settings: MMParetoSettings (mmpareto_gamma).
        seed: unused (deterministic).
    """

    name = "mmpareto"
    label = "MMPareto"
    color = "tab:red"
    order = 8
    Settings = MMParetoSettings
    sweeps = (Sweep("mmpareto_gamma", (1.0, 1.5, 2.0), "MMPareto magnitude boost", "$\\gamma$", "γ",
                    param="SENS_GAMMAS"),)  # ours

    def __init__(self, settings: Optional[MethodSettings] = None, seed: int = 0) -> None:
        super().__init__(settings, seed)
        self.gamma = float(self.settings.mmpareto_gamma)
        self.encoders: Tuple[List[nn.Parameter], List[nn.Parameter]] = ([], [])
        self._uni: List[List[Optional[torch.Tensor]]] = [[], []]  # this step's uni-modal gradients per encoder

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self.encoders = (encoder_parameters(model, 0), encoder_parameters(model, 1))
        return None

    def forward(self, model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, ctx: StepContext) -> Outputs:
        out = super().forward(model, x0, x1, ctx)
        out["fused"] = out["z"] if "z" in out else model.predict(out["y0"], out["y1"])  # (B, K)
        return out

    def loss(self, out: Outputs, y: torch.Tensor, ctx: StepContext) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """L_mm + L_0 + L_1.

        Returns:
            (loss, {"loss_mm": L_mm, "loss0": L_0, "loss1": L_1}).
        """
        loss_mm = F.cross_entropy(out["fused"].float(), y)
        loss0 = F.cross_entropy(out["y0"].float(), y)
        loss1 = F.cross_entropy(out["y1"].float(), y)
        return loss_mm + loss0 + loss1, {"loss_mm": loss_mm, "loss0": loss0, "loss1": loss1}

    def backward(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor], ctx: StepContext) -> None:
        """The uni-modal gradients of each encoder (kept for `after_backward`), then the summed loss's backward."""
        for k in (0, 1):
            grads = torch.autograd.grad(terms[f"loss{k}"], self.encoders[k], retain_graph=True, allow_unused=True)
            self._uni[k] = list(grads)
        loss.backward()

    @torch.no_grad()
    def after_backward(self, model: nn.Module, out: Outputs, y: torch.Tensor,
                       ctx: StepContext) -> Dict[str, torch.Tensor]:
        """Replace each encoder's gradients by `pareto_combine` of its multimodal and uni-modal ones.

        Returns:
            {"cos0", "cos1", "w_mm0", "w_mm1"}.
        """
        logs: Dict[str, torch.Tensor] = {}
        for k in (0, 1):
            pairs = [(p, u) for p, u in zip(self.encoders[k], self._uni[k]) if p.grad is not None]
            if not pairs:  # no gradient reached the encoder: nothing to combine
                logs[f"cos{k}"] = torch.zeros((), device=y.device)
                logs[f"w_mm{k}"] = torch.full((), 0.5, device=y.device)
                continue
            total = [p.grad for p, _ in pairs]
            uni = [u if u is not None else torch.zeros_like(p.grad) for p, u in pairs]
            multi = torch._foreach_sub(total, uni)
            new, cos, w = pareto_combine(multi, uni, self.gamma, total)
            for (p, _), g in zip(pairs, new):
                p.grad.copy_(g)
            logs[f"cos{k}"], logs[f"w_mm{k}"] = cos, w
        self._uni = [[], []]
        return logs
