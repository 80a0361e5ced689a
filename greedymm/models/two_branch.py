"""The two-branch multi-modal network with MMTM fusion (paper Sec. 3.1, 5.2; SPEC Sec. 2 and 9): two branches of
named stages (the zoo's or any user's) joined by MMTMs, the parameter groups of the CLS, and the uni-modal network
with SE blocks in place of the MMTMs.
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .mmtm import MMTM, FusionMode, SqueezeExcite

Features = Tuple[torch.Tensor, torch.Tensor]  # the pooled features (e0, e1) entering the branches' final layers


def _stage_channels(stage: nn.Module) -> Optional[int]:
    """Output channels of a stage: those of its last conv, batch/group norm or linear layer; None if it has none."""
    channels = None
    for m in stage.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            channels = m.num_features
        elif isinstance(m, nn.GroupNorm):
            channels = m.num_channels
        elif isinstance(m, nn.modules.conv._ConvNd):
            channels = m.out_channels
        elif isinstance(m, nn.Linear):
            channels = m.out_features
    return channels


def final_linear(branch: nn.Module) -> nn.Linear:
    """The last nn.Linear of a branch's last stage: the layer whose input is the branch's pooled features.

    Args:
        branch: an nn.Sequential of named stages (e.g. `TwoBranchNet.branch0`).
    Returns:
        The nn.Linear (its in_features is the size F of the pooled features).
    """
    children = list(branch.named_children())
    if not children:
        raise ValueError(f"the branch ({type(branch).__name__}) has no stages")
    name, last = children[-1]
    linears = [m for m in last.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"the branch's last stage {name!r} ({type(last).__name__}) has no nn.Linear: the pooled "
                         "features (return_features, RUBi) are the input of the final linear layer, so the last "
                         "stage must end in one, e.g. pool, flatten, nn.Linear(F, K)")
    return linears[-1]


def strip_final_linear(branch: nn.Sequential) -> Tuple[nn.Sequential, nn.Linear]:
    """A branch's encoder: the same modules (shared, not copied) with its final linear layer left out.

    The branch's last stage holds the final nn.Linear (`final_linear`), directly or in nested nn.Sequentials (the
    zoo's `head` = pool, flatten, linear); the containers on the way to it are rebuilt without it, the rest is the
    branch's own modules.

    Args:
        branch: an nn.Sequential of named stages whose last stage ends in the nn.Linear(F, K).
    Returns:
        (encoder: x -> pooled features (B, F), the removed nn.Linear).
    """
    head = final_linear(branch)  # ValueError if the last stage has no nn.Linear
    return _without(branch, head), head


def _without(container: nn.Sequential, target: nn.Module) -> nn.Sequential:
    """A new nn.Sequential of `container`'s children with `target` dropped (searched in its last child)."""
    children = list(container.named_children())
    name, last = children[-1]
    kept: "OrderedDict[str, nn.Module]" = OrderedDict(children[:-1])
    if last is target:
        pass
    elif isinstance(last, nn.Sequential) and any(m is target for m in last.modules()):
        kept[name] = _without(last, target)
    else:
        raise ValueError(f"the final linear layer sits inside {type(last).__name__} {name!r}, which is not an "
                         "nn.Sequential: a late-fusion encoder needs it as the last module of nested nn.Sequentials, "
                         "e.g. a last stage (pool, flatten, nn.Linear(F, K))")
    return nn.Sequential(kept)


def _fusion_pair(entry: Union[int, Sequence[int]], stage: str) -> Tuple[int, int]:
    """A fusion_channels entry, C or (C_A, C_B), as (C_A, C_B)."""
    if not isinstance(entry, Sequence):
        return int(entry), int(entry)
    pair = tuple(int(c) for c in entry)
    if len(pair) != 2:
        raise ValueError(f"fusion_channels entry {entry!r} of stage {stage!r} must be C or a pair (C_A, C_B)")
    return pair  # type: ignore[return-value]


