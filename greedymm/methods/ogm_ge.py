"""OGM-GE (Peng et al., CVPR 2022: on-the-fly gradient modulation with generalization enhancement; SPEC Sec. 12-13): in
its home architecture on late fusion, our adaptation on MMTM. After the backward pass and the CLS, the dominant
encoder's convolution gradients are scaled down and Gaussian noise is added to both encoders' (regular steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..measures.evaluate import Outputs
from ..models.two_branch import final_linear
from .base import Method, MethodSettings, StepContext, Sweep, register, setting


@dataclass
class OGMSettings(MethodSettings):
    """OGM-GE's settings (SPEC Sec. 12)."""

    ogm_alpha: float = setting(0.1, param="OGM_ALPHA")  # alpha in k = 1 - tanh(alpha * rho) (theirs: 0.1-0.8)
    ogm_start_epoch: int = 0  # first 0-based epoch the modulation (and its GE noise) acts in
    ogm_end_epoch: Optional[int] = None  # last 0-based epoch it acts in, included as in their code (None: no end)

    def validate(self) -> None:
        if not (self.ogm_alpha >= 0 and math.isfinite(self.ogm_alpha)):
            raise ValueError(f"ogm_alpha={self.ogm_alpha} must be a finite number >= 0 (0 modulates nothing: GE "
                             "noise only)")
        if self.ogm_start_epoch < 0:
            raise ValueError(f"ogm_start_epoch={self.ogm_start_epoch} must be 0 or more")
        if self.ogm_end_epoch is not None and self.ogm_end_epoch < self.ogm_start_epoch:
            raise ValueError(f"ogm_end_epoch={self.ogm_end_epoch} must be at least ogm_start_epoch="
                             f"{self.ogm_start_epoch} (the modulation acts in epochs start..end, both included, as "
                             "their code's `start <= epoch <= end`), or None for no end")


