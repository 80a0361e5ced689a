"""The conditional learning speed (paper Sec. 3.3; SPEC Sec. 4): mu(G; t) = sum ||grad p||^2 / sum ||p||^2 of the
four parameter groups after each backward pass, their cumulative sums over the regular steps, s(m1|m0), s(m0|m1)
and d_speed.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

CLS_GROUPS = ("m0", "m1", "m0_prime", "m1_prime")


class CLSTracker:
    """Computes mu(G; t) = sum ||grad p||^2 / sum ||p||^2 for the four CLS groups and accumulates them.

    All four mu come from two fused norm reductions (`torch._foreach_norm` over grads and over weights) and one
    small matrix product with the 0/1 group-membership matrix, so a step costs a handful of kernels and no host
    synchronisation; the cumulative sums live on the parameters' device in float64.

    Args:
        groups: the model's `cls_groups()`: a dict with the keys in CLS_GROUPS. Groups may share parameters
            (W_s, b_s are in both primed groups).
    """

    def __init__(self, groups: Dict[str, Sequence[nn.Parameter]]) -> None:
        missing = [g for g in CLS_GROUPS if g not in groups or len(groups[g]) == 0]
        if missing:
            raise ValueError(f"CLS groups {missing} are missing or empty; need non-empty {', '.join(CLS_GROUPS)}")
        index: Dict[int, int] = {}
        self.params: List[nn.Parameter] = []
        for g in CLS_GROUPS:
            for p in groups[g]:
                if id(p) not in index:
                    index[id(p)] = len(self.params)
                    self.params.append(p)
        device = self.params[0].device
        membership = torch.zeros(len(CLS_GROUPS), len(self.params), dtype=torch.float64, device=device)
        for row, g in enumerate(CLS_GROUPS):
            for p in groups[g]:
                membership[row, index[id(p)]] = 1.0
        self.membership = membership  # (4, P)
        self._sub_membership: Dict[tuple, torch.Tensor] = {}  # columns of the parameters that have gradients
        self.sums = torch.zeros(len(CLS_GROUPS), dtype=torch.float64, device=device)  # (4,) cumulative mu

    @torch.no_grad()
    def compute_mu(self) -> torch.Tensor:
        """mu of each group from the current gradients, which must be unscaled (call after backward,
        before the optimizer step).

        Returns:
            (4,) float64 tensor on the parameters' device, ordered as CLS_GROUPS.
        """
        grads = [p.grad for p in self.params]
        members = self.membership
        if any(g is None for g in grads):
            # Unused parameters (W_A in re-balance m0, say) have no gradient: they contribute 0 to the sums.
            keep = tuple(i for i, g in enumerate(grads) if g is not None)
            if keep not in self._sub_membership:  # cached: building the index would copy to the GPU every step
                self._sub_membership[keep] = self.membership[:, list(keep)]
            grads = [grads[i] for i in keep]
            members = self._sub_membership[keep]
        grad_sq = torch.stack(torch._foreach_norm(grads)).double().square() if grads else members.new_zeros(0)
        weight_sq = torch.stack(torch._foreach_norm(self.params)).double().square()  # (P,)
        return (members @ grad_sq) / (self.membership @ weight_sq)  # (4,)

    @torch.no_grad()
    def update(self, mu: torch.Tensor, regular: bool, skipped: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add mu to the cumulative sums if the step was regular and taken, and return the speeds.

        Args:
            mu: (4,) from `compute_mu`.
            regular: True for a fused (regular) step; re-balancing steps are not accumulated (SPEC Sec. 4).
            skipped: 0-d tensor, nonzero when the optimizer step is skipped (fp16 gradients overflowed): such a
                step's mu is inf/NaN and adds nothing. A tensor, so that no host synchronisation is needed.
        Returns:
            (3,) float64 tensor: s(m1|m0), s(m0|m1), d_speed (NaN before the first regular step).
        """
        if regular and skipped is None:
            self.sums += mu
        elif regular:
            self.sums += torch.where(skipped.to(self.sums.device) == 0, mu, torch.zeros_like(mu))
        s_m1_m0 = torch.log10(self.sums[2] / self.sums[0])
        s_m0_m1 = torch.log10(self.sums[3] / self.sums[1])
        return torch.stack([s_m1_m0, s_m0_m1, s_m1_m0 - s_m0_m1])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"sums": self.sums.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.sums = state["sums"].to(self.sums.device, torch.float64).clone()
