"""The embedded data set, registered as "embedded": a rendered stand-in for ModelNet40's 12-view renders (SPEC Sec. 1;
paper Sec. 4, 6.1) whose front view carries a large, fast-learnt class cue and whose rear view a small, slow one.
"""
from __future__ import annotations

# Each object is a cabinet of random size, proportions, base, ornament and yaw (within +-20 degrees). View 0 (front)
# shows a large class-specific relief (dome, shelf boards, door bars, knob grid, drawer block, or none) that reshades
# a big stretch of the image: a CNN learns it in an epoch or two. View 6 (rear) shows a small class-specific part
# (knob, knob pair, cube, short bar) a few pixels across at a random place: learnt several epochs later. Each cue is
# hidden from the other side, so a two-branch network learns m0 first and its m1 branch leans on m0 via the fusion.

import concurrent.futures
import logging
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..config import QUICK_TRAIN, DataConfig
from .cache import NUM_VIEWS, START_METHOD, SPLITS, cache_is_current, write_cache  # workers use numpy only
from .modelnet import RENDERS
from .raycast import ELEVATION_DEG, EmbeddedObject, Part, part_extent, render_views
from .registry import DatasetSpec, register_dataset

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever a change alters the rendered pixels: caches of older versions are rebuilt
# Class names borrowed from ModelNet40 (cabinet-like objects); a label is the index in this tuple.
EMBEDDED_CLASSES = ("bookshelf", "dresser", "night_stand", "radio", "tv_stand", "wardrobe")
MAX_YAW_DEG = 20.0  # objects turn at most this far about the vertical axis, so view 0 stays the front

_MARGIN = 0.06  # cue parts keep this far inside the face they sit on
_MIN_PARALLEL = 96  # fewer objects than this are rendered in this process: starting workers would cost more


# ---------------------------------------------------------------------------------------------------------------
# Objects


def _front_cue(label: int, rng: np.random.Generator, w: float, h: float, y0: float, z: float) -> List[Part]:
    """The large relief of class `label` on the front face (width w, height h, bottom y0, plane z = +depth/2).

    Every part stays inside the face and low enough that the cabinet hides it from the rear camera:
    a part reaching p in front of the face must top out p * tan(elevation) below the cabinet's top.
    """
    top = y0 + h
    hide = np.tan(np.radians(ELEVATION_DEG))
    hide_yaw = np.tan(np.radians(MAX_YAW_DEG))  # a turned cabinet shows p * tan(yaw) of its front's sides
    name = EMBEDDED_CLASSES[label]
    parts: List[Part] = []
    if name == "bookshelf":  # two shelf boards jutting out: bright bands (their tops face the raised camera)
        depth = rng.uniform(0.14, 0.2)
        for frac in (rng.uniform(0.25, 0.35), rng.uniform(0.58, 0.66)):
            parts.append(Part("box", (0.0, y0 + frac * h, z + depth / 2 - 0.01),
                              (w / 2 - _MARGIN - depth * hide_yaw, 0.035, depth / 2 + 0.01), role="front"))
    elif name == "dresser":  # a 2 x 3 grid of round knobs
        r = rng.uniform(0.07, 0.09)
        for fx in (-0.25, 0.25):
            for fy in (0.2, 0.45, 0.7):
                parts.append(Part("sphere", (fx * w, y0 + fy * h, z), (r,), role="front"))
    elif name == "night_stand":  # a plain front
        pass
    elif name == "radio":  # one big speaker dome
        r = rng.uniform(0.26, 0.32) * min(w, h)
        cy = rng.uniform(y0 + r + _MARGIN, top - r * (1 + hide) - _MARGIN)
        parts.append(Part("sphere", (rng.uniform(-0.1, 0.1) * w, cy, z), (r,), role="front"))
    elif name == "tv_stand":  # a wide drawer block on the lower half
        depth = rng.uniform(0.12, 0.18)
        bh = rng.uniform(0.28, 0.36) * h
        parts.append(Part("box", (0.0, y0 + _MARGIN + bh / 2, z + depth / 2 - 0.01),
                          (rng.uniform(0.32, 0.4) * w, bh / 2, depth / 2 + 0.01), role="front"))
    elif name == "wardrobe":  # two long vertical door bars
        r = rng.uniform(0.04, 0.05)
        length = rng.uniform(0.5, 0.6) * h
        for fx in (-0.12, 0.12):
            parts.append(Part("cylinder", (fx * w, y0 + 0.45 * h, z), (r, length / 2), axis=1, role="front"))
    return parts


