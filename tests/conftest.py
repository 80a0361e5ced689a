"""Shared fixtures: a tiny deterministic two-modality dataset and model for the core tests."""
from __future__ import annotations

import json

import pytest
import torch

from custom_branches import TensorLoader
from greedymm.models import mmtm_convnet


class ToyLoader(TensorLoader):
    """In-memory (x0, x1, y) batches with the TwoViewLoader contract (set_epoch, __len__, augment).

    m0 carries the class as a bright quadrant, m1 carries it more weakly; order is a function of (seed, epoch).
    """

    def __init__(self, n: int = 48, batch_size: int = 8, num_classes: int = 4, size: int = 12, seed: int = 0,
                 shuffle: bool = True, signal1: float = 0.5) -> None:
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % num_classes
        x0 = torch.randn(n, 3, size, size, generator=g) * 0.5  # (N, 3, size, size)
        x1 = torch.randn(n, 3, size, size, generator=g) * 0.5
        half = size // 2
        for k in range(num_classes):
            r, c = divmod(k, 2)
            idx = y == k
            x0[idx, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 1.0
            x1[idx, k % 3] += signal1
        super().__init__((x0, x1, y), batch_size=batch_size, seed=seed, shuffle=shuffle)


@pytest.fixture
def toy_loaders():
    """(train, val, test) ToyLoaders with 4 classes."""
    return (ToyLoader(48, seed=0), ToyLoader(24, seed=1, shuffle=False), ToyLoader(24, seed=2, shuffle=False))


def fresh_model(widths=(4, 8, 8)):
    """A seeded two-branch CNN with MMTM after each of its three stages, 4 classes (the same weights every call)."""
    torch.manual_seed(0)
    return mmtm_convnet(4, widths=widths)


def read_jsonl(path):
    """The records of a JSON-lines log (steps.jsonl, epochs.jsonl)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def tiny_model():
    """A seeded two-branch CNN with MMTM after each of its three stages, 4 classes."""
    return fresh_model()
