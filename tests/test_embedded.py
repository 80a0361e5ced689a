"""Tests of the procedurally rendered embedded data set (greedymm/data/embedded.py, its renderer raycast.py)."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from PIL import Image

import greedymm.data.embedded as embedded
import greedymm.data.raycast as raycast
from greedymm.config import DataConfig
from greedymm.data.cache import open_split, read_manifest
from greedymm.data.embedded import (EMBEDDED_CLASSES, build_embedded_cache, render_dataset, sample_object,
                                    write_png_tree)
from greedymm.data.modelnet import MODELNET40_CLASSES
from greedymm.data.png_tree import build_cache
from greedymm.data.raycast import EmbeddedObject, Part, render_views

SMOKE = DataConfig.smoke()  # 32 px, 12 training and 4 test objects per class


@pytest.fixture(scope="module")
def smoke_splits():
    return render_dataset(SMOKE, progress=False, workers=1)


def test_classes_are_modelnet40_names():
    assert 5 <= len(EMBEDDED_CLASSES) <= 8 and len(set(EMBEDDED_CLASSES)) == len(EMBEDDED_CLASSES)
    assert set(EMBEDDED_CLASSES) <= set(MODELNET40_CLASSES)


def test_same_seed_same_pixels_other_seed_other_pixels(smoke_splits):
    again = render_dataset(SMOKE, progress=False, workers=2)  # 96 objects: rendered by two processes
    for split in ("train", "test"):
        for a, b in zip(smoke_splits[split], again[split]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = render_dataset(DataConfig.smoke(embedded_seed=1), progress=False, workers=1)
    assert not np.array_equal(other["train"][0], smoke_splits["train"][0])
    assert other["train"][2] == smoke_splits["train"][2]  # same names and labels, other objects
    # The test objects are other draws than the training objects.
    assert not np.array_equal(smoke_splits["test"][0][:4], smoke_splits["train"][0][:4])


def test_shapes_labels_names_background(smoke_splits):
    for split, per_class, first in (("train", 12, 1), ("test", 4, 13)):
        images, labels, names = smoke_splits[split]
        n = per_class * len(EMBEDDED_CLASSES)
        assert images.shape == (n, 12, 1, 32, 32) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [per_class] * len(EMBEDDED_CLASSES)
        assert (np.diff(labels) >= 0).all()  # class-major, as build_cache orders a PNG tree
        # Numbered like ModelNet: 1-based, 4 digits, the test objects after the training ones.
        assert names[:2] == [f"{EMBEDDED_CLASSES[0]}_{first:04d}", f"{EMBEDDED_CLASSES[0]}_{first + 1:04d}"]
        assert names[-1] == f"{EMBEDDED_CLASSES[-1]}_{first + per_class - 1:04d}"
        # Black background: the whole one-pixel frame of every view is 0, so every object lies fully inside.
        frame = np.concatenate([images[..., 0, :], images[..., -1, :], images[..., 0], images[..., -1]], -1)
        assert frame.max() == 0
        # Every view shows an object of a fair size, lit: the ambient light keeps every surface above black.
        lit = (images > 0).sum(axis=(2, 3, 4))  # (N, 12)
        assert lit.min() > 0.1 * 32 * 32 and images.max() > 200


def test_views_are_rotations(smoke_splits):
    images = smoke_splits["train"][0]
    for k in range(6):  # opposite views never coincide
        assert not any(np.array_equal(obj[k], obj[k + 6]) for obj in images)
    # A sphere looks the same from everywhere (the lamp turns with the camera) and covers pi r^2 pixels.
    ball = EmbeddedObject(0, (Part("sphere", (0.0, 0.0, 0.0), (0.5,)),))
    views = render_views(ball, 64).astype(int)
    assert np.abs(views - views[0]).max() <= 1  # up to float rounding
    assert ((views > 0) == (views[0] > 0)).all()
    px = 64 / (2 * raycast.EXTENT)  # pixels per object unit
    assert abs((views[0] > 0).sum() / (np.pi * (0.5 * px) ** 2) - 1) < 0.03
    # An unturned slab symmetric under x -> -x: view k and view 12 - k are mirror silhouettes; seen from the
    # front (view 0) it is 1 unit wide, from the side (view 3) 0.4 units.
    slab = EmbeddedObject(0, (Part("box", (0.0, 0.0, 0.0), (0.5, 0.3, 0.2)),), yaw=0.0)
    masks = render_views(slab, 64) > 0
    for k in range(1, 6):
        np.testing.assert_array_equal(masks[k], masks[12 - k][:, ::-1])
    widths = masks.any(axis=1).sum(axis=1)  # (12,) columns covered
    assert abs(widths[0] - 1.0 * px) <= 1 and abs(widths[3] - 0.4 * px) <= 1
    # Turning the object turns the views: yaw = 30 degrees moves view 1's picture to view 0.
    turned = render_views(EmbeddedObject(0, slab.parts, yaw=np.radians(-30.0)), 64) > 0
    np.testing.assert_array_equal(turned[0], masks[1])


def test_each_cue_is_hidden_from_the_other_side():
    """Removing the front cue never changes the rear view, and vice versa; each cue shows in its own view."""
    for label, i in itertools.product(range(len(EMBEDDED_CLASSES)), range(6)):
        obj = sample_object(label, np.random.default_rng([7, label, i]))
        full = render_views(obj, 48)
        no_front, no_rear = render_views(obj.without("front"), 48), render_views(obj.without("rear"), 48)
        np.testing.assert_array_equal(no_front[6], full[6])
        np.testing.assert_array_equal(no_rear[0], full[0])
        assert (no_rear[6] != full[6]).sum() >= 5
        if EMBEDDED_CLASSES[label] != "night_stand":  # its front is plain
            assert (no_front[0] != full[0]).sum() >= 20


def test_front_cue_is_coarse_rear_cue_is_fine():
    """The front cue changes a large stretch of view 0, the rear cue a small patch of view 6: the coarse front
    cue is the fast one to learn, the rear detail the slow one."""
    area, box = {"front": [], "rear": []}, {"front": [], "rear": []}
    for label, i in itertools.product(range(len(EMBEDDED_CLASSES)), range(4)):
        obj = sample_object(label, np.random.default_rng([3, label, i]))
        full = render_views(obj, 64)
        for role, view in (("front", 0), ("rear", 6)):
            if role == "front" and EMBEDDED_CLASSES[label] == "night_stand":
                continue
            ys, xs = np.nonzero(render_views(obj.without(role), 64)[view] != full[view])  # pixels the cue owns
            area[role].append(len(ys))
            box[role].append((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    assert np.mean(area["front"]) > 2 * np.mean(area["rear"])
    assert np.mean(box["front"]) > 3.5 * np.mean(box["rear"])
    assert 15 <= np.min(area["rear"]) and np.max(box["rear"]) < 0.05 * 64 * 64  # visible, yet a few pixels across
    # With the generator in the same state, every class gets the same cabinet: views 0 and 6 alone tell the class.
    views = [render_views(sample_object(c, np.random.default_rng(11)), 32) for c in range(len(EMBEDDED_CLASSES))]
    for a, b in itertools.combinations(views, 2):
        assert not np.array_equal(a[0], b[0]) and not np.array_equal(a[6], b[6])


def test_png_tree_layout_pixels_and_build_cache(tmp_path, smoke_splits):
    root = write_png_tree(tmp_path / "tree", SMOKE, progress=False)
    assert root == tmp_path / "tree"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]  # no temporary folder left
    expected = set()
    for split, (images, labels, names) in smoke_splits.items():
        for obj, label, name in zip(images, labels, names):
            for v in range(12):
                rel = f"{EMBEDDED_CLASSES[label]}/{split}/{name}.obj.shaded_v{v + 1:03d}.png"
                expected.add(rel)
                if v in (0, 6) or name.endswith("1"):  # read a share of the files back
                    with Image.open(root / rel) as img:
                        assert img.mode == "L"
                        np.testing.assert_array_equal(np.asarray(img), obj[v, 0])
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} == expected
    # The ModelNet cache builder reads the tree back to the very same arrays.
    from_tree = build_cache(root, tmp_path / "from_tree", classes=EMBEDDED_CLASSES, workers=1, progress=False)
    direct = build_embedded_cache(SMOKE, tmp_path / "direct", progress=False)
    for split in ("train", "test"):
        a, b = open_split(from_tree, split), open_split(direct, split)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.names == b.names and a.classes == b.classes == list(EMBEDDED_CLASSES)
    with pytest.raises(FileExistsError, match="tree"):
        write_png_tree(root, SMOKE, progress=False)


def test_cache_reused_when_current_rebuilt_when_settings_change(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = []
    render = embedded.render_dataset

    def counting(cfg, *args, **kwargs):
        calls.append(cfg.embedded_seed)
        return render(cfg, *args, **kwargs)

    monkeypatch.setattr(embedded, "render_dataset", counting)
    small = DataConfig.smoke(embedded_per_class=3, embedded_test_per_class=2, cache_workers=1)
    assert build_embedded_cache(small, cache, progress=False) == cache
    manifest = read_manifest(cache)
    assert manifest["source"] == {"kind": "embedded", "seed": 0, "per_class": 3, "test_per_class": 2,
                                  "image_size": 32, "version": embedded.GENERATOR_VERSION}
    assert manifest["classes"] == list(EMBEDDED_CLASSES) and manifest["counts"] == {"train": 18, "test": 12}
    first = open_split(cache, "train").images.copy()
    build_embedded_cache(small, cache, progress=False)
    assert calls == [0]  # reused
    build_embedded_cache(small, cache, force=True, progress=False)
    assert calls == [0, 0]
    reseeded = DataConfig.smoke(embedded_per_class=3, embedded_test_per_class=2, cache_workers=1, embedded_seed=5)
    build_embedded_cache(reseeded, cache, progress=False)
    assert calls == [0, 0, 5] and read_manifest(cache)["source"]["seed"] == 5
    assert not np.array_equal(open_split(cache, "train").images, first)
    build_embedded_cache(DataConfig.smoke(embedded_per_class=4, embedded_test_per_class=2, cache_workers=1,
                                          embedded_seed=5), cache, progress=False)
    assert calls == [0, 0, 5, 5] and open_split(cache, "train").images.shape[0] == 24
    # Another generator version makes the cache stale.
    monkeypatch.setattr(embedded, "GENERATOR_VERSION", embedded.GENERATOR_VERSION + 1)
    build_embedded_cache(DataConfig.smoke(embedded_per_class=4, embedded_test_per_class=2, cache_workers=1,
                                          embedded_seed=5), cache, progress=False)
    assert len(calls) == 5
    assert json.loads((cache / "manifest.json").read_text())["source"]["version"] == embedded.GENERATOR_VERSION


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="label=6 must be in 0..5"):
        sample_object(len(EMBEDDED_CLASSES), np.random.default_rng(0))
    with pytest.raises(ValueError, match="at most 9999 objects per class"):
        render_dataset(DataConfig.smoke(embedded_per_class=9000, embedded_test_per_class=1000), progress=False)
    with pytest.raises(ValueError, match="role='side' is unknown"):
        sample_object(0, np.random.default_rng(0)).without("side")
    with pytest.raises(ValueError, match="kind='cone' is unknown; allowed: box, sphere, cylinder"):
        Part("cone", (0.0, 0.0, 0.0), (0.2,))
    with pytest.raises(ValueError, match="no parts"):
        render_views(EmbeddedObject(0, ()), 32)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "note.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_png_tree(tmp_path / "full", SMOKE, progress=False)
    assert (tmp_path / "full" / "note.txt").read_text() == "mine"