def _rear_cue(label: int, rng: np.random.Generator, w: float, h: float, y0: float, z: float) -> List[Part]:
    """The small part of class `label` on the rear face (width w, height h, bottom y0, plane z = -depth/2)."""
    k = rng.uniform(0.19, 0.22)  # the cue's size; no cue reaches further than 1.2 k from its centre
    reach = 1.2 * k + 0.02
    # Within half the free range around the face's middle (anywhere on the face, it takes far longer to learn),
    # and low enough that the cabinet hides it from the front camera, which looks down over the top edge.
    cx = rng.uniform(-1, 1) * (w / 2 - reach - _MARGIN) / 2
    lo, hi = y0 + reach, y0 + h - reach - k * np.tan(np.radians(ELEVATION_DEG))
    cy = (lo + hi) / 2 + rng.uniform(-1, 1) * (hi - lo) / 4
    name = EMBEDDED_CLASSES[label]
    if name == "bookshelf":  # a cube
        return [Part("box", (cx, cy, z - k / 2 + 0.01), (k / 2, k / 2, k / 2 + 0.01), role="rear")]
    if name == "dresser":  # a short vertical bar
        return [Part("cylinder", (cx, cy, z), (0.3 * k, 0.9 * k), axis=1, role="rear")]
    if name == "night_stand":  # two knobs side by side
        return [Part("sphere", (cx + s * 0.7 * k, cy, z), (0.5 * k,), role="rear") for s in (-1, 1)]
    if name == "radio":  # one knob
        return [Part("sphere", (cx, cy, z), (0.6 * k,), role="rear")]
    if name == "tv_stand":  # two knobs stacked
        return [Part("sphere", (cx, cy + s * 0.7 * k, z), (0.5 * k,), role="rear") for s in (-1, 1)]
    # wardrobe: a short horizontal bar
    return [Part("cylinder", (cx, cy, z), (0.3 * k, 0.9 * k), axis=0, role="rear")]


def sample_object(label: int, rng: np.random.Generator) -> EmbeddedObject:
    """Draw one object of class `label`: a cabinet with random size, proportions, base, ornament and yaw.

    Args:
        label: index into EMBEDDED_CLASSES.
        rng: the generator the object is drawn from (its state advances).
    Returns:
        The object, centred so that its class-independent parts fit the image in every view.
    """
    if not 0 <= label < len(EMBEDDED_CLASSES):
        raise ValueError(f"label={label} must be in 0..{len(EMBEDDED_CLASSES) - 1} (indices into EMBEDDED_CLASSES)")
    w, h, d = rng.uniform(0.9, 1.25), rng.uniform(0.8, 1.1), rng.uniform(0.5, 0.75)
    base = rng.uniform(0.06, 0.22)
    parts: List[Part] = []
    if rng.random() < 0.5:  # four legs
        r = rng.uniform(0.03, 0.05)
        for sx in (-1, 1):
            for sz in (-1, 1):
                parts.append(Part("cylinder", (sx * (w / 2 - 0.08), base / 2, sz * (d / 2 - 0.08)), (r, base / 2)))
    else:  # a plinth, slightly inset
        parts.append(Part("box", (0.0, base / 2, 0.0), (w / 2 - 0.05, base / 2, d / 2 - 0.05)))
    parts.append(Part("box", (0.0, base + h / 2, 0.0), (w / 2, h / 2, d / 2)))  # the cabinet
    top = base + h
    ornament = rng.integers(3)  # none, a ball or a small box on top, with every class
    if ornament == 1:
        r = rng.uniform(0.08, 0.14)
        parts.append(Part("sphere", (rng.uniform(-0.3, 0.3) * w, top + r * 0.7, rng.uniform(-0.2, 0.2) * d), (r,)))
    elif ornament == 2:
        hw, hh = rng.uniform(0.1, 0.25), rng.uniform(0.04, 0.1)
        parts.append(Part("box", (rng.uniform(-0.2, 0.2) * w, top + hh, 0.0), (hw, hh, rng.uniform(0.1, 0.2))))
    scale = rng.uniform(0.85, 1.0)
    yaw = np.radians(rng.uniform(-MAX_YAW_DEG, MAX_YAW_DEG))
    # Centre on the class-independent parts only, so that the position in the image says nothing of the class.
    lo = np.min([np.subtract(p.center, part_extent(p)) for p in parts], axis=0)
    hi = np.max([np.add(p.center, part_extent(p)) for p in parts], axis=0)
    shift = -(lo + hi) / 2
    # The cues come last: the same generator state gives the same cabinet whatever the class.
    parts += _front_cue(label, rng, w, h, base, d / 2)
    parts += _rear_cue(label, rng, w, h, base, -d / 2)
    parts = [Part(p.kind, tuple(float(c) for c in (np.add(p.center, shift)) * scale),
                  tuple(float(x) * scale for x in p.half), p.axis, p.role) for p in parts]
    return EmbeddedObject(label, tuple(parts), float(yaw))


