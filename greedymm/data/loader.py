"""The loaders of a run (SPEC Sec. 1, 10, 11): its dataset's cache prepared safely when several processes ask at once
(the spec's cache builder), the fixed validation split, and the four two-view loaders in the dataset's input format
(renders: front and rear, ImageNet-normalised, flipped; digits: colored (3 channels) and gray (1), no flip).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..config import DataConfig
from .batches import TwoViewLoader
from .cache import CacheSplit, manifest_splits, open_split, split_indices
from .registry import get_dataset, resolve

log = logging.getLogger(__name__)

LOCK_NAME = ".prepare.lock"  # in data_dir: one process at a time downloads and builds caches there


def cache_dir_for(cfg: DataConfig) -> Path:
    """The cache folder: `{data_dir}/{prefix}_{size}px`, the prefix `{dataset}_npy` unless the dataset's spec names
    one (ModelNet40's is `npy`)."""
    prefix = get_dataset(cfg.dataset).cache_prefix or f"{cfg.dataset}_npy"
    return Path(cfg.data_dir) / f"{prefix}_{cfg.image_size}px"


def _stamp(cache_dir: Path) -> Optional[Tuple[int, int, int]]:
    """Identity of a cache's manifest (inode, size, mtime): a build replaces it."""
    try:
        st = os.stat(Path(cache_dir) / "manifest.json")
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def prepare_data(cfg: DataConfig, progress: bool = True) -> Path:
    """Download and cache the data as needed; `cfg.make_npy_files` forces the cache to be rebuilt.

    Safe when several processes (study workers, Ray tasks on one node) call it at once: they take turns on a file
    lock in `data_dir` (LOCK_NAME), so the data is downloaded and cached once and the others reuse it. With
    `make_npy_files`, a cache that another process built while this one waited counts as rebuilt.
    A complete ModelNet40 cache whose source renders were deleted afterwards is used as it is.

    Args:
        cfg: the data config.
        progress: show tqdm bars.
    Returns:
        The cache folder (see `cache_dir_for`).
    """
    from filelock import FileLock, Timeout  # installed with torch

    cache_dir = cache_dir_for(cfg)
    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    before = _stamp(cache_dir)
    lock = FileLock(str(Path(cfg.data_dir) / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process preparing the data in %s", cfg.data_dir)
        lock.acquire()
    try:
        force = cfg.make_npy_files and (_stamp(cache_dir) == before or _stamp(cache_dir) is None)
        return _prepare(cfg, cache_dir, force, progress)
    finally:
        lock.release()


def _prepare(cfg: DataConfig, cache_dir: Path, force: bool, progress: bool) -> Path:
    builder = resolve(get_dataset(cfg.dataset).cache_builder, "cache_builder")  # imported here: only its dataset
    return builder(cfg, cache_dir, force=force, progress=progress)


def dataset_splits(cache_dir: Path, val_fraction: float, split_seed: int) -> Dict[str, Tuple[CacheSplit, np.ndarray]]:
    """The cache splits and object indices of D_train, validation and test.

    Where the cache stores a "val" split (the digits: their validation colors differ from the training ones), it is
    the validation set and the whole "train" split is D_train; else a fixed seeded `val_fraction` of "train" is held
    out (`split_indices`, SPEC Sec. 1).

    Args:
        cache_dir: a complete cache.
        val_fraction, split_seed: the held-out share and its seed, for caches without a stored "val" split.
    Returns:
        {"train": (split, indices), "val": (...), "test": (...)}, indices sorted int64 into the split's objects.
    """
    def every(split: CacheSplit) -> np.ndarray:
        return np.arange(len(split.labels), dtype=np.int64)

    train, test = open_split(cache_dir, "train"), open_split(cache_dir, "test")
    if "val" in manifest_splits(train.manifest):
        val = open_split(cache_dir, "val")
        return {"train": (train, every(train)), "val": (val, every(val)), "test": (test, every(test))}
    train_idx, val_idx = split_indices(len(train.labels), val_fraction, split_seed)
    return {"train": (train, train_idx), "val": (train, val_idx), "test": (test, every(test))}


@dataclass
class Loaders:
    """The four loaders of a run (SPEC Sec. 1), the class names, the split sizes and the input channels."""

    train: TwoViewLoader  # D_train, shuffled (and flipped, renders only)
    train_eval: TwoViewLoader  # D_train, fixed order, no augmentation (CUR squeeze means)
    val: TwoViewLoader  # renders: the held-out 20% of the training objects; digits: the stored val split
    test: TwoViewLoader
    classes: List[str]
    sizes: Dict[str, int]  # {"train": .., "val": .., "test": ..}
    cache_dir: Path
    channels: Tuple[int, int] = (3, 3)  # input channels of x0 and x1 as delivered (digits: (3, 1))


def build_loaders(cfg: DataConfig, device: Union[str, torch.device], seed: int, progress: bool = True) -> Loaders:
    """Prepare the data (download, cache) and build the train / train_eval / val / test loaders.

    Args:
        cfg: the data config (dataset, views, batch sizes, split, workers of the training loader).
        device: where batches are delivered.
        seed: seeds the training order and flips (the validation split uses `cfg.split_seed`).
        progress: show tqdm bars while preparing the data.
    Returns:
        The loaders, class names, split sizes and input channels.
    """
    cache_dir = prepare_data(cfg, progress=progress)
    splits = dataset_splits(cache_dir, cfg.val_fraction, cfg.split_seed)
    fmt = get_dataset(cfg.dataset).input_format
    channels = fmt.channels(cfg.views)

    def loader(name, batch_size, **kw) -> TwoViewLoader:
        split, indices = splits[name]
        return TwoViewLoader(split.images, split.labels, indices, views=cfg.views, batch_size=batch_size,
                             seed=seed, device=device, channels=channels, mean=fmt.mean, std=fmt.std, **kw)

    # Only the training loader gets worker processes: they persist for the run (each a Python with torch, started
    # once), and the evaluation passes are short reads of the memory-mapped cache.
    return Loaders(
        train=loader("train", cfg.batch_size, shuffle=True, augment=fmt.flip, num_workers=cfg.num_workers),
        train_eval=loader("train", cfg.eval_batch_size),
        val=loader("val", cfg.eval_batch_size),
        test=loader("test", cfg.eval_batch_size),
        classes=list(splits["train"][0].classes),
        sizes={name: len(indices) for name, (_, indices) in splits.items()},
        cache_dir=cache_dir,
        channels=channels,
    )
