"""The embedded data set: a rendered stand-in for ModelNet40's 12-view renders (SPEC Sec. 1; paper Sec. 4, 6.1).

Each object is a cabinet of random size, proportions, base, ornament and yaw (within +-20 degrees). View 0 (front)
shows a large class-specific relief (dome, shelf boards, door bars, knob grid, drawer block, or none) that reshades
a big stretch of the image: a CNN learns it in an epoch or two. View 6 (rear) shows a small class-specific part
(knob, knob pair, cube, short bar) a few pixels across at a random place: learnt several epochs later. Each cue is
hidden from the other side, so a two-branch network learns m0 first and its m1 branch leans on m0 via the fusion.
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..config import DataConfig
from .cache import NUM_VIEWS, START_METHOD, SPLITS, cache_is_current, write_cache  # workers use numpy only

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever a change alters the rendered pixels: caches of older versions are rebuilt
# Class names borrowed from ModelNet40 (cabinet-like objects); a label is the index in this tuple.
EMBEDDED_CLASSES = ("bookshelf", "dresser", "night_stand", "radio", "tv_stand", "wardrobe")
ELEVATION_DEG = 30.0  # camera elevation above the horizontal, as in the MVCNN renders
MAX_YAW_DEG = 20.0  # objects turn at most this far about the vertical axis, so view 0 stays the front
ROLES = ("body", "front", "rear")  # what a part is: shared by all classes, or one of the two class cues
KINDS = ("box", "sphere", "cylinder")

_EXTENT = 0.92  # half the side of the orthographic image plane, in object units
_FAR = 4.0  # rays start this far from the origin, behind every part
_AMBIENT = 0.2  # share of the light reaching surfaces turned away from the lamp
_MARGIN = 0.06  # cue parts keep this far inside the face they sit on
_MIN_PARALLEL = 96  # fewer objects than this are rendered in this process: starting workers would cost more


@dataclass(frozen=True)
class Part:
    """One convex primitive in the object frame (y up, front face towards +z).

    kind "box": `center` and `half` (3 half-sides); "sphere": `center`, radius `half[0]`;
    "cylinder": `center`, radius `half[0]`, half-length `half[1]`, along axis `axis` (0 = x, 1 = y, 2 = z).
    """

    kind: str
    center: Tuple[float, float, float]
    half: Tuple[float, ...]
    axis: int = 1
    role: str = "body"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is unknown; allowed: {', '.join(KINDS)}")
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} is unknown; allowed: {', '.join(ROLES)}")
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis={self.axis} must be 0 (x), 1 (y) or 2 (z)")


@dataclass(frozen=True)
class EmbeddedObject:
    """A labelled object: its parts and its turn about the vertical axis (radians, counter-clockwise from above)."""

    label: int
    parts: Tuple[Part, ...]
    yaw: float = 0.0

    def without(self, role: str) -> "EmbeddedObject":
        """The same object with every part of `role` ("front" or "rear") removed."""
        if role not in ROLES:
            raise ValueError(f"role={role!r} is unknown; allowed: {', '.join(ROLES)}")
        return EmbeddedObject(self.label, tuple(p for p in self.parts if p.role != role), self.yaw)


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
    lo = np.min([np.subtract(p.center, _extent(p)) for p in parts], axis=0)
    hi = np.max([np.add(p.center, _extent(p)) for p in parts], axis=0)
    shift = -(lo + hi) / 2
    # The cues come last: the same generator state gives the same cabinet whatever the class.
    parts += _front_cue(label, rng, w, h, base, d / 2)
    parts += _rear_cue(label, rng, w, h, base, -d / 2)
    parts = [Part(p.kind, tuple(float(c) for c in (np.add(p.center, shift)) * scale),
                  tuple(float(x) * scale for x in p.half), p.axis, p.role) for p in parts]
    return EmbeddedObject(label, tuple(parts), float(yaw))


def _extent(p: Part) -> np.ndarray:
    """Half-sides of the axis-aligned box around a part."""
    if p.kind == "box":
        return np.asarray(p.half)
    if p.kind == "sphere":
        return np.full(3, p.half[0])
    ext = np.full(3, p.half[0])
    ext[p.axis] = p.half[1]
    return ext


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _cameras(yaw: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray direction, screen right and screen up of the 12 orthographic cameras in the object frame, each (12, 3).

    View k sits at azimuth 30 k degrees (view 0 in front, on +z; view 6 behind), raised by ELEVATION_DEG.
    Turning the object by `yaw` is the same as turning the cameras by -yaw.
    """
    a = np.radians(30.0 * np.arange(NUM_VIEWS)) - yaw  # (12,)
    e = np.radians(ELEVATION_DEG)
    zero = np.zeros_like(a)
    direction = -np.stack([np.cos(e) * np.sin(a), np.full_like(a, np.sin(e)), np.cos(e) * np.cos(a)], -1)
    right = np.stack([np.cos(a), zero, -np.sin(a)], -1)
    up = np.stack([-np.sin(e) * np.sin(a), np.full_like(a, np.cos(e)), -np.sin(e) * np.cos(a)], -1)
    return direction, right, up


