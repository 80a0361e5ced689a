"""Tests of the .npy cache (greedymm/cache.py): pixels, labels, manifest, errors, staleness, atomicity."""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import greedymm.data.cache as cache_module
import greedymm.data.png_tree as png_tree
from greedymm.data.cache import FORMAT_VERSION, CacheError, cache_is_current, open_split, read_manifest, write_cache
from greedymm.data.png_tree import build_cache

CLASSES = ("airplane", "bed", "chair")
COUNTS = {"train": (3, 2, 2), "test": (1, 2, 1)}  # objects per class
SIZE = 8


def view_pixels(obj_id: int, view: int, size: int = SIZE) -> np.ndarray:
    """(size, size) uint8 render with values distinct per object, view and pixel."""
    r, c = np.mgrid[:size, :size]
    return ((obj_id * 37 + view * 13 + r * size + c) % 256).astype(np.uint8)


def make_tree(root: Path, rgb_gray: str = "bed_0002", rgb_colour: str = "") -> dict:
    """Write a PNG tree in the ModelNet layout; returns {split: [(name, label, (12, H, W) pixels)]}.

    Object `rgb_gray` is stored as RGB with equal channels, `rgb_colour` as RGB with a colour tint.
    """
    truth, obj_id = {}, 0
    for split in ("train", "test"):
        truth[split] = []
        for label, cls in enumerate(CLASSES):
            folder = root / cls / split
            folder.mkdir(parents=True)
            for k in range(COUNTS[split][label]):
                name = f"{cls}_{k + 1 + (100 if split == 'test' else 0):04d}"
                views = np.stack([view_pixels(obj_id, v) for v in range(12)])
                for v in range(12):
                    img = Image.fromarray(views[v])
                    if name == rgb_gray:
                        img = img.convert("RGB")
                    if name == rgb_colour:
                        arr = np.stack([views[v], views[v], 255 - views[v]], axis=-1)
                        img = Image.fromarray(arr)
                    img.save(folder / f"{name}.obj.shaded_v{v + 1:03d}.png")
                truth[split].append((name, label, views))
                obj_id += 1
    return truth


def png(root: Path, name: str, view: int) -> Path:
    cls = name.rsplit("_", 1)[0]
    split = "test" if int(name.rsplit("_", 1)[1]) > 100 else "train"
    return root / cls / split / f"{name}.obj.shaded_v{view:03d}.png"


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "renders"
    return root, make_tree(root)


def test_cache_equals_source_pixels(tree, tmp_path):
    root, truth = tree
    cache = build_cache(root, tmp_path / "cache", CLASSES, workers=1, progress=False)
    for split in ("train", "test"):
        s = open_split(cache, split)
        assert isinstance(s.images, np.memmap) and s.images.dtype == np.uint8
        assert s.images.shape == (len(truth[split]), 12, 1, SIZE, SIZE)
        assert s.names == [name for name, _, _ in truth[split]]
        assert s.labels.dtype == np.int64 and s.labels.tolist() == [label for _, label, _ in truth[split]]
        for i, (_, _, views) in enumerate(truth[split]):
            np.testing.assert_array_equal(s.images[i, :, 0], views)  # v001..v012 -> 0..11, RGB-gray included
        assert s.classes == list(CLASSES)
    m = read_manifest(cache)
    assert m["format_version"] == FORMAT_VERSION and m["classes"] == list(CLASSES)
    assert m["counts"] == {"train": 7, "test": 4} and m["channels"] == 1 and m["image_size"] == SIZE
    assert m["shape"] == {"train": [7, 12, 1, SIZE, SIZE], "test": [4, 12, 1, SIZE, SIZE]}
    src = m["source"]
    assert src["kind"] == "png_tree" and src["root"] == str(root.resolve())
    assert src["objects"] == {"train": 7, "test": 4} and len(src["fingerprint"]) == 64
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_two_workers_give_the_same_cache(tree, tmp_path, monkeypatch, start_method):
    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {start_method} on this platform")
    monkeypatch.setattr(cache_module, "START_METHOD", start_method)
    root, _ = tree
    one = build_cache(root, tmp_path / "one", CLASSES, workers=1, progress=False)
    two = build_cache(root, tmp_path / "two", CLASSES, workers=2, progress=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(open_split(one, split).images, open_split(two, split).images)
    assert read_manifest(one)["source"]["fingerprint"] == read_manifest(two)["source"]["fingerprint"]


def test_workers_never_fork_and_never_import_torch(tree, tmp_path):
    assert cache_module.START_METHOD == ("forkserver" if sys.platform.startswith("linux") else "spawn")
    root, _ = tree
    context = multiprocessing.get_context(cache_module.START_METHOD)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        files = [sorted(str(p) for p in (root / "bed" / "train").glob("bed_0001.*"))]
        path = tmp_path / "one.npy"
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(1, 12, 1, SIZE, SIZE))
        ref = (files[0][0], (SIZE, SIZE))
        assert pool.submit(png_tree._fill_chunk, str(path), 0, files, 1, (SIZE, SIZE), ref).result()
        loaded = pool.submit(eval, "sorted(m for m in __import__('sys').modules if m.split('.')[0] == 'torch' "
                                   "or m.startswith('greedymm'))").result()
    assert {"greedymm.data.png_tree", "greedymm.data.cache"} <= set(loaded) and not [m for m in loaded
                                                                                     if m.startswith("torch")]
    np.testing.assert_array_equal(np.load(path)[0, :, 0], np.stack([view_pixels(3, v) for v in range(12)]))


