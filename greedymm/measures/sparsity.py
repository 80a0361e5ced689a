"""L1 regularization and sparsity (paper Sec. 6.3, Fig. 4 and 8; SPEC Sec. 11): the penalty lambda * sum |theta|
added to the training loss, and the sparsity rho of a trained model.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def l1_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """sum |theta| over `params` as a 0-d float32 tensor (differentiable; one fused reduction, no host sync).

    Args:
        params: the parameters, e.g. `model.parameters()`.
    Returns:
        The L1 norm of all of them together.
    """
    params = list(params)
    if not params:
        raise ValueError("l1_norm got no parameters")
    return torch.stack(torch._foreach_norm(params, 1)).float().sum()


@torch.no_grad()
def sparsity(model: nn.Module, tau: float = 1e-3) -> float:
    """rho: the fraction of a model's parameter entries with |theta| < tau (paper Sec. 6.3).

    Args:
        model: the trained model (all of its parameters count, as in the L1 penalty).
        tau: the threshold below which an entry counts as zero (> 0).
    Returns:
        rho in [0, 1].
    """
    if not tau > 0:
        raise ValueError(f"tau={tau} must be a positive threshold")
    small = total = 0
    for p in model.parameters():
        small += int((p.abs() < tau).sum())
        total += p.numel()
    if total == 0:
        raise ValueError("sparsity: the model has no parameters")
    return small / total
