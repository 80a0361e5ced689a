"""The memory-mappable .npy cache of the multi-view datasets (SPEC Sec. 1 and 10): its format, writing one atomically,
checking and opening one, and the fixed validation split.
"""
from __future__ import annotations

# The format: per split (train, test and an optional stored val) `{split}_images.npy` (N, V, C, H, W) uint8 with V
# views per object (12 renders, 2 digits), `{split}_labels.npy`, `{split}_names.json`, optional per-object extras
# `{split}_{key}.npy`, and `manifest.json` (written last; a cache is complete only when its manifest exists and
# matches). `png_tree.py` builds one from rendered PNGs, the datasets' modules from arrays (`write_cache`).

import json
import logging
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..io import save_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
NUM_VIEWS = 12  # views per object in a render tree (the MVCNN layout)
SPLITS = ("train", "test")  # in every cache
ALL_SPLITS = ("train", "val", "test")  # "val": a stored validation split (else one is carved from train)
MANIFEST = "manifest.json"
_TMP_FILE = re.compile(r"^\.(?:train|val|test)_\w+\.(?:npy|json)\.[0-9a-f]+\.tmp$")
_EXTRA_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
# Worker processes are never forked from the caller: forking a process where torch already runs threads can deadlock
# (Python 3.12+ warns). Linux: forkserver (workers fork from a clean server process, started once); elsewhere spawn.
# A worker imports the module of its task (numpy, PIL; never torch: greedymm.data imports lazily) and, by Python's
# rule, re-runs the top level of the caller's main script: nothing in a notebook (the kernel's launcher), a script's
# imports otherwise. Tasks are plain, picklable data.
START_METHOD = "forkserver" if sys.platform.startswith("linux") else "spawn"


class CacheError(ValueError):
    """A render tree or cache that cannot be used; the message names the file and what is allowed."""


@dataclass
class CacheSplit:
    """One split of a cache: images (N, V, C, H, W) uint8 memmap, labels (N,) int64, N names, extras (N, ...)."""

    images: np.ndarray
    labels: np.ndarray
    names: List[str]
    classes: List[str]
    manifest: dict
    extras: Dict[str, np.ndarray] = field(default_factory=dict)  # e.g. the digits' "color_class" (N,)


def split_files(split: str) -> Dict[str, str]:
    """The file names of a split's images, labels and names."""
    return {"images": f"{split}_images.npy", "labels": f"{split}_labels.npy", "names": f"{split}_names.json"}


def read_manifest(cache_dir: Path) -> Optional[dict]:
    """The parsed manifest.json of `cache_dir`, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(cache_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def manifest_splits(manifest: dict) -> List[str]:
    """The splits a manifest vouches for, in ALL_SPLITS order (caches without the key hold train and test)."""
    return list(manifest.get("splits", SPLITS))


def _matches(expected: object, actual: object) -> bool:
    """True when every key of `expected` (recursively for dicts) equals the one in `actual`."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _matches(v, actual[k]) for k, v in expected.items())
    if isinstance(expected, (list, tuple)):
        return isinstance(actual, (list, tuple)) and list(expected) == list(actual)
    return expected == actual