def test_colour_renders_give_three_channels(tmp_path):
    root = tmp_path / "renders"
    truth = make_tree(root, rgb_gray="", rgb_colour="chair_0002")
    cache = build_cache(root, tmp_path / "cache", CLASSES, workers=1, progress=False)
    s = open_split(cache, "train")
    assert read_manifest(cache)["channels"] == 3 and s.images.shape[2] == 3
    i = s.names.index("chair_0002")
    views = truth["train"][i][2]
    np.testing.assert_array_equal(s.images[i, :, 2], 255 - views)
    np.testing.assert_array_equal(s.images[0], np.repeat(truth["train"][0][2][:, None], 3, axis=1))


def test_resize_matches_pil_bilinear(tree, tmp_path):
    root, truth = tree
    cache = build_cache(root, tmp_path / "cache", CLASSES, image_size=4, workers=1, progress=False)
    s = open_split(cache, "test")
    assert s.images.shape == (4, 12, 1, 4, 4) and read_manifest(cache)["image_size"] == 4
    expected = np.asarray(Image.fromarray(truth["test"][1][2][5]).resize((4, 4), Image.BILINEAR))
    np.testing.assert_array_equal(s.images[1, 5, 0], expected)


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_png_names_the_file_and_leaves_no_cache(tree, tmp_path, workers):
    root, _ = tree
    bad = png(root, "chair_0002", 7)
    bad.write_bytes(bad.read_bytes()[:40])  # truncated: the header survives, the data does not
    with pytest.raises(CacheError, match="chair_0002.obj.shaded_v007.png"):
        build_cache(root, tmp_path / "cache", CLASSES, workers=workers, progress=False)
    assert read_manifest(tmp_path / "cache") is None
    assert list((tmp_path / "cache").iterdir()) == []  # temporary files removed too


def test_object_with_eleven_views(tree, tmp_path):
    root, _ = tree
    png(root, "bed_0001", 12).unlink()
    with pytest.raises(CacheError, match=r"object bed_0001 .* has 11 views; expected 12"):
        build_cache(root, tmp_path / "cache", CLASSES, workers=1, progress=False)
    assert read_manifest(tmp_path / "cache") is None


def test_unknown_class_folder(tree, tmp_path):
    root, _ = tree
    (root / "spaceship" / "train").mkdir(parents=True)
    with pytest.raises(CacheError, match=r"spaceship is not one of the 3 allowed classes \(airplane, bed, chair\)"):
        build_cache(root, tmp_path / "cache", CLASSES, workers=1, progress=False)


def test_unequal_sizes_name_the_file_and_both_sizes(tree, tmp_path):
    root, _ = tree
    odd = png(root, "chair_0101", 3)
    Image.fromarray(np.zeros((SIZE, SIZE + 2), np.uint8)).save(odd)
    message = rf"{odd.name} is {SIZE + 2}x{SIZE} pixels but .*airplane_0001.obj.shaded_v001.png is {SIZE}x{SIZE}"
    with pytest.raises(CacheError, match=message):
        build_cache(root, tmp_path / "cache", CLASSES, workers=2, progress=False)
    assert read_manifest(tmp_path / "cache") is None