class TwoBranchNet(nn.Module):
    """Branch phi0 sees m0, branch phi1 sees m1; an MMTM joins them after each stage in `fusion_stages`.

    Both branches are nn.Sequential with the same stage names; their architectures may differ (e.g. an MLP on
    vectors and a CNN on images), and so may their channels at a fusion stage (C_A for branch 0, C_B for
    branch 1). Features may be vectors (B, C), sequences (B, C, T), images (B, C, H, W) or volumes
    (B, C, D, H, W). The last stage returns the logits. The forward returns (y0_hat, y1_hat); the model's
    prediction is their mean (`predict`). The fusion-agnostic contract (shared with the late-fusion nets,
    `greedymm.models.late_fusion`): `fusion` ("mmtm"), `is_late` (False: the loss is CE(y0_hat) + CE(y1_hat)),
    `predict`, `encoder(k)`, `cls_groups()`, `has_running_scales`.

    Args:
        branch0: the m0 branch.
        branch1: the m1 branch.
        fusion_stages: names of the stages after which an MMTM fuses the branches.
        fusion_channels: per fusion stage, C (both branches) or (C_A, C_B); if None, inferred from each stage's
            last conv (out_channels), batch/group norm or linear layer (out_features).
        ratio: the MMTM bottleneck ratio.
    """

    fusion = "mmtm"  # the fusion's registered name (greedymm.models.fusions)
    is_late = False  # two branch losses, not one fused loss

    def __init__(self, branch0: nn.Sequential, branch1: nn.Sequential, fusion_stages: Sequence[str],
                 fusion_channels: Optional[Sequence[Union[int, Sequence[int]]]] = None, ratio: int = 4) -> None:
        super().__init__()
        if not isinstance(branch0, nn.Sequential) or not isinstance(branch1, nn.Sequential):
            raise TypeError("branch0 and branch1 must be nn.Sequential modules of named stages, got "
                            f"{type(branch0).__name__} and {type(branch1).__name__}")
        names0 = [n for n, _ in branch0.named_children()]
        names1 = [n for n, _ in branch1.named_children()]
        if names0 != names1:
            raise ValueError(f"branch0 and branch1 must have the same stage names; got {names0} and {names1}")
        fusion_stages = list(fusion_stages)
        if not fusion_stages:
            raise ValueError("fusion_stages is empty: name at least one stage after which an MMTM fuses")
        unknown = [s for s in fusion_stages if s not in names0]
        if unknown:
            raise ValueError(f"fusion stages {unknown} are not stages of the branches; allowed: {names0[:-1]}")
        if fusion_stages[-1] == names0[-1] or len(set(fusion_stages)) != len(fusion_stages):
            raise ValueError(f"fusion_stages {fusion_stages} must be distinct and exclude the last stage "
                             f"{names0[-1]!r}, which returns the logits")
        if fusion_channels is not None and len(fusion_channels) != len(fusion_stages):
            raise ValueError(f"fusion_channels has {len(fusion_channels)} entries for "
                             f"{len(fusion_stages)} fusion stages")
        mmtms = {}
        for i, stage in enumerate(fusion_stages):
            if fusion_channels is not None:
                c0, c1 = _fusion_pair(fusion_channels[i], stage)
            else:
                c0, c1 = _stage_channels(getattr(branch0, stage)), _stage_channels(getattr(branch1, stage))
                if c0 is None or c1 is None:
                    which = "branch 0" if c0 is None else "branch 1"
                    raise ValueError(f"cannot infer the channels of {which} after stage {stage!r} (no conv, norm or "
                                     "linear layer in it): pass fusion_channels, C or (C_A, C_B) per fusion stage")
            mmtms[stage] = MMTM(c0, c1, ratio=ratio)
        self.branch0 = branch0
        self.branch1 = branch1
        self.mmtms = nn.ModuleDict(mmtms)
        self.stage_names = names0

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, mode: Union[str, FusionMode] = FusionMode.FUSED,
                return_features: bool = False
                ) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, Features]]:
        """Run both branches stage by stage, fusing after each fusion stage.

        Args:
            x0: m0 input, e.g. (B, C_in, H, W) or (B, F_in).
            x1: m1 input, of its own shape.
            mode: the fusion mode of every MMTM in this pass.
            return_features: also return the pooled features that enter each branch's final linear layer.
        Returns:
            (y0_hat, y1_hat), logits (B, num_classes) each; with return_features, (y0_hat, y1_hat, (e0, e1)) with
            e0 (B, F0) and e1 (B, F1) (what RUBi's bias classifier reads).
        """
        mode = FusionMode.parse(mode)
        features: List[Optional[torch.Tensor]] = [None, None]
        handles = []
        if return_features:
            for i, branch in enumerate((self.branch0, self.branch1)):
                handles.append(final_linear(branch).register_forward_pre_hook(_feature_hook(features, i)))
        try:
            a, b = x0, x1
            for name in self.stage_names:
                a = getattr(self.branch0, name)(a)
                b = getattr(self.branch1, name)(b)
                if name in self.mmtms:
                    a, b = self.mmtms[name](a, b, mode)
        finally:
            for h in handles:
                h.remove()
        if return_features:
            return a, b, (features[0], features[1])
        return a, b

    @staticmethod
    def predict(y0_hat: torch.Tensor, y1_hat: torch.Tensor) -> torch.Tensor:
        """The multi-modal prediction: the mean of the two branches' logits, (B, K)."""
        return (y0_hat + y1_hat) / 2

    def encoder(self, k: int) -> nn.Sequential:
        """Branch k's layers up to its pooled features e_k (its final linear layer left out; the modules are the
        branch's own). Its parameters are branch k's but the head's; run alone, it skips the MMTMs."""
        if k not in (0, 1):
            raise ValueError(f"encoder k={k!r} must be 0 (m0) or 1 (m1)")
        return strip_final_linear(self.branch1 if k == 1 else self.branch0)[0]

    @property
    def has_running_scales(self) -> bool:
        """Whether a regular training step has filled every MMTM's running means (re-balancing needs them)."""
        return all(m.has_running_scales for m in self.mmtms.values())

    def cls_groups(self) -> Dict[str, List[nn.Parameter]]:
        """The parameter groups of the conditional learning speed (SPEC Sec. 4), from the model's structure.

        Returns:
            dict with "m0" (theta_m0: all of branch 0), "m1" (theta_m1), "m0_prime" (theta'_m0: W_A, b_A of
            every MMTM and the shared W_s, b_s) and "m1_prime" (theta'_m1: W_B, b_B and W_s, b_s).
        """
        shared = [p for m in self.mmtms.values() for p in m.fc_squeeze.parameters()]
        return {
            "m0": list(self.branch0.parameters()),
            "m1": list(self.branch1.parameters()),
            "m0_prime": [p for m in self.mmtms.values() for p in m.fc_a.parameters()] + shared,
            "m1_prime": [p for m in self.mmtms.values() for p in m.fc_b.parameters()] + shared,
        }


