"""The memory-mappable .npy cache of the multi-view datasets (SPEC Sec. 1 and 10).

Owns the cache format: per split (train, test and an optional stored val) `{split}_images.npy` (N, V, C, H, W)
uint8 with V views per object (12 renders, 2 digits), `{split}_labels.npy`, `{split}_names.json`, optional
per-object extras `{split}_{key}.npy`, and `manifest.json` (written last; a cache is complete only when its manifest
exists and matches).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..config import save_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
NUM_VIEWS = 12  # views per object in a render tree (the MVCNN layout)
SPLITS = ("train", "test")  # in every cache
ALL_SPLITS = ("train", "val", "test")  # "val": a stored validation split (else one is carved from train)
MANIFEST = "manifest.json"
# `{class}_{NNNN}.obj.shaded_v{001..012}.png` -> object name `{class}_{NNNN}` (also `name_v001.png`).
_VIEW_FILE = re.compile(r"^(?P<obj>.+?)(?:\.(?:obj|off))?[._](?:shaded_)?v\d+\.png$", re.IGNORECASE)
_TMP_FILE = re.compile(r"^\.(?:train|val|test)_\w+\.(?:npy|json)\.[0-9a-f]+\.tmp$")
_EXTRA_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# Worker processes are never forked from the caller: forking a process where torch already runs threads can deadlock
# (Python 3.12+ warns). Linux: forkserver (workers fork from a clean server process, started once); elsewhere spawn.
# A worker imports the module of its task (numpy, PIL; never torch: greedymm.data imports lazily) and, by Python's
# rule, re-runs the top level of the caller's main script: nothing in a notebook (the kernel's launcher), a script's
# imports otherwise. Tasks are plain, picklable data.
START_METHOD = "forkserver" if sys.platform.startswith("linux") else "spawn"
_CHUNK_OBJECTS = 16  # most objects per worker task: small enough for a smooth progress bar


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


def _files(split: str) -> Dict[str, str]:
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
            files = _files(split)
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
    files = _files(split)
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


class _Staging:
    """Temporary files in the cache folder that become the cache by rename, or vanish on failure."""

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


def _manifest(classes: Sequence[str], shapes: Dict[str, tuple], source: dict, extras: Sequence[str] = ()) -> dict:
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


def _write_meta(staging: _Staging, split: str, labels: np.ndarray, names: Sequence[str]) -> None:
    files = _files(split)
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
    staging = _Staging(cache_dir)
    try:
        for split, (images, labels, names) in splits.items():
            with open(staging.path(_files(split)["images"]), "wb") as f:
                np.save(f, np.ascontiguousarray(images))
            _write_meta(staging, split, labels, names)
            for key in keys:
                with open(staging.path(f"{split}_{key}.npy"), "wb") as f:
                    np.save(f, np.asarray(extras[split][key]))
        return staging.commit(_manifest(classes, shapes, source, keys))
    finally:
        staging.discard()


@dataclass
class _Obj:
    name: str
    label: int
    files: List[str]  # the 12 view files, sorted by name (v001..v012 -> view 0..11)


def _scan_tree(image_root: Path, classes: Sequence[str]) -> Tuple[Dict[str, List[_Obj]], str]:
    """List every object of both splits in the ModelNet layout, and fingerprint the tree (names and sizes)."""
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder {image_root} does not exist")
    label_of = {c: i for i, c in enumerate(classes)}
    objects: Dict[str, List[_Obj]] = {s: [] for s in SPLITS}
    lines: List[str] = []
    found = set()
    for class_dir in sorted(p for p in image_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if class_dir.name not in label_of:
            raise CacheError(f"class folder {class_dir} is not one of the {len(classes)} allowed classes "
                             f"({', '.join(classes)})")
        found.add(class_dir.name)
        for split in SPLITS:
            split_dir = class_dir / split
            if not split_dir.is_dir():
                raise FileNotFoundError(f"split folder {split_dir} is missing: every class folder must hold "
                                        f"{' and '.join(SPLITS)} folders")
            views: Dict[str, List[str]] = {}
            with os.scandir(split_dir) as entries:
                for entry in entries:
                    if not entry.name.lower().endswith(".png") or not entry.is_file():
                        continue
                    match = _VIEW_FILE.match(entry.name)
                    if match is None:
                        raise CacheError(f"{entry.path} is not named like {{class}}_{{NNNN}}.obj.shaded_v{{NNN}}.png")
                    views.setdefault(match["obj"], []).append(entry.name)
                    lines.append(f"{class_dir.name}/{split}/{entry.name}\t{entry.stat().st_size}")
            for name in sorted(views):
                if len(views[name]) != NUM_VIEWS:
                    raise CacheError(f"object {name} in {split_dir} has {len(views[name])} views; "
                                     f"expected {NUM_VIEWS}")
                files = [str(split_dir / f) for f in sorted(views[name])]
                objects[split].append(_Obj(name, label_of[class_dir.name], files))
    missing = [c for c in classes if c not in found]
    if missing:
        log.warning("%d of %d classes have no folder in %s: %s", len(missing), len(classes), image_root,
                    ", ".join(missing))
    for split in SPLITS:
        if not objects[split]:
            raise CacheError(f"no {split} objects found in {image_root}/{{class}}/{split}/")
    objects = {s: sorted(objs, key=lambda o: (o.label, o.name)) for s, objs in objects.items()}
    fingerprint = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    return objects, fingerprint


def _image_size(path: str) -> Tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as err:  # PIL raises several types for a bad file
        raise CacheError(f"cannot read image {path}: {err}") from None


def _read_view(path: str, channels: int, out_size: Tuple[int, int], ref: Tuple[str, Tuple[int, int]]
               ) -> Optional[np.ndarray]:
    """One render as (C, H, W) uint8, or None when C = 1 was asked but the render has colour."""
    try:
        with Image.open(path) as img:
            img.load()
            size = img.size
            if size == ref[1]:
                if img.mode not in ("L", "RGB"):
                    img = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
                if out_size != size:
                    img = img.resize(out_size, Image.BILINEAR)
                arr = np.asarray(img)  # (H, W) or (H, W, 3)
    except Exception as err:  # PIL raises several types for a corrupt file
        raise CacheError(f"cannot read image {path}: {err}") from None
    if size != ref[1]:
        raise CacheError(f"image {path} is {size[0]}x{size[1]} pixels but {ref[0]} is {ref[1][0]}x{ref[1][1]}; "
                         "all renders must have the same size")
    if arr.ndim == 2:
        return arr[None] if channels == 1 else np.broadcast_to(arr, (3,) + arr.shape)
    if channels == 3:
        return arr.transpose(2, 0, 1)
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
        return arr[None, :, :, 0]
    return None


def _allocate(path: Path, shape: tuple) -> None:
    """Create the .npy file of `shape` uint8 (sparse until written) for the workers to fill."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    del images