def cache_is_current(cache_dir: Path, expected: dict) -> bool:
    """Whether `cache_dir` holds a complete cache whose manifest agrees with `expected`.

    Args:
        cache_dir: the cache folder.
        expected: manifest fields that must match (nested dicts such as `source` are compared key by key,
            so extra manifest keys are allowed); the format version is always checked.
    Returns:
        True when manifest.json exists and matches, and every split's files exist with the recorded shapes.
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if manifest is None:
        return False
    if manifest.get("format_version") != FORMAT_VERSION or not _matches(expected, manifest):
        log.info("cache %s is stale: its manifest differs from what is expected", cache_dir)
        return False
    try:
        for split in manifest_splits(manifest):
            files = split_files(split)
            images = np.load(cache_dir / files["images"], mmap_mode="r")
            labels = np.load(cache_dir / files["labels"], mmap_mode="r")
            if list(images.shape) != list(manifest["shape"][split]) or labels.shape != (images.shape[0],):
                return False
            if not (cache_dir / files["names"]).is_file():
                return False
            for key in manifest.get("extras", []):
                if np.load(cache_dir / f"{split}_{key}.npy", mmap_mode="r").shape[:1] != labels.shape:
                    return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def open_split(cache_dir: Path, split: str) -> CacheSplit:
    """Open one split of a complete cache, the images memory-mapped read-only.

    Args:
        cache_dir: the cache folder.
        split: "train", "test", or "val" where the cache stores a validation split (see `manifest_splits`).
    Returns:
        The split's images (N, V, C, H, W) memmap, labels, names, the class names, the manifest and the extras.
    """
    if split not in ALL_SPLITS:
        raise ValueError(f"split={split!r} is unknown; allowed: {', '.join(ALL_SPLITS)}")
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise FileNotFoundError(f"{cache_dir / MANIFEST} is missing or unreadable: "
                                f"{cache_dir} is not a complete cache")
    if split not in manifest_splits(manifest):
        raise ValueError(f"split={split!r} is not stored in the cache {cache_dir}; it holds "
                         f"{', '.join(manifest_splits(manifest))}")
    files = split_files(split)
    images = np.load(cache_dir / files["images"], mmap_mode="r")
    labels = np.load(cache_dir / files["labels"])
    names = json.loads((cache_dir / files["names"]).read_text())
    extras = {key: np.load(cache_dir / f"{split}_{key}.npy") for key in manifest.get("extras", [])}
    if list(images.shape) != list(manifest["shape"][split]) or not len(labels) == len(names) == images.shape[0] \
            or any(len(a) != len(labels) for a in extras.values()):
        raise CacheError(f"cache {cache_dir}: the {split} files disagree with {MANIFEST}; rebuild it")
    return CacheSplit(images, labels.astype(np.int64, copy=False), names, list(manifest["classes"]), manifest,
                      extras)


def split_indices(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """The fixed seeded validation split of the n training objects (SPEC Sec. 1).

    Args:
        n: number of training objects (at least 2).
        val_fraction: share held out for validation, in (0, 1); rounded, at least 1 and at most n - 1 objects.
        seed: seed of the shuffle.
    Returns:
        (train, val): sorted int64 index arrays, disjoint, together 0..n-1; train is D_train.
    """
    if n < 2:
        raise ValueError(f"n={n}: at least 2 training objects are needed to hold out a validation split")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


class Staging:
    """Temporary files in the cache folder that become the cache by rename, or vanish on failure: `path(final)`
    names a temporary file, `commit(manifest)` renames them all and writes the manifest last, `discard()` cleans up."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.cache_dir.iterdir():  # from a build that was killed
            if _TMP_FILE.match(leftover.name):
                log.info("removing %s left by an interrupted build", leftover)
                leftover.unlink(missing_ok=True)
        self.token = secrets.token_hex(4)
        self.paths: Dict[str, Path] = {}

    def path(self, final: str) -> Path:
        self.paths[final] = self.cache_dir / f".{final}.{self.token}.tmp"
        return self.paths[final]

    def commit(self, manifest: dict) -> Path:
        # The old manifest goes first so no moment exists where it vouches for new, half-renamed files.
        (self.cache_dir / MANIFEST).unlink(missing_ok=True)
        for final, tmp in self.paths.items():
            os.replace(tmp, self.cache_dir / final)
        self.paths.clear()
        save_json(manifest, self.cache_dir / MANIFEST)
        return self.cache_dir

    def discard(self) -> None:
        for tmp in self.paths.values():
            tmp.unlink(missing_ok=True)
        self.paths.clear()