# ---------------------------------------------------------------------------------------------------------------
# The data set


def embedded_source(cfg: DataConfig) -> dict:
    """What an embedded cache is built from; a cache whose manifest records another source is rebuilt.

    Args:
        cfg: the data config (its embedded_* fields and image_size count).
    Returns:
        {"kind": "embedded", "seed", "per_class", "test_per_class", "image_size", "version"}.
    """
    return {"kind": "embedded", "seed": cfg.embedded_seed, "per_class": cfg.embedded_per_class,
            "test_per_class": cfg.embedded_test_per_class, "image_size": cfg.image_size,
            "version": GENERATOR_VERSION}


def _numbers(cfg: DataConfig) -> Dict[str, range]:
    """The object numbers of each split within a class, 1-based and contiguous, test after train (as ModelNet)."""
    total = cfg.embedded_per_class + cfg.embedded_test_per_class
    if total > 9999:
        raise ValueError(f"embedded_per_class + embedded_test_per_class = {total}: at most 9999 objects per class "
                         "fit the 4-digit ModelNet names")
    return {"train": range(1, cfg.embedded_per_class + 1), "test": range(cfg.embedded_per_class + 1, total + 1)}


def _render_chunk(seed: int, label: int, numbers: Sequence[int], image_size: int) -> np.ndarray:
    """Worker task: objects `numbers` of class `label`, (n, 12, 1, H, W); object k is drawn from rng(seed, label, k)."""
    out = np.empty((len(numbers), NUM_VIEWS, 1, image_size, image_size), np.uint8)
    for i, number in enumerate(numbers):
        obj = sample_object(label, np.random.default_rng([seed, label, number]))
        out[i, :, 0] = render_views(obj, image_size)
    return out


def render_dataset(cfg: DataConfig, progress: bool = True,
                   workers: Optional[int] = None) -> Dict[str, Tuple[np.ndarray, np.ndarray, List[str]]]:
    """Render both splits in memory, ordered by class, then by object number (the order `build_cache` gives).

    Args:
        cfg: embedded_seed, embedded_per_class, embedded_test_per_class and image_size are used.
        progress: show a tqdm bar counting objects.
        workers: rendering processes; None takes cfg.cache_workers (0 = one per CPU core), 1 renders here.
    Returns:
        {"train": (images, labels, names), "test": (...)}: images (N, 12, 1, H, W) uint8, labels (N,) int64
        indices into EMBEDDED_CLASSES, names like "radio_0007"; the pixels depend on the config alone.
    """
    numbers = _numbers(cfg)
    workers = cfg.cache_workers if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers={workers} must be 0 (one per CPU core) or more")
    workers = workers or os.cpu_count() or 1
    # Tasks of at most 16 objects keep the bar smooth and the workers busy to the end.
    tasks = [(split, label, numbers[split][i:i + 16]) for split in SPLITS
             for label in range(len(EMBEDDED_CLASSES)) for i in range(0, len(numbers[split]), 16)]
    n_total = sum(len(r) for r in numbers.values()) * len(EMBEDDED_CLASSES)
    chunks: Dict[tuple, np.ndarray] = {}
    with tqdm(total=n_total, unit="obj", desc="embedded renders", disable=not progress) as bar:
        if workers == 1 or n_total < _MIN_PARALLEL:
            for task in tasks:
                chunks[task] = _render_chunk(cfg.embedded_seed, task[1], task[2], cfg.image_size)
                bar.update(len(task[2]))
        else:
            context = multiprocessing.get_context(START_METHOD)
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
                futures = {pool.submit(_render_chunk, cfg.embedded_seed, t[1], t[2], cfg.image_size): t for t in tasks}
                for future in concurrent.futures.as_completed(futures):
                    chunks[futures[future]] = future.result()
                    bar.update(len(futures[future][2]))
    splits = {}
    for split in SPLITS:
        keys = [t for t in tasks if t[0] == split]  # already in class, then number, order
        images = np.concatenate([chunks[t] for t in keys])
        labels = np.repeat(np.arange(len(EMBEDDED_CLASSES), dtype=np.int64), len(numbers[split]))
        names = [f"{EMBEDDED_CLASSES[label]}_{k:04d}" for label in range(len(EMBEDDED_CLASSES))
                 for k in numbers[split]]
        splits[split] = (images, labels, names)
    return splits