def test_missing_split_folder(tree, tmp_path):
    root, _ = tree
    for f in (root / "bed" / "test").iterdir():
        f.unlink()
    (root / "bed" / "test").rmdir()
    with pytest.raises(FileNotFoundError, match=r"bed/test is missing"):
        build_cache(root, tmp_path / "cache", CLASSES, workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_cache(tmp_path / "nowhere", tmp_path / "cache", CLASSES, workers=1, progress=False)


def _stamp(cache: Path) -> tuple:
    """Identity of the manifest and images files: a rebuild replaces them (new inodes)."""
    return tuple(os.stat(cache / f).st_ino for f in ("manifest.json", "train_images.npy"))


def test_reuse_force_and_stale_manifest(tree, tmp_path):
    root, _ = tree
    cache = build_cache(root, tmp_path / "cache", CLASSES, image_size=SIZE, workers=1, progress=False)
    first = _stamp(cache)
    build_cache(root, cache, CLASSES, image_size=SIZE, workers=1, progress=False)
    assert _stamp(cache) == first  # current: reused
    build_cache(root, cache, CLASSES, image_size=SIZE, force=True, workers=1, progress=False)
    second = _stamp(cache)
    assert second[0] != first[0] and second[1] != first[1]
    for field, value in (("format_version", FORMAT_VERSION + 1), ("image_size", 16)):
        m = read_manifest(cache)
        m[field] = value
        (cache / "manifest.json").write_text(json.dumps(m))
        stale = _stamp(cache)
        build_cache(root, cache, CLASSES, image_size=SIZE, workers=1, progress=False)
        assert _stamp(cache)[1] != stale[1] and read_manifest(cache)[field] != value  # rebuilt


def test_changed_tree_makes_the_cache_stale(tree, tmp_path):
    root, _ = tree
    cache = build_cache(root, tmp_path / "cache", CLASSES, workers=1, progress=False)
    expected = {"source": read_manifest(cache)["source"]}
    assert cache_is_current(cache, expected)
    for v in range(12):
        Image.fromarray(view_pixels(99, v)).save(root / "bed" / "train" / f"bed_0009.obj.shaded_v{v + 1:03d}.png")
    build_cache(root, cache, CLASSES, workers=1, progress=False)
    assert not cache_is_current(cache, expected)
    s = open_split(cache, "train")
    assert len(s.names) == 8 and "bed_0009" in s.names
    np.testing.assert_array_equal(s.images[s.names.index("bed_0009"), 4, 0], view_pixels(99, 4))


def test_cache_is_current_checks_files(tree, tmp_path):
    root, _ = tree
    cache = build_cache(root, tmp_path / "cache", CLASSES, workers=1, progress=False)
    assert cache_is_current(cache, {"classes": list(CLASSES), "source": {"kind": "png_tree"}})
    assert not cache_is_current(cache, {"classes": ["airplane"]})
    (cache / "test_labels.npy").unlink()
    assert not cache_is_current(cache, {})
    assert not cache_is_current(tmp_path / "empty", {})


def test_write_cache_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (n, 12, 3, 5, 5), dtype=np.uint8), rng.integers(0, 2, n),
                  [f"{s}_{i}" for i in range(n)]) for s, n in (("train", 6), ("test", 3))}
    cache = write_cache(tmp_path / "c", splits, ["cup", "vase"], {"kind": "embedded", "seed": 3})
    m = read_manifest(cache)
    assert m["channels"] == 3 and m["image_size"] == 5 and m["counts"] == {"train": 6, "test": 3}
    assert cache_is_current(cache, {"classes": ["cup", "vase"], "source": {"kind": "embedded", "seed": 3}})
    assert not cache_is_current(cache, {"source": {"kind": "embedded", "seed": 4}})
    for split, (images, labels, names) in splits.items():
        s = open_split(cache, split)
        np.testing.assert_array_equal(s.images, images)
        assert s.labels.tolist() == labels.tolist() and s.names == names and s.classes == ["cup", "vase"]
    files = [f"{s}_{k}" for s in ("train", "test") for k in ("images.npy", "labels.npy", "names.json")]
    assert sorted(p.name for p in cache.iterdir()) == sorted(["manifest.json"] + files)


