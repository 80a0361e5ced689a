"""Where batches come from (SPEC Sec. 1, 10): downloads, the .npy cache, the datasets and the two-view loader.

Names are imported on first use: worker processes that build caches import `greedymm.data.cache` or
`greedymm.data.embedded` (numpy and PIL only), and must not pull in torch through this package.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"open_split": "cache", "split_indices": "cache", "CacheSplit": "cache",
          "Loaders": "loader", "TwoViewLoader": "loader", "build_loaders": "loader", "cache_dir_for": "loader",
          "dataset_splits": "loader", "prepare_data": "loader"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_WHERE))
