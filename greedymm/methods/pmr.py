"""PMR (prototypical modal rebalance; Fan et al., CVPR 2023), our adaptation to any two-branch fusion (issue 19; SPEC
Sec. 13): class prototypes of each encoder's features; a prototype-based CE accelerates the slow modality and an
entropy regulariser of the fast one's prototype distribution slows it, weighted by the prototype discrepancy ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..measures.evaluate import Outputs
from .base import Method, MethodSettings, StepContext, Sweep, register, setting


@dataclass
class PMRSettings(MethodSettings):
    """PMR's settings (ours: their code's names alpha, mu, momentum_coef, norm_epoch)."""

    pmr_alpha: float = setting(1.0, param="PMR_ALPHA")  # alpha, the weight of the slow modality's prototypical CE
    pmr_mu: float = setting(0.01)  # mu, the weight of the fast modality's prototype entropy (PER)
    pmr_momentum: float = setting(0.0)  # the old prototypes' share when an epoch's new ones replace them
    pmr_per_epochs: int = setting(5)  # the PER acts in the first epochs the prototypes exist (epochs 1..this)

    def validate(self) -> None:
        for name in ("pmr_alpha", "pmr_mu"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value} must be a finite number >= 0")
        if not 0 <= self.pmr_momentum < 1:
            raise ValueError(f"pmr_momentum={self.pmr_momentum} must be in [0, 1) (the old prototypes' share)")
        if self.pmr_per_epochs < 0:
            raise ValueError(f"pmr_per_epochs={self.pmr_per_epochs} must be 0 or more")


def prototype_logits(e: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The prototypical logits -||e_i - c_j||_2: (B, F) features and (K, F) prototypes -> (B, K)."""
    return -torch.cdist(e.float(), prototypes.float())