@contextlib.contextmanager
def frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    """Run an extra pass in training mode (batch statistics) without moving the batch norms' running statistics.

    The pass updates copies of their buffers (running mean and variance, batches tracked), and the originals are put
    back on exit, untouched: a regular pass before it keeps its graph (autograd saved those buffers).

    Args:
        module: the model whose batch norms the pass goes through.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v for k, v in m.named_buffers(recurse=False) if v is not None} for m in norms]
    for m, buffers in zip(norms, saved):
        for k, v in buffers.items():
            setattr(m, k, v.clone())  # the pass updates the copy
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved):
            for k, v in buffers.items():
                setattr(m, k, v)


def _feature_hook(store: List[Optional[torch.Tensor]], index: int):
    """A forward pre-hook that keeps the input of the module it is registered on in store[index]."""
    def hook(module: nn.Module, args: tuple) -> None:
        store[index] = args[0]
    return hook


class UniModalNet(nn.Module):
    """The uni-modal baseline (paper Sec. 6.4; SPEC Sec. 9): one branch fed one modality, with a squeeze-and-
    excitation block after every stage where the two-branch model has an MMTM, so that it has the same capacity.

    Build it with `UniModalNet.from_two_branch(model, modality)`; the constructor takes the branch and its SE blocks
    directly. No CLS groups: the CLS and CUR need two modalities.

    Args:
        branch: nn.Sequential of named stages; the last returns the logits.
        se_blocks: stage name -> block (e.g. `SqueezeExcite`) applied to that stage's output.
        modality: which input the network reads: 0 (m0) or 1 (m1).
    """

    def __init__(self, branch: nn.Sequential, se_blocks: Mapping[str, nn.Module], modality: int) -> None:
        super().__init__()
        if not isinstance(branch, nn.Sequential):
            raise TypeError(f"branch must be an nn.Sequential of named stages, got {type(branch).__name__}")
        if modality not in (0, 1):
            raise ValueError(f"modality={modality!r} must be 0 (m0) or 1 (m1)")
        names = [n for n, _ in branch.named_children()]
        unknown = [s for s in se_blocks if s not in names[:-1]]
        if unknown:
            raise ValueError(f"SE stages {unknown} are not stages of the branch before its last; allowed: {names[:-1]}")
        self.branch = branch
        self.se = nn.ModuleDict(dict(se_blocks))
        self.modality = int(modality)
        self.stage_names = names

    @classmethod
    def from_two_branch(cls, model: TwoBranchNet, modality: int) -> "UniModalNet":
        """The uni-modal counterpart of a two-branch model: a copy of branch `modality` (with its current weights)
        and a fresh `SqueezeExcite` after each fusion stage, with that MMTM's hidden size; of a late-fusion model,
        a copy of encoder `modality` and a fresh linear classifier (no SE blocks: it has no MMTMs).

        Args:
            model: the two-branch (or late-fusion) model (left unchanged; nothing is shared with it).
            modality: 0 (branch 0, reads m0) or 1 (branch 1, reads m1).
        Returns:
            A UniModalNet.
        """
        if modality not in (0, 1):
            raise ValueError(f"modality={modality!r} must be 0 (m0) or 1 (m1)")
        if getattr(model, "is_late", False):
            # A late-fusion model (SPEC Sec. 13) has no fusion blocks inside its encoders: the uni-modal network is a
            # copy of encoder k and a fresh linear classifier nn.Linear(F_k, K), with no SE blocks.
            encoder = copy.deepcopy(model.encoder(modality))
            stages = OrderedDict(encoder.named_children() if isinstance(encoder, nn.Sequential) else
                                 [("encoder", encoder)])
            stages["classifier"] = nn.Linear(model.features[modality], model.num_classes)
            return cls(nn.Sequential(stages), {}, modality)
        branch = copy.deepcopy(model.branch1 if modality == 1 else model.branch0)
        se = {stage: SqueezeExcite(m.channels_b if modality == 1 else m.channels_a, m.hidden)
              for stage, m in model.mmtms.items()}
        return cls(branch, se, modality)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of the branch with SE blocks, from its modality's input x (e.g. (B, C_in, H, W))."""
        for name in self.stage_names:
            x = getattr(self.branch, name)(x)
            if name in self.se:
                x = self.se[name](x)
        return x
