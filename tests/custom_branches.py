"""Test helpers: two-branch models as a user would build them, on vectors (MLP branches of unequal widths) and on a
sequence fused with an image (a Conv1d branch and a Conv2d branch), their data, and an in-memory loader for any
input shapes with the TwoViewLoader contract (set_epoch, __len__, augment)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

from greedymm.models import LateFusionNet, TwoBranchNet, conv_branch

NUM_CLASSES = 3


def mlp_branch(in_features: int, widths: Sequence[int], num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """Linear-BatchNorm1d-ReLU stages stage1..stageK on (B, F) vectors, then a linear head."""
    stages: "OrderedDict[str, nn.Module]" = OrderedDict()
    prev = in_features
    for i, w in enumerate(widths, start=1):
        stages[f"stage{i}"] = nn.Sequential(nn.Linear(prev, w), nn.BatchNorm1d(w), nn.ReLU())
        prev = w
    stages["head"] = nn.Linear(prev, num_classes)
    return nn.Sequential(stages)


def seq_branch(in_channels: int, widths: Sequence[int], num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """Conv1d-BatchNorm1d-ReLU stages on (B, C, T) sequences, then pool, flatten, linear."""
    stages: "OrderedDict[str, nn.Module]" = OrderedDict()
    prev = in_channels
    for i, w in enumerate(widths, start=1):
        stages[f"stage{i}"] = nn.Sequential(nn.Conv1d(prev, w, 3, padding=1), nn.BatchNorm1d(w), nn.ReLU())
        prev = w
    stages["head"] = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(1), nn.Linear(prev, num_classes))
    return nn.Sequential(stages)


def mlp_model() -> TwoBranchNet:
    """m0: 10 features, widths (12, 16); m1: 7 features, widths (20, 8): C_A != C_B at both MMTMs."""
    return TwoBranchNet(mlp_branch(10, (12, 16)), mlp_branch(7, (20, 8)), ["stage1", "stage2"])


def seq_image_model() -> TwoBranchNet:
    """m0: a (B, 2, 16) sequence through Conv1d stages (6, 10); m1: a (B, 3, 8, 8) image through Conv2d (4, 8)."""
    return TwoBranchNet(seq_branch(2, (6, 10)), conv_branch(NUM_CLASSES, 3, (4, 8)), ["stage1", "stage2"])


def vector_data(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 (n, 10) with the class as a strong feature, x1 (n, 7) with a weaker one; y (n,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x0 = torch.randn(n, 10, generator=g) * 0.5
    x1 = torch.randn(n, 7, generator=g) * 0.5
    x0[torch.arange(n), y] += 2.0
    x1[torch.arange(n), y + 3] += 0.7
    return x0, x1, y


def seq_image_data(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 (n, 2, 16) with the class as a bright segment, x1 (n, 3, 8, 8) with it as a weaker color; y (n,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x0 = torch.randn(n, 2, 16, generator=g) * 0.5
    x1 = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    for k in range(NUM_CLASSES):
        x0[y == k, 0, 5 * k:5 * k + 5] += 1.5
        x1[y == k, k] += 0.5
    return x0, x1, y


# name -> (model builder, data maker)
CUSTOM: Dict[str, Tuple[Callable[[], TwoBranchNet], Callable[[int, int], tuple]]] = {
    "mlp": (mlp_model, vector_data),
    "seq_image": (seq_image_model, seq_image_data),
}


class TensorLoader:
    """In-memory (x0, x1, y) batches of any shapes; the order is a function of (seed, epoch)."""

    def __init__(self, data: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_size: int = 8, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.x0, self.x1, self.y = data
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.augment = False
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __iter__(self):
        n = len(self.y)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
                 if self.shuffle else torch.arange(n))
        start, self.start = self.start, 0
        for b in range(start, len(self)):
            i = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x0[i], self.x1[i], self.y[i]


# ------------------------------------------------------------------------------- a late_concat model to compute by hand
def identity_net(w0: Sequence[float], w1: Sequence[float], b: Sequence[float]) -> LateFusionNet:
    """Encoders that pass the (B, 1) inputs through, and a late_concat head with W0 = w0, W1 = w1, b = b."""
    net = LateFusionNet(nn.Sequential(nn.Identity()), nn.Sequential(nn.Identity()), (1, 1), len(b), "late_concat")
    with torch.no_grad():
        net.head0.weight.copy_(torch.tensor(w0).reshape(-1, 1))
        net.head1.weight.copy_(torch.tensor(w1).reshape(-1, 1))
        net.head_bias.copy_(torch.tensor(b))
    return net


# The late-fusion CUR example (tests/test_late_fusion.py computes it by hand): D_train (x0, x1, y), means 2 and -2,
# and the test set.
CUR_TRAIN = (torch.tensor([[1.0], [3.0]]), torch.tensor([[-2.0], [-2.0]]), torch.tensor([0, 1]))
CUR_TEST = (torch.tensor([[1.0], [-1.0], [2.0], [-1.0], [3.0]]), torch.tensor([[1.0], [3.0], [-1.0], [-1.0], [-4.0]]),
            torch.tensor([1, 1, 1, 0, 0]))