def make_manifest(classes: Sequence[str], shapes: Dict[str, tuple], source: dict, extras: Sequence[str] = ()
                  ) -> dict:
    """The manifest of a cache with these classes, split shapes (N, V, C, H, W), source and extras."""
    _, v, c, h, w = shapes["train"]
    splits = [s for s in ALL_SPLITS if s in shapes]
    return {
        "format_version": FORMAT_VERSION,
        "classes": list(classes),
        "splits": splits,
        "counts": {s: int(shapes[s][0]) for s in splits},
        "shape": {s: [int(d) for d in shapes[s]] for s in splits},
        "views": int(v),
        "channels": int(c),
        "image_size": int(h) if h == w else [int(h), int(w)],
        "extras": list(extras),
        "source": source,
    }


def write_split_meta(staging: Staging, split: str, labels: np.ndarray, names: Sequence[str]) -> None:
    """Stage a split's labels and names."""
    files = split_files(split)
    with open(staging.path(files["labels"]), "wb") as f:
        np.save(f, np.asarray(labels, dtype=np.int64))
    staging.path(files["names"]).write_text(json.dumps(list(names)))


def write_cache(cache_dir: Path, splits: Dict[str, Tuple[np.ndarray, np.ndarray, List[str]]],
                classes: Sequence[str], source: dict,
                extras: Optional[Dict[str, Dict[str, np.ndarray]]] = None) -> Path:
    """Atomically write a complete cache from in-memory arrays (used by the embedded and digit datasets).

    Args:
        cache_dir: the cache folder (created if needed; other files in it are left alone).
        splits: {"train": (images, labels, names), "test": (...)} and optionally "val" (a stored validation
            split), images (N, V, C, H, W) uint8 with the same V >= 1, C in {1, 3}, H and W in every split,
            labels (N,) class indices, names N object names.
        classes: the class names; a label is an index into them.
        source: what the cache was built from, recorded in the manifest.
        extras: optional per-object arrays, {split: {key: array (N, ...)}}, the same keys for every split
            (lower-case names); read back as `CacheSplit.extras`.
    Returns:
        cache_dir.
    """
    if not set(SPLITS) <= set(splits) <= set(ALL_SPLITS):
        raise ValueError(f"splits has keys {sorted(splits)}; {' and '.join(SPLITS)} are required, val is "
                         "optional, nothing else is allowed")
    extras = extras or {}
    keys = sorted(next(iter(extras.values()), {}))
    if extras and (set(extras) != set(splits) or any(sorted(e) != keys for e in extras.values())
                   or not all(_EXTRA_KEY.match(k) and k not in ("images", "labels", "names") for k in keys)):
        raise ValueError(f"extras must give the same lower-case keys (not images, labels, names) for every split "
                         f"{sorted(splits)}; got {({s: sorted(e) for s, e in extras.items()})}")
    shapes = {}
    for split, (images, labels, names) in splits.items():
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 5 or images.shape[1] < 1 or images.shape[2] not in (1, 3):
            raise ValueError(f"{split} images are {images.dtype} {images.shape}; "
                             f"expected uint8 (N, V, C, H, W) with V >= 1 views and C = 1 or 3")
        n = images.shape[0]
        if labels.shape != (n,) or len(names) != n:
            raise ValueError(f"{split}: {n} images but labels of shape {labels.shape} and {len(names)} names")
        if n and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"{split} labels must be in 0..{len(classes) - 1} (indices into classes)")
        for key in keys:
            if len(extras[split][key]) != n:
                raise ValueError(f"{split} extra {key!r} has {len(extras[split][key])} rows; expected {n}")
        shapes[split] = images.shape
    for split in splits:
        if shapes[split][1:] != shapes["train"][1:]:
            raise ValueError(f"train images {shapes['train']} and {split} images {shapes[split]} differ in "
                             "(V, C, H, W)")
    staging = Staging(cache_dir)
    try:
        for split, (images, labels, names) in splits.items():
            with open(staging.path(split_files(split)["images"]), "wb") as f:
                np.save(f, np.ascontiguousarray(images))
            write_split_meta(staging, split, labels, names)
            for key in keys:
                with open(staging.path(f"{split}_{key}.npy"), "wb") as f:
                    np.save(f, np.asarray(extras[split][key]))
        return staging.commit(make_manifest(classes, shapes, source, keys))
    finally:
        staging.discard()
