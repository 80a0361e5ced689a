"""Vanilla multi-modal training (paper Sec. 5; SPEC Sec. 2 and 5): the two-branch model, the loss CE(y0_hat, y) +
CE(y1_hat, y), and regular (fused) steps only: `Method`'s own behaviour, registered as a Table-1 row.
"""
from __future__ import annotations

from .base import Method, register


@register
class Vanilla(Method):
    """Every step is a regular step; the greedy learner of the paper's Sec. 6.2."""

    name = "vanilla"
    label = "vanilla"
    color = "tab:gray"
    paper_row = True
    order = 2
