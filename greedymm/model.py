"""The two-branch multi-modal network with MMTM fusion (paper Sec. 3.1 and 5.2; SPEC Sec. 2):
two ResNet18 branches joined after layer2, layer3 and layer4, and the parameter groups of the CLS.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchvision.models import resnet18

from .mmtm import MMTM, FusionMode

RESNET_FUSION_STAGES = ("layer2", "layer3", "layer4")


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


def conv_branch(num_classes: int, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64)) -> nn.Sequential:
    """A small CNN branch (conv-BN-ReLU-pool stages `stage1`..`stageK`, then `head`), for quick runs and custom data.

    Args:
        num_classes: outputs of the final linear layer.
        in_channels: input channels.
        widths: output channels of each stage.
    Returns:
        nn.Sequential with stages stage1..stageK and head.
    """
    stages: "OrderedDict[str, nn.Module]" = OrderedDict()
    prev = in_channels
    for i, w in enumerate(widths, start=1):
        stages[f"stage{i}"] = nn.Sequential(
            nn.Conv2d(prev, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2) if i < len(widths) else nn.Identity())
        prev = w
    stages["head"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(prev, num_classes))
    return nn.Sequential(stages)


def _stage_channels(stage: nn.Module) -> Optional[int]:
    """Output channels of a stage: those of its last conv or batch norm, None if it has neither."""
    channels = None
    for m in stage.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            channels = m.num_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            channels = m.out_channels
    return channels


class TwoBranchNet(nn.Module):
    """Branch phi0 sees m0, branch phi1 sees m1; an MMTM joins them after each stage in `fusion_stages`.

    Both branches are nn.Sequential with the same stage names; the last stage returns the logits.
    The forward returns (y0_hat, y1_hat); the model's prediction is their mean (`predict`).

    Args:
        branch0: the m0 branch.
        branch1: the m1 branch.
        fusion_stages: names of the stages after which an MMTM fuses the branches.
        fusion_channels: channels at each fusion stage; inferred from the stages' last conv/BN if None.
        ratio: the MMTM bottleneck ratio.
    """

    def __init__(self, branch0: nn.Sequential, branch1: nn.Sequential, fusion_stages: Sequence[str],
                 fusion_channels: Optional[Sequence[int]] = None, ratio: int = 4) -> None:
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
                c0 = c1 = int(fusion_channels[i])
            else:
                c0, c1 = _stage_channels(getattr(branch0, stage)), _stage_channels(getattr(branch1, stage))
                if c0 is None or c1 is None:
                    raise ValueError(f"cannot infer the channels after stage {stage!r}: pass fusion_channels")
            if c0 != c1:
                raise ValueError(f"MMTM after stage {stage!r}: branch 0 has {c0} channels and branch 1 has "
                                 f"{c1}; both branches must have the same channel count at every fusion stage")
            mmtms[stage] = MMTM(c0, ratio=ratio)
        self.branch0 = branch0
        self.branch1 = branch1
        self.mmtms = nn.ModuleDict(mmtms)
        self.stage_names = names0

    def forward(self, x0: torch.Tensor, x1: torch.Tensor,
                mode: Union[str, FusionMode] = FusionMode.FUSED) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run both branches stage by stage, fusing after each fusion stage.

        Args:
            x0: m0 input (B, C_in, H, W).
            x1: m1 input (B, C_in, H, W).
            mode: the fusion mode of every MMTM in this pass.
        Returns:
            (y0_hat, y1_hat), logits (B, num_classes) each.
        """
        mode = FusionMode.parse(mode)
        a, b = x0, x1
        for name in self.stage_names:
            a = getattr(self.branch0, name)(a)
            b = getattr(self.branch1, name)(b)
            if name in self.mmtms:
                a, b = self.mmtms[name](a, b, mode)
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