def build_embedded_cache(cfg: DataConfig, cache_dir: Path, force: bool = False, progress: bool = True) -> Path:
    """Reuse the embedded cache in `cache_dir` if it is current, else render the data set and write it there.

    Args:
        cfg: the data config (see `embedded_source` for what makes a cache current; cache_workers render).
        cache_dir: the cache folder (written atomically, manifest last).
        force: render and rewrite even if a current cache exists.
        progress: show a tqdm bar while rendering.
    Returns:
        cache_dir.
    """
    cache_dir = Path(cache_dir)
    source = embedded_source(cfg)
    expected = {"classes": list(EMBEDDED_CLASSES), "image_size": cfg.image_size, "source": source}
    if not force and cache_is_current(cache_dir, expected):
        log.info("using the embedded cache in %s", cache_dir)
        return cache_dir
    log.info("rendering the embedded data set into %s", cache_dir)
    return write_cache(cache_dir, render_dataset(cfg, progress=progress), EMBEDDED_CLASSES, source)


def write_png_tree(root: Path, cfg: DataConfig, progress: bool = True) -> Path:
    """Write the embedded data set as gray PNGs in the ModelNet layout, e.g. for `cache.build_cache`.

    Files are `{root}/{class}/{train,test}/{class}_{NNNN}.obj.shaded_v{001..012}.png`, NNNN numbering each
    class's training objects from 0001 and its test objects on from there, as ModelNet does. The tree is
    written under a temporary name next to `root` and renamed at the end.

    Args:
        root: the folder to create; it must not exist or be empty.
        cfg: the data config, as for `render_dataset`.
        progress: show a tqdm bar while rendering.
    Returns:
        root.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} already exists and is not an empty folder; choose a new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    splits = render_dataset(cfg, progress=progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the tree is ordinary data
        for split, (images, labels, names) in splits.items():
            for obj, label, name in zip(images, labels, names):
                folder = tmp / EMBEDDED_CLASSES[label] / split
                folder.mkdir(parents=True, exist_ok=True)
                for v in range(NUM_VIEWS):
                    Image.fromarray(obj[v, 0]).save(folder / f"{name}.obj.shaded_v{v + 1:03d}.png")
        os.replace(tmp, root)  # replaces an empty folder too
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


# A rendered stand-in of the renders: 12 views, front (0) and rear (6), at 224 px like ModelNet40 by default, 20% of
# the training objects held out, ResNet18 branches; trained with `TrainConfig.quick()`'s few-minute CPU protocol.
register_dataset(DatasetSpec(
    name="embedded", num_views=NUM_VIEWS, default_views=(0, 6), image_size=224, val_fraction=0.2,
    input_format=RENDERS, cache_builder="greedymm.data.embedded:build_embedded_cache", default_model="resnet18",
    family="renders", identical_view=0, data_dir="ModelNet", train_preset=QUICK_TRAIN,
    own_fields=("embedded_per_class", "embedded_test_per_class", "embedded_seed"), order=1))