def test_write_cache_rejects_bad_input(tmp_path):
    images = np.zeros((2, 12, 1, 4, 4), np.uint8)
    good = (images, np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="train and test are required, val is optional"):
        write_cache(tmp_path, {"train": good}, ["x", "y"], {})
    with pytest.raises(ValueError, match="train and test are required, val is optional"):
        write_cache(tmp_path, {"train": good, "test": good, "valid": good}, ["x", "y"], {})
    with pytest.raises(ValueError, match="uint8"):
        write_cache(tmp_path, {"train": good, "test": (images.astype(np.float32),) + good[1:]}, ["x", "y"], {})
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        write_cache(tmp_path, {"train": good, "test": (images, np.array([0, 2]), ["a", "b"])}, ["x", "y"], {})
    with pytest.raises(ValueError, match="names"):
        write_cache(tmp_path, {"train": good, "test": (images, np.array([0, 1]), ["a"])}, ["x", "y"], {})
    assert read_manifest(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete cache"):
        open_split(tmp_path, "train")
    with pytest.raises(ValueError, match="allowed: train, val, test"):
        open_split(tmp_path, "valid")
    with pytest.raises(ValueError, match=r"train images \(2, 12, 1, 4, 4\) and test images \(2, 2, 1, 4, 4\) differ"):
        write_cache(tmp_path, {"train": good, "test": (images[:, :2],) + good[1:]}, ["x", "y"], {})
    with pytest.raises(ValueError, match="extras must give the same lower-case keys"):
        write_cache(tmp_path, {"train": good, "test": good}, ["x", "y"], {}, extras={"train": {"c": np.zeros(2)}})
    with pytest.raises(ValueError, match="test extra 'c' has 1 rows; expected 2"):
        write_cache(tmp_path, {"train": good, "test": good}, ["x", "y"], {},
                    extras={"train": {"c": np.zeros(2)}, "test": {"c": np.zeros(1)}})
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_two_views_a_stored_val_split_and_extras(tmp_path, tree):
    rng = np.random.default_rng(1)
    splits = {s: (rng.integers(0, 256, (n, 2, 3, 5, 5), dtype=np.uint8), np.arange(n) % 2,
                  [f"{s}_{i}" for i in range(n)]) for s, n in (("train", 7), ("val", 3), ("test", 2))}
    extras = {s: {"color": rng.random((len(v[1]), 3)).astype(np.float32), "color_class": v[1][::-1].copy()}
              for s, v in splits.items()}
    cache = write_cache(tmp_path / "c", splits, ["a", "b"], {"kind": "digits"}, extras=extras)
    m = read_manifest(cache)
    assert m["splits"] == ["train", "val", "test"] and m["views"] == 2 and m["extras"] == ["color", "color_class"]
    assert m["counts"] == {"train": 7, "val": 3, "test": 2} and m["shape"]["val"] == [3, 2, 3, 5, 5]
    for split, (images, labels, names) in splits.items():
        s = open_split(cache, split)
        np.testing.assert_array_equal(s.images, images)
        assert s.names == names and s.labels.tolist() == labels.tolist()
        for key, value in extras[split].items():
            np.testing.assert_array_equal(s.extras[key], value)
    assert cache_is_current(cache, {"splits": ["train", "val", "test"]})
    (cache / "val_color.npy").unlink()
    assert not cache_is_current(cache, {})  # an extra is missing
    (cache / "val_images.npy").unlink()
    assert not cache_is_current(cache, {})
    # A render cache holds train and test only, 12 views, no extras.
    root, _ = tree
    renders = build_cache(root, tmp_path / "r", CLASSES, workers=1, progress=False)
    assert read_manifest(renders)["splits"] == ["train", "test"] and read_manifest(renders)["views"] == 12
    assert open_split(renders, "train").extras == {}
    with pytest.raises(ValueError, match=r"split='val' is not stored in the cache .*; it holds train, test"):
        open_split(renders, "val")
    # A cache written before "splits" and "views" were recorded is still current and readable.
    old = read_manifest(renders)
    for key in ("splits", "views", "extras"):
        del old[key]
    (renders / "manifest.json").write_text(json.dumps(old))
    assert cache_is_current(renders, {"classes": list(CLASSES)}) and len(open_split(renders, "test").names) == 4
