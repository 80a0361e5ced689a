"""Where batches come from (SPEC Sec. 1, 10): the dataset registry, downloads, the .npy cache, the datasets (each
module registers its spec: `modelnet.py`, `embedded.py`, `digits.py`) and the two-view loader.
"""
from __future__ import annotations

# Names are imported on first use: worker processes that build caches import `greedymm.data.png_tree` or
# `greedymm.data.embedded` (numpy and PIL only), and must not pull in torch through this package.

import importlib
from typing import Any

_WHERE = {"open_split": "cache", "split_indices": "cache", "CacheSplit": "cache", "write_cache": "cache",
          "build_cache": "png_tree", "TwoViewLoader": "batches", "finish_batch": "batches",
          "Loaders": "loader", "build_loaders": "loader", "cache_dir_for": "loader", "dataset_splits": "loader",
          "prepare_data": "loader", "DatasetSpec": "registry", "InputFormat": "registry",
          "register_dataset": "registry", "unregister_dataset": "registry", "get_dataset": "registry",
          "dataset_names": "registry", "datasets": "registry"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_WHERE))
