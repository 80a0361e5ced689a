"""Convex primitives (boxes, spheres, capped cylinders) and their 12 orthographic renders around the vertical axis,
as the MVCNN cameras take them (SPEC Sec. 1): the renderer of the embedded dataset, numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .cache import NUM_VIEWS

ELEVATION_DEG = 30.0  # camera elevation above the horizontal, as in the MVCNN renders
ROLES = ("body", "front", "rear")  # what a part is: shared by all classes, or one of the two class cues
KINDS = ("box", "sphere", "cylinder")
EXTENT = 0.92  # half the side of the orthographic image plane, in object units

_FAR = 4.0  # rays start this far from the origin, behind every part
_AMBIENT = 0.2  # share of the light reaching surfaces turned away from the lamp


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


def part_extent(p: Part) -> np.ndarray:
    """Half-sides of the axis-aligned box around a part."""
    if p.kind == "box":
        return np.asarray(p.half)
    if p.kind == "sphere":
        return np.full(3, p.half[0])
    ext = np.full(3, p.half[0])
    ext[p.axis] = p.half[1]
    return ext


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
    s = ((np.arange(n) + 0.5) / n * 2 - 1) * EXTENT  # pixel centres on the image plane
    sx, sy = np.meshgrid(s, -s)  # row 0 is the top of the image
    # Only rays through the disc that the object's bounding sphere (centred at the origin) projects to can hit.
    reach = max(np.linalg.norm(np.abs(p.center) + part_extent(p)) for p in obj.parts)
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
        radius = part.half[0] if part.kind == "sphere" else np.linalg.norm(part_extent(part))
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
