"""OPM (on-the-fly prediction modulation; Wei, Hu, Du & Wen, TPAMI 2024), our adaptation to any two-branch fusion
(issue 19; SPEC Sec. 13): after the warm-up, a step drops the dominant modality's features, replacing them by their
running mean (a re-balancing step), with a probability set by the discrepancy ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..measures.evaluate import Outputs
from ..models.mmtm import FusionMode
from .base import MethodSettings, Rebalancing, RebalancingSettings, StepContext, Sweep, register, setting


@dataclass
class OPMSettings(RebalancingSettings):
    """OPM's settings (their defaults: q_base 0.5, lambda 0.5, p_exe 0.7)."""

    opm_q_base: float = setting(0.5, param="OPM_Q_BASE")  # q_base, the drop probability at a discrepancy ratio just above 1
    opm_lambda: float = setting(0.5)  # lambda, how much the discrepancy raises it: q = q_base (1 + lambda tanh(.))
    opm_p_exe: float = setting(0.7)  # p_exe, the probability that the drop is applied to a step at all

    def validate(self) -> None:
        super().validate()
        for name in ("opm_q_base", "opm_p_exe"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name}={value} must be a probability in [0, 1]")
        if not (self.opm_lambda >= 0 and math.isfinite(self.opm_lambda)):
            raise ValueError(f"opm_lambda={self.opm_lambda} must be a finite number >= 0")


def prediction_scores(y0_hat: torch.Tensor, y1_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each modality's mean confidence in the true class, (2,): s_k = mean_i softmax(yk_hat_i)[y_i] (their sums over
    the batch, divided by its size; the ratio is theirs). No host synchronisation.

    Args:
        y0_hat, y1_hat: (B, K) partial logits (MMTM: the branches' heads).
        y: (B,) labels.
    """
    index = y[:, None]  # (B, 1)
    return torch.stack([F.softmax(o.detach().float(), dim=1).gather(1, index).mean() for o in (y0_hat, y1_hat)])


def drop_probabilities(s0: float, s1: float, q_base: float, lam: float) -> Tuple[float, float]:
    """OPM's drop probability of each modality's features (their calcu_q): q_k = min(1, q_base (1 + lam
    tanh(s_k / s_other - 1))) when s_k > s_other (the dominant modality), 0 otherwise; none when neither score is
    known (0 / 0).

    Args:
        s0, s1: the modalities' scores (`prediction_scores`).
        q_base, lam: the settings.
    Returns:
        (q0, q1), at most one of them nonzero.
    """
    q = []
    for mine, other in ((s0, s1), (s1, s0)):
        if not mine > other:  # not dominant, or NaN
            q.append(0.0)
            continue
        ratio = math.tanh(mine / other - 1) if other > 0 else 1.0  # other = 0: tanh(inf)
        q.append(min(1.0, max(0.0, q_base * (1 + lam * ratio))))
    return q[0], q[1]


# Dropping modality k's features is the re-balancing step of the other modality: "re-balance m1 replaces e0".
DROP_MODE = {0: FusionMode.REBALANCE_M1, 1: FusionMode.REBALANCE_M0}


@register
class OPM(Rebalancing):
    """On-the-fly prediction modulation (Wei et al., TPAMI 2024), our adaptation through the contract's fusion modes.

    Every step's partial logits give the scores s_k (`prediction_scores`); after the warm-up, before each step,
    the drop probability q of the dominant modality comes from the last regular step's scores
    (`drop_probabilities`), and the step drops that modality's features with probability p_exe * q: it is then the
    re-balancing step of the other modality (late fusion: the dropped e_k is replaced by its running mean over
    regular steps; MMTM: the other branch sees modality k only through the running mean of its fusion scales).
    Otherwise it is a regular step. The loss is each fusion's own (MMTM: CE(y0_hat) + CE(y1_hat); late: CE(z)).

    Our adaptation: theirs drops each sample's features by its own Bernoulli draw (zeroed, the batch rescaled by
    1 / (1 - theta)) in a batch chosen with probability p_exe, from the current batch's scores. Here the whole batch
    is dropped or kept (the fusion modes act per batch; the expected share of dropped sample-steps is the same,
    p_exe * q), the dropped features are replaced by their mean (so no rescaling), and the scores are those of the
    last regular step (the mode is chosen before the forward pass). The CLS adds up regular steps only, as for guided
    and random. One uniform draw per step after the warm-up, from the method's own seeded generator (saved for an
    exact resume). Logged: opm_s0, opm_s1 (the scores) and opm_p (the drop probability p_exe * q of the step).

    Args:
        settings: OPMSettings (opm_q_base, opm_lambda, opm_p_exe, warmup_epochs).
        seed: seed of the drop's generator.
    """

    name = "opm"
    label = "OPM"
    color = "tab:green"
    order = 9
    Settings = OPMSettings
    sweeps = (Sweep("opm_q_base", (0.1, 0.3, 0.5, 0.7), "OPM base drop probability", "$q_{base}$", "q_base",
                    param="SENS_Q_BASES"),)

    def __init__(self, settings: Optional[MethodSettings] = None, seed: int = 0) -> None:
        super().__init__(settings, seed)
        s = self.settings
        self.warmup_epochs = s.warmup_epochs
        self.q_base, self.lam, self.p_exe = float(s.opm_q_base), float(s.opm_lambda), float(s.opm_p_exe)
        # Not `seed` itself: the global generator, seeded with it, draws the weights and the data order.
        self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 4242)
        self.last_scores: Optional[Tuple[float, float]] = None  # (s0, s1) of the last regular step
        self.p = 0.0  # the drop probability of the current step

    def next_mode(self, ctx: StepContext) -> FusionMode:
        self.p = 0.0
        if ctx.epoch < self.warmup_epochs:
            return FusionMode.FUSED
        u = float(torch.rand((), generator=self.generator))  # one draw per step after the warm-up
        if self.last_scores is None:
            return FusionMode.FUSED
        q = drop_probabilities(*self.last_scores, self.q_base, self.lam)
        dominant = 0 if q[0] > 0 else 1
        self.p = self.p_exe * q[dominant]
        return DROP_MODE[dominant] if u < self.p else FusionMode.FUSED

    def after_backward(self, model: nn.Module, out: Outputs, y: torch.Tensor,
                       ctx: StepContext) -> Dict[str, torch.Tensor]:
        s = prediction_scores(out["y0"], out["y1"], y)  # (2,)
        return {"opm_s0": s[0], "opm_s1": s[1], "opm_p": torch.full((), self.p, device=s.device)}  # a fill: no copy

    def observe(self, ctx: StepContext, record: dict) -> None:
        if ctx.mode is FusionMode.FUSED:
            self.last_scores = (record["opm_s0"], record["opm_s1"])

    def state_dict(self) -> dict:
        return {"schedule": {"generator": self.generator.get_state(), "last_scores": self.last_scores}}

    def load_state_dict(self, state: dict) -> None:
        schedule = state["schedule"]
        self.generator.set_state(schedule["generator"])
        scores = schedule["last_scores"]
        self.last_scores = tuple(scores) if scores is not None else None
