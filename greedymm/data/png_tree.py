"""The .npy cache built from rendered PNGs in the ModelNet layout (SPEC Sec. 1): `{class}/{train,test}/
{class}_{NNNN}.obj.shaded_v{001..012}.png`, 12 views per object, decoded in parallel worker processes that import
numpy and PIL only (never torch), into the cache format of `cache.py`.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import multiprocessing
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import cache
from .cache import (NUM_VIEWS, SPLITS, CacheError, Staging, cache_is_current, make_manifest, split_files,
                    write_split_meta)

log = logging.getLogger(__name__)

# `{class}_{NNNN}.obj.shaded_v{001..012}.png` -> object name `{class}_{NNNN}` (also `name_v001.png`).
_VIEW_FILE = re.compile(r"^(?P<obj>.+?)(?:\.(?:obj|off))?[._](?:shaded_)?v\d+\.png$", re.IGNORECASE)
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_CHUNK_OBJECTS = 16  # most objects per worker task: small enough for a smooth progress bar


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
    context = multiprocessing.get_context(cache.START_METHOD)  # read here: tests and benchmarks switch it
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
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
    staging = Staging(cache_dir)
    try:
        for channels in (1, 3):  # optimistic: gray renders (C = 1); restart with C = 3 on the first colour render
            shapes, tasks = {}, []
            for split in SPLITS:
                shapes[split] = (len(objects[split]), NUM_VIEWS, channels, out_size[1], out_size[0])
                path = staging.path(split_files(split)["images"])
                _allocate(path, shapes[split])
                files = [o.files for o in objects[split]]
                tasks += [(str(path), i, files[i:i + chunk], channels, out_size, ref)
                          for i in range(0, len(files), chunk)]
            with tqdm(total=n_total, unit="obj", desc="npy cache", disable=not progress) as bar:
                if _fill_all(tasks, workers, bar):
                    break
            log.info("the renders have colour: rebuilding with 3 channels")
        for split in SPLITS:
            write_split_meta(staging, split, [o.label for o in objects[split]], [o.name for o in objects[split]])
        return staging.commit(make_manifest(classes, shapes, {**source, "root": str(image_root.resolve())}))
    finally:
        staging.discard()
