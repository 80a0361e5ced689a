"""What the field's balancers (issue 19; SPEC Sec. 12-13) read of a two-branch model through the fusion-agnostic
contract: each encoder's parameters, the fused logits of the partial logits, and whether the fusion is late.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..models.two_branch import final_linear


def is_late(model: nn.Module) -> bool:
    """True for a late-fusion model (one fused loss CE(z, y); SPEC Sec. 13), False for MMTM."""
    return bool(getattr(model, "is_late", False))


def encoder_parameters(model: nn.Module, k: int) -> List[nn.Parameter]:
    """The parameters of encoder k (the branch's layers up to its pooled features e_k), in module order.

    Args:
        model: a two-branch model (`model.encoder(k)`; an MMTM TwoBranchNet without it: branch k but its head).
        k: 0 (m0) or 1 (m1).
    Returns:
        The parameters; ValueError if the encoder has none.
    """
    if k not in (0, 1):
        raise ValueError(f"encoder k={k!r} must be 0 (m0) or 1 (m1)")
    if hasattr(model, "encoder"):
        params = list(model.encoder(k).parameters())
    else:  # an MMTM TwoBranchNet before the contract: the branch without its final linear layer
        branch = getattr(model, f"branch{k}")
        head = {id(p) for p in final_linear(branch).parameters()}
        params = [p for p in branch.parameters() if id(p) not in head]
    if not params:
        raise ValueError(f"encoder {k} of {type(model).__name__} has no parameters")
    return params


def fused_logits(model: nn.Module, y0_hat: torch.Tensor, y1_hat: torch.Tensor) -> torch.Tensor:
    """The model's prediction from its partial logits (B, K) each: MMTM their mean, late fusion their sum z."""
    return model.predict(y0_hat, y1_hat)