def _fill_chunk(path: str, start: int, files: List[List[str]], channels: int, out_size: Tuple[int, int],
                ref: Tuple[str, Tuple[int, int]]) -> bool:
    """Worker task: decode objects start.. into the memory-mapped (N, 12, C, H, W) array at `path`.

    Returns False (and stops) when C = 1 was assumed but a render has colour.
    """
    images = np.lib.format.open_memmap(path, mode="r+")
    try:
        for i, views in enumerate(files):
            for v, view_path in enumerate(views):
                arr = _read_view(view_path, channels, out_size, ref)
                if arr is None:
                    return False
                images[start + i, v] = arr
        return True
    finally:
        del images  # unmap; the page cache keeps what was written for the parent


def _fill_all(tasks: List[tuple], workers: int, bar: tqdm) -> bool:
    """Run the chunk tasks (in this process when workers == 1); False when a render had colour."""
    if workers == 1:
        for task in tasks:
            if not _fill_chunk(*task):
                return False
            bar.update(len(task[2]))
        return True
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(START_METHOD))
    try:
        futures = {pool.submit(_fill_chunk, *task): len(task[2]) for task in tasks}
        for future in concurrent.futures.as_completed(futures):
            if not future.result():  # re-raises a worker's CacheError with its message
                return False
            bar.update(futures[future])
        return True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def build_cache(image_root: Path, cache_dir: Path, classes: Sequence[str],
                image_size: Optional[int] = None, force: bool = False, workers: int = 0,
                progress: bool = True) -> Path:
    """Build (or reuse) the cache from a PNG tree in the ModelNet layout; a stale cache is rebuilt.

    Stale means another format version, image size, class list or source tree (file names and sizes).

    Args:
        image_root: the folder holding `{class}/{train,test}/{class}_{NNNN}.obj.shaded_v{001..012}.png`.
        cache_dir: where the cache is written (temporary names, renamed at the end; manifest last).
        classes: the allowed class names; a label is an index into them.
        image_size: side of the cached square images (PIL bilinear resize); None keeps the source size.
        force: rebuild even if a current cache exists.
        workers: decoding processes (0 = one per CPU core, 1 = in this process).
        progress: show a tqdm bar counting objects.
    Returns:
        cache_dir.
    """
    image_root, cache_dir, classes = Path(image_root), Path(cache_dir), list(classes)
    if len(set(classes)) != len(classes):
        raise ValueError("classes contains duplicate names")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size={image_size} must be a positive number of pixels, or None")
    if workers < 0:
        raise ValueError(f"workers={workers} must be 0 (one per CPU core) or more")
    objects, fingerprint = _scan_tree(image_root, classes)
    source = {"kind": "png_tree", "objects": {s: len(objects[s]) for s in SPLITS}, "fingerprint": fingerprint}
    expected = {"classes": classes, "source": source}
    if image_size is not None:
        expected["image_size"] = image_size
    if not force and cache_is_current(cache_dir, expected):
        log.info("using the cache in %s", cache_dir)
        return cache_dir

    ref_path = objects["train"][0].files[0]
    ref = (ref_path, _image_size(ref_path))
    out_size = (image_size, image_size) if image_size is not None else ref[1]
    n_total = sum(len(objs) for objs in objects.values())
    workers = workers or os.cpu_count() or 1
    chunk = min(_CHUNK_OBJECTS, max(1, n_total // (4 * workers)))  # >= 4 tasks per worker when possible
    workers = min(workers, -(-n_total // chunk))
    log.info("building the cache %s from %s: %d objects, %d workers", cache_dir, image_root, n_total, workers)
    staging = _Staging(cache_dir)
    try:
        for channels in (1, 3):  # optimistic: gray renders (C = 1); restart with C = 3 on the first colour render
            shapes, tasks = {}, []
            for split in SPLITS:
                shapes[split] = (len(objects[split]), NUM_VIEWS, channels, out_size[1], out_size[0])
                path = staging.path(_files(split)["images"])
                _allocate(path, shapes[split])
                files = [o.files for o in objects[split]]
                tasks += [(str(path), i, files[i:i + chunk], channels, out_size, ref)
                          for i in range(0, len(files), chunk)]
            with tqdm(total=n_total, unit="obj", desc="npy cache", disable=not progress) as bar:
                if _fill_all(tasks, workers, bar):
                    break
            log.info("the renders have colour: rebuilding with 3 channels")
        for split in SPLITS:
            _write_meta(staging, split, [o.label for o in objects[split]], [o.name for o in objects[split]])
        return staging.commit(_manifest(classes, shapes, {**source, "root": str(image_root.resolve())}))
    finally:
        staging.discard()
