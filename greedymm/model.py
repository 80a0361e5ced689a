"""The two-branch multi-modal network with MMTM fusion (paper Sec. 3.1, 5.2 and 6.1; SPEC Sec. 2, 9 and 10): two
branches of named stages (ResNet18, a small CNN, the four-layer digit CNN or any user's) joined by MMTMs, the
parameter groups of the CLS, and the uni-modal network with SE blocks in place of the MMTMs.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchvision.models import resnet18

from .mmtm import MMTM, FusionMode, SqueezeExcite

RESNET_FUSION_STAGES = ("layer2", "layer3", "layer4")
DIGIT_FUSION_STAGES = ("stage2", "stage3", "stage4")
# Channels of the four conv layers of each digit branch (SPEC Sec. 10); see `digit_branch` for the choice.
DIGIT_WIDTHS = (16, 32, 64, 64)

Features = Tuple[torch.Tensor, torch.Tensor]


def resnet18_branch(num_classes: int = 40, in_channels: int = 3) -> nn.Sequential:
    """A randomly initialised torchvision ResNet18 as a sequence of named stages.

    Args:
        num_classes: outputs of the final linear layer.
        in_channels: input channels (3 for the RGB-normalised renders).
    Returns:
        nn.Sequential with stages stem, layer1..layer4, head (pool, flatten, linear).
    """
    net = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
        layer1=net.layer1, layer2=net.layer2, layer3=net.layer3, layer4=net.layer4,
        head=nn.Sequential(net.avgpool, nn.Flatten(1), net.fc),
    ))


def _conv_stage(in_channels: int, out_channels: int, pool: bool) -> nn.Sequential:
    """conv3x3-BN-ReLU, then a 2x2 max pool if `pool`."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2) if pool else nn.Identity())


def _pool_head(channels: int, num_classes: int) -> nn.Sequential:
    """Global average pool, flatten, linear: (B, C, H, W) -> (B, K)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))


def conv_branch(num_classes: int, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64)) -> nn.Sequential:
    """A small CNN branch (conv-BN-ReLU-pool stages `stage1`..`stageK`, then `head`), for quick runs and custom data.

    Args:
        num_classes: outputs of the final linear layer.
        in_channels: input channels.
        widths: output channels of each stage (every stage but the last halves the resolution).
    Returns:
        nn.Sequential with stages stage1..stageK and head.
    """
    stages: "OrderedDict[str, nn.Module]" = OrderedDict()
    prev = in_channels
    for i, w in enumerate(widths, start=1):
        stages[f"stage{i}"] = _conv_stage(prev, w, pool=i < len(widths))
        prev = w
    stages["head"] = _pool_head(prev, num_classes)
    return nn.Sequential(stages)


def digit_branch(num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = DIGIT_WIDTHS) -> nn.Sequential:
    """The four-layer CNN branch of Colored-and-gray MNIST (SPEC Sec. 10), for 28x28 digits.

    Stages stage1..stage4 are conv3x3-BN-ReLU; stage1 and stage2 end in a 2x2 max pool (28 -> 14 -> 7), stage3 and
    stage4 keep 7x7 (one more pool would drop a row and column of the 7x7 map); then `head`: global average pool,
    flatten, linear. The default widths (16, 32, 64, 64) take about 0.3 s per training step of the two-branch model
    at batch 128 on one CPU thread (bench/bench_model.py): seconds per epoch of the scikit-learn stand-in, a couple
    of minutes per MNIST epoch on a CPU, and milliseconds per step on a GPU. Half these widths is 3x faster but
    learns the small stand-in much more slowly at the paper's lr 0.01; double is 2.6x slower.

    Args:
        num_classes: outputs of the final linear layer.
        in_channels: input channels (3 for the colored digit, 1 for the gray one).
        widths: channels of the four conv layers.
    Returns:
        nn.Sequential with stages stage1..stage4 and head.
    """
    widths = [int(w) for w in widths]
    if len(widths) != 4 or min(widths) < 1:
        raise ValueError(f"widths={tuple(widths)} must give the channels of exactly four conv layers, each >= 1")
    stages: "OrderedDict[str, nn.Module]" = OrderedDict()
    prev = in_channels
    for i, w in enumerate(widths, start=1):
        stages[f"stage{i}"] = _conv_stage(prev, w, pool=i <= 2)
        prev = w
    stages["head"] = _pool_head(prev, num_classes)
    return nn.Sequential(stages)


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
    prediction is their mean (`predict`).

    Args:
        branch0: the m0 branch.
        branch1: the m1 branch.
        fusion_stages: names of the stages after which an MMTM fuses the branches.
        fusion_channels: per fusion stage, C (both branches) or (C_A, C_B); if None, inferred from each stage's
            last conv (out_channels), batch/group norm or linear layer (out_features).
        ratio: the MMTM bottleneck ratio.
    """

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
        and a fresh `SqueezeExcite` after each fusion stage, with that MMTM's hidden size.

        Args:
            model: the two-branch model (left unchanged; nothing is shared with it).
            modality: 0 (branch 0, reads m0) or 1 (branch 1, reads m1).
        Returns:
            A UniModalNet.
        """
        if modality not in (0, 1):
            raise ValueError(f"modality={modality!r} must be 0 (m0) or 1 (m1)")
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


def mmtm_resnet18(num_classes: int = 40, in_channels: int = 3,
                  fusion_stages: Sequence[str] = RESNET_FUSION_STAGES) -> TwoBranchNet:
    """The paper's ModelNet40 model: two ResNet18 branches with MMTM after layer2, layer3, layer4.

    Args:
        num_classes: classes of both branches' final layers.
        in_channels: input channels of each view.
        fusion_stages: stages followed by an MMTM.
    Returns:
        A TwoBranchNet.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2")
    return TwoBranchNet(resnet18_branch(num_classes, in_channels), resnet18_branch(num_classes, in_channels),
                        fusion_stages)


def mmtm_convnet(num_classes: int, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64),
                 fusion_stages: Optional[Sequence[str]] = None) -> TwoBranchNet:
    """A small two-branch CNN with MMTM after every stage (for tests and custom two-modality data).

    Args:
        num_classes: classes of both heads.
        in_channels: input channels of each modality.
        widths: channels of each conv stage.
        fusion_stages: stages followed by an MMTM; all conv stages if None.
    Returns:
        A TwoBranchNet.
    """
    fusion_stages = fusion_stages or [f"stage{i}" for i in range(1, len(widths) + 1)]
    return TwoBranchNet(conv_branch(num_classes, in_channels, widths), conv_branch(num_classes, in_channels, widths),
                        fusion_stages)


def mmtm_digits(num_classes: int = 10, channels: Tuple[int, int] = (3, 1),
                widths: Sequence[int] = DIGIT_WIDTHS) -> TwoBranchNet:
    """The Colored-and-gray MNIST model (SPEC Sec. 10): two four-layer conv branches (`digit_branch`), m0 reading
    the colored digit (3 channels), m1 the gray one (1 channel), an MMTM after each of the last three conv layers.

    Args:
        num_classes: classes of both heads.
        channels: input channels of m0 and m1.
        widths: channels of the four conv layers of each branch.
    Returns:
        A TwoBranchNet.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2")
    if len(channels) != 2 or min(channels) < 1:
        raise ValueError(f"channels={tuple(channels)} must give the input channels of m0 and m1, each >= 1")
    return TwoBranchNet(digit_branch(num_classes, channels[0], widths), digit_branch(num_classes, channels[1], widths),
                        DIGIT_FUSION_STAGES)