def ogm_coefficients(y0_hat: torch.Tensor, y1_hat: torch.Tensor, y: torch.Tensor,
                     alpha: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OGM's discrepancy ratio and modulation coefficients of one batch (their Eq. 10 and code), as 0-d tensors.

    s_k = sum_i softmax(yk_hat_i)[y_i]; rho = s_0 / s_1. If rho > 1 branch 0 dominates: k_0 = 1 - tanh(alpha * rho),
    k_1 = 1; otherwise (rho = 1 included, as in their code) k_1 = 1 - tanh(alpha / rho), k_0 = 1. When both scores
    underflow to 0 (rho = 0/0) neither branch is modulated. No host synchronisation: torch.where, no Python branch.

    Args:
        y0_hat: (B, K) logits of branch 0.
        y1_hat: (B, K) logits of branch 1.
        y: (B,) labels.
        alpha: the modulation strength (>= 0).
    Returns:
        (rho, k_0, k_1), float32 0-d tensors on the logits' device.
    """
    index = y[:, None]  # (B, 1)
    s0 = F.softmax(y0_hat.detach().float(), dim=1).gather(1, index).sum()  # sum_i p_0(y_i | x_i)
    s1 = F.softmax(y1_hat.detach().float(), dim=1).gather(1, index).sum()
    rho = s0 / s1
    one = torch.ones_like(rho)
    branch0_dominates = rho > 1
    k0 = torch.where(branch0_dominates, 1 - torch.tanh(alpha * rho), one)
    k1 = torch.where(branch0_dominates, one, 1 - torch.tanh(alpha / rho))
    k1 = torch.where(torch.isnan(rho), one, k1)  # 0/0: no information on which branch leads
    return rho, k0, k1


def encoder_weights(branch: nn.Module, head: bool = True) -> List[nn.Parameter]:
    """The weights OGM-GE modulates in a branch: those of its convolutions (the 4-D gradients of their code; not the
    convolutions' biases, the norms, the linear head). A branch without convolutions (an MLP on vectors) gives the
    weights of its linear layers but the final one (`greedymm.models.final_linear`, the head).

    Args:
        branch: an nn.Sequential of named stages (e.g. `TwoBranchNet.branch0`), or a late-fusion encoder.
        head: whether `branch` ends in its head (a TwoBranchNet branch); False for an encoder, which has none.
    Returns:
        The parameters, in module order; empty if the branch has neither.
    """
    convs = [m.weight for m in branch.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if convs:
        return convs
    linears = [m for m in branch.modules() if isinstance(m, nn.Linear)]
    last = final_linear(branch) if linears and head else None
    return [m.weight for m in linears if m is not last]


@register
class OGMGE(Method):
    """OGM-GE (Peng et al., CVPR 2022), on late fusion as in the official code, on MMTM as our adaptation (SPEC Sec.
    12-13).

    Home architecture (`late_concat`, and `late_sum` as their sum fusion): the model's loss alone, CE(z, y); the
    scores s_k come from the partial logits of the split head, z0 = W0 e0 + b/2 and z1 = W1 e1 + b/2 (h0(e0), h1(e1)
    for late_sum), which the late-fusion model returns as (y0_hat, y1_hat); the encoders' convolution weights are
    modulated. MMTM ("OGM-GE (MMTM adaptation)"): the paper's loss CE(y0_hat) + CE(y1_hat), y_k_hat branch k's head.

    Every step is a regular (fused) step with the model's loss. After the backward pass and
    the CLS, before the optimizer step, inside the modulation window: the convolution-weight gradients of the
    dominant branch are multiplied by its k (`ogm_coefficients`); GE then adds Gaussian noise N(0, std(g)) to each
    convolution-weight gradient g of both branches, std(g) being measured on the gradient before modulation, as in
    their code. Outside the window nothing is modulated and no noise is added (their code does the same); rho is
    still logged, with k_0 = k_1 = 1 (the coefficients applied). The CLS's mu is computed by the trainer before this
    hook, so it measures the gradients before modulation and noise.

    Our MMTM adaptation: their late-fusion models give each modality a logit share of the fusion layer; on MMTM
    y_k_hat is branch k's own head, which also sees the other modality through the MMTMs, so the ratio compares two
    heads that both see m0 (run it on late_concat for the method as published). Batch norms, the linear heads and the
    MMTMs are never modulated. A branch without convolutions (an MLP on vectors) has its linear layers but the head
    modulated instead (`encoder_weights`).

    The noise comes from a torch.Generator on the parameters' device, owned by this algorithm and saved in its
    state_dict, so a resumed run draws the same noise as an uninterrupted one.

    Args:
        settings: OGMSettings (ogm_alpha, ogm_start_epoch, ogm_end_epoch).
        seed: seed of the noise generator.
        noise: add the GE noise (False: OGM alone).
    """

    name = "ogm_ge"
    label = "OGM-GE"
    color = "tab:pink"
    order = 6
    Settings = OGMSettings
    sweeps = (Sweep("ogm_alpha", (0.1, 0.3, 0.5, 0.8), "OGM-GE modulation strength", "$\\alpha$", "α",
                    param="SENS_ALPHAS"),)  # their code's range, 0.1-0.8 by dataset

    def __init__(self, settings: Optional[MethodSettings] = None, seed: int = 0, noise: bool = True) -> None:
        super().__init__(settings, seed)
        s = self.settings
        # not self.end_epoch: that name is the Method's end-of-epoch hook
        self.alpha, self.window = float(s.ogm_alpha), (int(s.ogm_start_epoch), s.ogm_end_epoch)
        self.noise = bool(noise)
        self.modulated: Tuple[List[nn.Parameter], List[nn.Parameter]] = ([], [])
        self.generator: Optional[torch.Generator] = None
        self.draws = 0  # noise draws so far: re-seeds the generator if a run resumes on another kind of device

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        if getattr(model, "is_late", False):  # the encoders hold no head: all their convolutions (or linears)
            self.modulated = tuple(encoder_weights(model.encoder(k), head=False) for k in (0, 1))
        else:
            branches = [getattr(model, name, None) for name in ("branch0", "branch1")]
            if any(b is None for b in branches):
                raise TypeError(f"algorithm {self.name!r} modulates the branches `branch0` and `branch1` of a "
                                f"TwoBranchNet; {type(model).__name__} has no such attributes")
            self.modulated = (encoder_weights(branches[0]), encoder_weights(branches[1]))
        for k, params in enumerate(self.modulated):
            if not params:
                raise ValueError(f"algorithm {self.name!r} modulates the convolution weights of each branch (or, "
                                 f"without convolutions, its linear layers but the head), and branch{k} has neither")
        self.generator = torch.Generator(device=self.modulated[0][0].device).manual_seed(self._stream_seed(0))
        return None

    def _stream_seed(self, draws: int) -> int:
        # Not `seed` itself: the global generator, seeded with it, draws the initial weights and the data order, and
        # the noise should not replay those numbers.
        return self.seed * 1_000_003 + 977 + draws

    def active(self, epoch: int) -> bool:
        """Whether the modulation (and the GE noise) applies in this 0-based epoch: start <= epoch <= end, the end
        included as in their code."""
        start, end = self.window
        return epoch >= start and (end is None or epoch <= end)

    @torch.no_grad()
    def after_backward(self, model: nn.Module, out: Outputs, y: torch.Tensor,
                       ctx: StepContext) -> Dict[str, torch.Tensor]:
        """Modulate the dominant branch's convolution-weight gradients and add the GE noise (inside the window).

        Returns:
            {"rho": rho, "k0": k_0, "k1": k_1}: the ratio and the coefficients applied (1 outside the window).
        """
        rho, k0, k1 = ogm_coefficients(out["y0"], out["y1"], y, self.alpha)
        if not self.active(ctx.epoch):
            one = torch.ones_like(rho)
            return {"rho": rho, "k0": one, "k1": one}
        grads0 = [p.grad for p in self.modulated[0] if p.grad is not None]
        grads1 = [p.grad for p in self.modulated[1] if p.grad is not None]
        grads = grads0 + grads1
        if self.noise and grads:
            stds = [g.std() for g in grads]  # of the gradients before modulation, as their code
        # The non-dominant branch is multiplied by exactly 1: its gradients stay bit-identical.
        if grads0:
            torch._foreach_mul_(grads0, k0.to(grads0[0].dtype))
        if grads1:
            torch._foreach_mul_(grads1, k1.to(grads1[0].dtype))
        if self.noise and grads:
            sizes = [g.numel() for g in grads]
            flat = torch.randn(sum(sizes), generator=self.generator, device=grads[0].device, dtype=grads[0].dtype)
            noise = [n.view(g.shape) for n, g in zip(flat.split(sizes), grads)]  # one draw for all gradients
            torch._foreach_addcmul_(grads, noise, stds)  # g <- k g + std(g) * N(0, 1)
            self.draws += 1
        return {"rho": rho, "k0": k0, "k1": k1}

    def state_dict(self) -> dict:
        state = super().state_dict()  # {"schedule": {}}: regular steps only
        if self.generator is not None:
            state.update(generator=self.generator.get_state(), generator_device=self.generator.device.type)
        state["draws"] = self.draws
        return state

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
        if self.generator is None or "generator" not in state:
            return
        if state["generator_device"] == self.generator.device.type:
            self.generator.set_state(state["generator"])
        else:  # CPU and CUDA generators have different states: continue with a fresh, still seeded, stream
            self.generator.manual_seed(self._stream_seed(self.draws))
