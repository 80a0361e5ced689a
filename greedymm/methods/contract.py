"""What the field's balancers (issue 19; SPEC Sec. 12-13) read of a two-branch model beyond its forward pass and
`predict`, through the fusion-agnostic contract: whether the fusion is late, and each encoder's parameters.
"""
from __future__ import annotations

from typing import List

from torch import nn


def is_late(model: nn.Module) -> bool:
    """True for a late-fusion model (one fused loss CE(z, y); SPEC Sec. 13), False for MMTM."""
    return bool(getattr(model, "is_late", False))


def encoder_parameters(model: nn.Module, k: int) -> List[nn.Parameter]:
    """The parameters of encoder k (`model.encoder(k)`: the layers up to the pooled features e_k), in module order.

    Args:
        model: a two-branch model of any fusion.
        k: 0 (m0) or 1 (m1).
    Returns:
        The parameters; ValueError if the encoder has none.
    """
    if k not in (0, 1):
        raise ValueError(f"encoder k={k!r} must be 0 (m0) or 1 (m1)")
    params = list(model.encoder(k).parameters())
    if not params:
        raise ValueError(f"encoder {k} of {type(model).__name__} has no parameters")
    return params