def pmr_coefficients(s0: torch.Tensor, s1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The weights (b0, b1) of the modalities' prototypical CE (their beta and lambda), from their prototype scores.

    With rho = s0 / s1: rho >= 1 (m0 leads) gives b0 = 0, b1 = clip(rho - 1, 0, 1); rho < 1 gives b0 = clip(1 / rho
    - 1, 0, 1), b1 = 0. The fast modality's PER weight is the slow one's b. 0 / 0 gives (0, 0).

    Args:
        s0, s1: 0-d scores sum_i softmax(prototype_logits)_i[y_i] of m0 and m1.
    Returns:
        (b0, b1), 0-d tensors.
    """
    b0 = (s1 / s0 - 1).clamp(0, 1)
    b1 = (s0 / s1 - 1).clamp(0, 1)
    zero = torch.zeros_like(b0)
    return torch.where(torch.isnan(b0), zero, b0), torch.where(torch.isnan(b1), zero, b1)


def prototype_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The mean entropy of softmax(logits) over the batch: (B, K) -> 0-d (their PER, a mean instead of their sum)."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


@register
class PMR(Method):
    """Prototypical modal rebalance (Fan et al., CVPR 2023) on any two-branch fusion, our adaptation.

    Prototypes c^k_j: the class means of encoder k's pooled features e_k (`return_features`), from the features seen
    during the previous epoch's training steps, blended with the older ones by `pmr_momentum`; from the second epoch
    on, the loss is each fusion's own (MMTM: CE(y0_hat) + CE(y1_hat); late: CE(z)) plus
        alpha (b0 PCE_0 + b1 PCE_1) - mu (b1 PER_0 + b0 PER_1)   (PER only in the first `pmr_per_epochs` of them),
    with PCE_k = CE(-||e_k - c^k||, y), PER_k the mean entropy of softmax(-||e_k - c^k||), and (b0, b1) from the
    prototype scores of the batch (`pmr_coefficients`: only the slow modality's b is nonzero).

    Our adaptation: theirs recomputes the prototypes at each epoch's start in a pass over a tenth of D_train (eval
    mode); here they are the class means of the training features of the previous epoch (train mode, the weights
    moving), which costs no pass; a class absent from an epoch keeps its prototype. Their PER is a sum over the
    batch; here a mean, at the scale of the CE terms. The CLS measures the gradients of this loss (nothing is
    modulated after the backward pass). Logged: pce0, pce1, per0, per1 (0 before the prototypes exist) and pmr_b0,
    pmr_b1. Regular (fused) steps only.

    Args:
        settings: PMRSettings (pmr_alpha, pmr_mu, pmr_momentum, pmr_per_epochs).
        seed: unused (deterministic).
    """

    name = "pmr"
    label = "PMR"
    color = "goldenrod"  # tab:olive is uni-modal m0
    order = 10
    Settings = PMRSettings
    sweeps = (Sweep("pmr_alpha", (0.5, 1.0, 2.0), "PMR prototypical CE weight", "$\\alpha$", "α",
                    param="SENS_PMR_ALPHAS"),)

    def __init__(self, settings: Optional[MethodSettings] = None, seed: int = 0) -> None:
        super().__init__(settings, seed)
        s = self.settings
        self.alpha, self.mu, self.momentum = float(s.pmr_alpha), float(s.pmr_mu), float(s.pmr_momentum)
        self.per_epochs = int(s.pmr_per_epochs)
        self.prototypes: Optional[List[torch.Tensor]] = None  # [(K, F0), (K, F1)] in use this epoch
        self.since: Optional[int] = None  # the 0-based epoch the prototypes were first used in
        self.sums: Optional[List[torch.Tensor]] = None  # this epoch's per-class feature sums [(K, F0), (K, F1)]
        self.counts: Optional[torch.Tensor] = None  # (K,) samples per class this epoch
        self.device = torch.device("cpu")  # the model's, after setup

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self.device = next(model.parameters()).device
        return None

    def forward(self, model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, ctx: StepContext) -> Outputs:
        y0_hat, y1_hat, (e0, e1) = model(x0, x1, ctx.mode, return_features=True)
        out = {"y0": y0_hat, "y1": y1_hat, "e0": e0, "e1": e1}
        if getattr(model, "is_late", False):
            out["z"] = model.predict(y0_hat, y1_hat)
        return out

    @torch.no_grad()
    def _accumulate(self, e0: torch.Tensor, e1: torch.Tensor, y: torch.Tensor, classes: int) -> None:
        """Add the batch's features to this epoch's per-class sums (no host synchronisation)."""
        if self.sums is None:
            self.sums = [e0.new_zeros(classes, e0.shape[1], dtype=torch.float32),
                         e1.new_zeros(classes, e1.shape[1], dtype=torch.float32)]
            self.counts = e0.new_zeros(classes, dtype=torch.float32)
        for k, e in enumerate((e0, e1)):  # index_add_, not one_hot: no check of y on the host
            self.sums[k].index_add_(0, y, e.detach().float())  # (K, F_k)
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float32))

    def loss(self, out: Outputs, y: torch.Tensor, ctx: StepContext) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The fusion's loss plus the prototypical terms.

        Returns:
            (loss, the fusion's terms and pce0, pce1, per0, per1, pmr_b0, pmr_b1).
        """
        loss, terms = super().loss(out, y, ctx)
        self._accumulate(out["e0"], out["e1"], y, out["y0"].shape[1])
        zero = loss.new_zeros(())
        if self.prototypes is None:
            return loss, {**terms, "pce0": zero, "pce1": zero, "per0": zero, "per1": zero, "pmr_b0": zero,
                          "pmr_b1": zero}
        logits = [prototype_logits(out[f"e{k}"], self.prototypes[k]) for k in (0, 1)]  # (B, K) each
        index = y[:, None]
        s0, s1 = (F.softmax(o.detach(), dim=1).gather(1, index).sum() for o in logits)
        b0, b1 = pmr_coefficients(s0, s1)
        pce0, pce1 = (F.cross_entropy(o, y) for o in logits)
        loss = loss + self.alpha * (b0 * pce0 + b1 * pce1)
        per0, per1 = zero, zero
        if self.since is not None and ctx.epoch < self.since + self.per_epochs:
            per0, per1 = prototype_entropy(logits[0]), prototype_entropy(logits[1])
            loss = loss - self.mu * (b1 * per0 + b0 * per1)  # the fast modality's entropy raised
        return loss, {**terms, "pce0": pce0, "pce1": pce1, "per0": per0, "per1": per1, "pmr_b0": b0, "pmr_b1": b1}

    @torch.no_grad()
    def end_epoch(self, record: dict, ctx: StepContext) -> dict:
        """The next epoch's prototypes from this epoch's class means (blended with the old ones)."""
        if self.sums is None:
            return {}
        counts = self.counts[:, None]  # (K, 1)
        new = []
        for k in (0, 1):
            mean = self.sums[k] / counts.clamp_min(1)
            old = self.prototypes[k] if self.prototypes is not None else mean
            blended = (1 - self.momentum) * mean + self.momentum * old if self.prototypes is not None else mean
            new.append(torch.where(counts > 0, blended, old))  # an absent class keeps its prototype
        self.prototypes = new
        if self.since is None:
            self.since = ctx.epoch + 1
        self.sums, self.counts = None, None
        return {}

    def state_dict(self) -> dict:
        def cpu(ts):
            return [t.detach().cpu().clone() for t in ts] if ts is not None else None
        return {**super().state_dict(), "prototypes": cpu(self.prototypes), "since": self.since,
                "sums": cpu(self.sums), "counts": cpu([self.counts])[0] if self.counts is not None else None}

    def load_state_dict(self, state: dict) -> None:
        def dev(ts):
            return [t.to(self.device) for t in ts] if ts is not None else None
        self.prototypes, self.since, self.sums = dev(state["prototypes"]), state["since"], dev(state["sums"])
        self.counts = state["counts"].to(self.device) if state["counts"] is not None else None
