"""Shared fixtures: a tiny deterministic two-modality dataset and model for the core tests."""
from __future__ import annotations

import pytest
import torch

from greedymm.model import mmtm_convnet


class ToyLoader:
    """In-memory (x0, x1, y) batches with the TwoViewLoader contract (set_epoch, __len__, augment).

    m0 carries the class as a bright quadrant, m1 carries it more weakly; order is a function of (seed, epoch).
    """

    def __init__(self, n: int = 48, batch_size: int = 8, num_classes: int = 4, size: int = 12, seed: int = 0,
                 shuffle: bool = True, signal1: float = 0.5) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % num_classes
        self.x0 = torch.randn(n, 3, size, size, generator=g) * 0.5
        self.x1 = torch.randn(n, 3, size, size, generator=g) * 0.5
        half = size // 2
        for k in range(num_classes):
            r, c = divmod(k, 2)
            idx = self.y == k
            self.x0[idx, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 1.0
            self.x1[idx, k % 3] += signal1
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


@pytest.fixture
def toy_loaders():
    """(train, val, test) ToyLoaders with 4 classes."""
    return (ToyLoader(48, seed=0), ToyLoader(24, seed=1, shuffle=False), ToyLoader(24, seed=2, shuffle=False))


@pytest.fixture
def tiny_model():
    """A seeded two-branch CNN with MMTM after each of its three stages, 4 classes."""
    torch.manual_seed(0)
    return mmtm_convnet(4, widths=(4, 8, 8))