def _hit_box(p: Part, o: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """Entry distance of rays o (3, M) with inverse directions inv (3, M) into a box; inf where missed."""
    c, hlf = np.asarray(p.center, np.float32)[:, None], np.asarray(p.half, np.float32)[:, None]
    t0 = (c - hlf - o) * inv  # (3, M) slab distances
    t1 = (c + hlf - o) * inv
    lo, hi = np.minimum(t0, t1), np.maximum(t0, t1)
    near = np.maximum(np.maximum(lo[0], lo[1]), lo[2])
    far = np.minimum(np.minimum(hi[0], hi[1]), hi[2])
    return np.where(near <= far, near, np.inf)


def _hit_sphere(p: Part, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Entry distance of rays o (3, M) with unit directions d (3, M) into a sphere; inf where missed."""
    oc = o - np.asarray(p.center, np.float32)[:, None]
    b = oc[0] * d[0] + oc[1] * d[1] + oc[2] * d[2]
    disc = b * b - (oc[0] * oc[0] + oc[1] * oc[1] + oc[2] * oc[2]) + p.half[0] ** 2
    return np.where(disc >= 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)


def _hit_cylinder(p: Part, o: np.ndarray, d: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """Entry distance into a capped cylinder: the overlap of the infinite tube and the slab of its caps."""
    a = p.axis
    i, j = [k for k in range(3) if k != a]
    c = p.center
    ox, oy = o[i] - c[i], o[j] - c[j]  # (M,)
    dx, dy = d[i], d[j]  # never both 0: the cameras are raised and no part is tilted
    qa = dx * dx + dy * dy
    qb = ox * dx + oy * dy
    disc = qb * qb - qa * (ox * ox + oy * oy - p.half[0] ** 2)
    root = np.sqrt(np.maximum(disc, 0))
    s0, s1 = (-qb - root) / qa, (-qb + root) / qa
    u0 = (c[a] - p.half[1] - o[a]) * inv[a]
    u1 = (c[a] + p.half[1] - o[a]) * inv[a]
    near = np.maximum(s0, np.minimum(u0, u1))
    far = np.minimum(s1, np.maximum(u0, u1))
    return np.where((disc >= 0) & (near <= far), near, np.inf)


def _normals(p: Part, x: np.ndarray) -> np.ndarray:
    """Outward unit normals (3, M) of part p at surface points x (3, M)."""
    q = x - np.asarray(p.center, np.float32)[:, None]
    if p.kind == "sphere":
        return q / p.half[0]
    cols = np.arange(q.shape[1])
    n = np.zeros_like(q)
    if p.kind == "box":  # the face whose slab the point is closest to leaving
        axis = (np.abs(q) / np.asarray(p.half, np.float32)[:, None]).argmax(0)
        n[axis, cols] = np.sign(q[axis, cols])
        return n
    a = p.axis  # cylinder: a cap where the axial ratio beats the radial one, else the tube
    i, j = [k for k in range(3) if k != a]
    rho = np.maximum(np.sqrt(q[i] ** 2 + q[j] ** 2), 1e-12)
    cap = np.abs(q[a]) / p.half[1] > rho / p.half[0]
    n[i], n[j] = np.where(cap, 0, q[i] / rho), np.where(cap, 0, q[j] / rho)
    n[a] = np.where(cap, np.sign(q[a]), 0)
    return n


def render_views(obj: EmbeddedObject, image_size: int) -> np.ndarray:
    """Render the 12 views of an object: orthographic rays, nearest hit, Lambertian gray shading on black.

    Args:
        obj: the object (see `sample_object`).
        image_size: side of the square images in pixels.
    Returns:
        (12, image_size, image_size) uint8; view k looks from azimuth 30 k degrees (0 = front, 6 = rear).
    """
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be a positive number of pixels")
    if not obj.parts:
        raise ValueError("the object has no parts to render")
    n = image_size
    direction, right, up = _cameras(obj.yaw)  # (12, 3) each
    s = ((np.arange(n) + 0.5) / n * 2 - 1) * _EXTENT  # pixel centres on the image plane
    sx, sy = np.meshgrid(s, -s)  # row 0 is the top of the image
    # Only rays through the disc that the object's bounding sphere (centred at the origin) projects to can hit.
    reach = max(np.linalg.norm(np.abs(p.center) + _extent(p)) for p in obj.parts)
    pixels = np.flatnonzero(sx ** 2 + sy ** 2 <= reach ** 2)  # (Q,) indices into the n * n image
    sx, sy = sx.ravel()[pixels].astype(np.float32), sy.ravel()[pixels].astype(np.float32)
    q = len(pixels)
    # Rays in structure-of-arrays form, view-major: ray m is pixel m % Q of view m // Q; M = 12 Q.
    o = (right.T[:, :, None] * sx + up.T[:, :, None] * sy - _FAR * direction.T[:, :, None])  # (3, 12, Q)
    o = o.astype(np.float32).reshape(3, -1)
    d = np.repeat(direction.T.astype(np.float32), q, axis=1)  # (3, M) unit directions
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(1e30), 1 / d).astype(np.float32)  # a parallel slab: +-1e30 or a sign flip
    depth = np.full(o.shape[1], np.inf, np.float32)  # (M,)
    owner = np.full(o.shape[1], -1, np.int64)
    for k, part in enumerate(obj.parts):
        # Cull to the rays through the disc that the part's bounding sphere projects to, in each view.
        c = np.asarray(part.center)
        radius = part.half[0] if part.kind == "sphere" else np.linalg.norm(_extent(part))
        cx, cy = (right @ c).astype(np.float32), (up @ c).astype(np.float32)  # (12,)
        rays = np.flatnonzero((sx - cx[:, None]) ** 2 + (sy - cy[:, None]) ** 2 <= radius ** 2)  # into (12, Q)
        if part.kind == "box":
            t = _hit_box(part, o[:, rays], inv[:, rays])
        elif part.kind == "sphere":
            t = _hit_sphere(part, o[:, rays], d[:, rays])
        else:
            t = _hit_cylinder(part, o[:, rays], d[:, rays], inv[:, rays])
        closer = t < depth[rays]
        depth[rays[closer]] = t[closer]
        owner[rays[closer]] = k
    # Lamp fixed to the camera: from behind it, up and to the left.
    lamp = -direction + 0.6 * up - 0.3 * right
    lamp = np.repeat((lamp / np.linalg.norm(lamp, axis=-1, keepdims=True)).T.astype(np.float32), q, axis=1)
    shade = np.zeros(o.shape[1], np.float32)
    for k, part in enumerate(obj.parts):
        rays = np.flatnonzero(owner == k)
        x = o[:, rays] + depth[rays] * d[:, rays]  # (3, m) surface points
        lit = (_normals(part, x) * lamp[:, rays]).sum(0)
        shade[rays] = _AMBIENT + (1 - _AMBIENT) * np.maximum(lit, 0)
    image = np.zeros((NUM_VIEWS, n * n), np.uint8)
    image[:, pixels] = np.round(shade * 255).astype(np.uint8).reshape(NUM_VIEWS, q)
    return image.reshape(NUM_VIEWS, n, n)


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
