"""Branches and two-branch models by name (SPEC Sec. 2, 10 and 13): ResNet18 branches for the renders, the four-layer
digit CNN, a small CNN for quick runs and custom data, the MMTM-fused and late-fusion models built from them, the
dataset specs' `default_model` names, and model factories named by "module:function" (the studies' `model`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence, Tuple

from torch import nn
from torchvision.models import resnet18

from ..data.registry import resolve
from .fusions import as_fusion
from .two_branch import TwoBranchNet

RESNET_FUSION_STAGES = ("layer2", "layer3", "layer4")
DIGIT_FUSION_STAGES = ("stage2", "stage3", "stage4")
# Channels of the four conv layers of each digit branch (SPEC Sec. 10); see `digit_branch` for the choice.
DIGIT_WIDTHS = (16, 32, 64, 64)

ModelFn = Callable[[int], nn.Module]  # num_classes -> a two-branch model


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


def _resnet18(num_classes: int, channels: Tuple[int, int]) -> TwoBranchNet:
    if channels[0] != channels[1]:
        raise ValueError(f"the ResNet18 model takes the same input channels for both views, got {channels}")
    return mmtm_resnet18(num_classes, in_channels=channels[0])


def _convnet(num_classes: int, channels: Tuple[int, int]) -> TwoBranchNet:
    if channels[0] != channels[1]:
        raise ValueError(f"the conv model takes the same input channels for both views, got {channels}")
    return mmtm_convnet(num_classes, in_channels=channels[0])


# The two-branch models by branch name: (num_classes, channels of m0 and m1) -> model.
TWO_BRANCH: Dict[str, Callable[[int, Tuple[int, int]], TwoBranchNet]] = {
    "resnet18": _resnet18, "digits": lambda k, channels: mmtm_digits(k, channels=channels), "convnet": _convnet}


def build_two_branch(branch_name: str, num_classes: int, channels: Tuple[int, int] = (3, 3)) -> TwoBranchNet:
    """A two-branch model of the zoo (a dataset's `default_model`), randomly initialised (seed torch first).

    Args:
        branch_name: "resnet18" (SPEC Sec. 2), "digits" (SPEC Sec. 10) or "convnet".
        num_classes: K.
        channels: input channels of m0 and m1.
    Returns:
        The TwoBranchNet.
    """
    if branch_name not in TWO_BRANCH:
        raise ValueError(f"branch_name={branch_name!r} is unknown; allowed: {', '.join(TWO_BRANCH)}")
    return TWO_BRANCH[branch_name](num_classes, tuple(channels))


def build_model(branch_name: str, num_classes: int, channels: Tuple[int, int] = (3, 3),
                fusion: str = "mmtm") -> nn.Module:
    """A two-branch model of the zoo with fusion `fusion`, randomly initialised (seed torch first).

    Args:
        branch_name: "resnet18" (SPEC Sec. 2), "digits" (SPEC Sec. 10) or "convnet".
        num_classes: K.
        channels: input channels of m0 and m1.
        fusion: a registered fusion (`greedymm.models.fusions`): "mmtm" (the TwoBranchNet of `build_two_branch`,
            the same weights), "late_concat" or "late_sum" (its branches without their final layers, and a fresh
            late-fusion head).
    Returns:
        The model.
    """
    return as_fusion(build_two_branch(branch_name, num_classes, channels), fusion)


# Modules renamed since run names recorded them: "greedymm.model:mmtm_convnet" names the same model (and run) still.
MOVED = {"greedymm.model": "greedymm.models.zoo"}


def model_factory(model: str) -> Optional[ModelFn]:
    """The model factory a study or a run names: None for "" (the dataset's default), else the function at
    "module:function".

    Args:
        model: "" or "module:function" (e.g. "greedymm.models.zoo:mmtm_convnet"), a function num_classes -> model.
    Returns:
        The function, or None.
    """
    if not model:
        return None
    module, sep, attr = model.partition(":")
    return resolve(MOVED.get(module, module) + sep + attr, "model", " (num_classes -> two-branch model)")
