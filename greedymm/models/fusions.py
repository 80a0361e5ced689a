"""The fusions a two-branch model can have (SPEC Sec. 2 and 13), registered by name in one place: "mmtm" (the
paper's MMTM-fused branches) and the late fusions "late_concat" and "late_sum" (our extension).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

from torch import nn

from ..registry import FUSIONS
from .late_fusion import LateFusionNet
from .two_branch import TwoBranchNet


@dataclass(frozen=True)
class FusionSpec:
    """A registered fusion."""

    name: str  # registry key, a run's `fusion` setting
    label: str  # display name in tables and figures
    late: bool  # one fused loss CE(z, y) and a prediction z = z0 + z1 (False: MMTM's two branch losses)
    description: str  # one line for listings and docs
    from_two_branch: Callable[[TwoBranchNet], nn.Module]  # the model of this fusion from an MMTM model's branches
    order: int = 100  # position in listings


def register_fusion(spec: FusionSpec) -> FusionSpec:
    """Register a fusion under `spec.name`."""
    FUSIONS.add(spec.name, spec)
    return spec


def get_fusion(name: str) -> FusionSpec:
    """The spec of a registered fusion; ValueError naming the allowed ones for an unknown name."""
    return FUSIONS.get(name)


def fusion_names() -> List[str]:
    """The registered fusions, "mmtm" first."""
    return FUSIONS.names()


def model_fusion(model: nn.Module) -> str:
    """The fusion of a two-branch model: its `fusion` attribute ("mmtm" for a model without one)."""
    return getattr(model, "fusion", "mmtm")


def as_fusion(model: nn.Module, fusion: str) -> nn.Module:
    """A two-branch model with fusion `fusion`: `model` itself when it has it already, else (from an MMTM
    `TwoBranchNet`, e.g. a zoo model or a user's factory) that fusion's model built from its branches.

    Args:
        model: a freshly built two-branch model.
        fusion: a registered fusion.
    Returns:
        The model (sharing `model`'s branch modules when converted; the MMTMs are dropped).
    """
    spec = get_fusion(fusion)
    if model_fusion(model) == spec.name:
        return model
    if not isinstance(model, TwoBranchNet):
        raise ValueError(f"fusion={fusion!r}: the model ({type(model).__name__}) has fusion "
                         f"{model_fusion(model)!r} and is no TwoBranchNet to build the {fusion!r} model from; "
                         f"give a model of fusion {fusion!r} or a TwoBranchNet")
    return spec.from_two_branch(model)


register_fusion(FusionSpec("mmtm", "MMTM", False, "MMTM after the fusion stages, two branch heads (the paper's)",
                           lambda two: two, order=0))
register_fusion(FusionSpec("late_concat", "late concat", True, "one linear layer on the pooled features [e0; e1]",
                           lambda two: LateFusionNet.from_branches(two.branch0, two.branch1, "late_concat"), order=1))
register_fusion(FusionSpec("late_sum", "late sum", True, "a linear head per modality, summed: h0(e0) + h1(e1)",
                           lambda two: LateFusionNet.from_branches(two.branch0, two.branch1, "late_sum"), order=2))
