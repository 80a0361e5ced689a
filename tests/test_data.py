"""Tests of the two-view loader and the validation split (greedymm/data: batches.py, loader.py)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import greedymm.data.loader as data
from greedymm.data.batches import TwoViewLoader, finish_batch
from greedymm.data.cache import START_METHOD, open_split, split_indices, write_cache
from greedymm.config import DataConfig
from greedymm.data.loader import build_loaders, cache_dir_for

H, W = 4, 6
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SPEC Sec. 1


def coded_images(n: int, channels: int = 1) -> np.ndarray:
    """(n, 12, C, H, W): row 0 holds 16 * view + column (shows the view and any flip), rows 1.. hold n % 200."""
    images = np.empty((n, 12, channels, H, W), np.uint8)
    images[:, :, :, 0, :] = (16 * np.arange(12)[:, None, None] + np.arange(W))[None]
    images[:, :, :, 1:, :] = (np.arange(n) % 200)[:, None, None, None, None]
    return images


def decode(x: torch.Tensor) -> tuple:
    """From a uint8 batch (B, C, H, W): view per sample, flipped per sample, object id per sample."""
    row = x[:, 0, 0].long()  # (B, W)
    flipped = row[:, 0] > row[:, -1]
    view = torch.where(flipped, row[:, -1], row[:, 0]) // 16
    return view, flipped, x[:, 0, 1, 0].long()


def all_batches(loader) -> list:
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_float_and_uint8_shapes_and_exact_normalisation():
    images, labels = coded_images(10), np.arange(10) % 3
    b = next(iter(TwoViewLoader(images, labels, batch_size=4)))
    x0, x1, y = b
    assert x0.shape == x1.shape == (4, 3, H, W) and x0.dtype == torch.float32 and x0.is_contiguous()
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 0]
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    for x, view in ((x0, 0), (x1, 6)):
        hand = (images[:4, view].astype(np.float64) / 255.0 - mean) / std  # (4, 3, H, W) by broadcasting
        np.testing.assert_allclose(x.numpy(), hand, atol=1e-6)
    assert abs(x1[0, 2, 0, 5].item() - ((16 * 6 + 5) / 255 - 0.406) / 0.225) < 1e-6
    u0, u1, uy = next(iter(TwoViewLoader(images, labels, batch_size=4, output="uint8")))
    assert u0.shape == (4, 1, H, W) and u0.dtype == torch.uint8 and torch.equal(uy, y)
    np.testing.assert_array_equal(u0.numpy(), images[:4, 0])
    np.testing.assert_array_equal(u1.numpy(), images[:4, 6])


def test_rgb_cache_keeps_its_channels():
    images = coded_images(3, channels=3)
    images[:, :, 1] //= 2
    x0, _, _ = next(iter(TwoViewLoader(images, np.zeros(3), batch_size=3)))
    hand = (images[:, 0].astype(np.float64) / 255.0 - np.array(IMAGENET_MEAN)[:, None, None]) \
        / np.array(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(x0.numpy(), hand, atol=1e-6)


def test_only_the_chosen_views_of_the_chosen_objects():
    images, labels = coded_images(20), np.arange(20) % 4
    indices = np.array([17, 3, 5, 11, 8])
    loader = TwoViewLoader(images, labels, indices, views=(2, 9), batch_size=2, output="uint8")
    assert len(loader) == 3
    seen = []
    for x0, x1, y in loader:
        v0, f0, obj = decode(x0)
        v1, f1, obj1 = decode(x1)
        assert (v0 == 2).all() and (v1 == 9).all() and not f0.any() and not f1.any()
        assert torch.equal(obj, obj1) and torch.equal(y, torch.from_numpy(labels[obj.numpy()]))
        seen += obj.tolist()
    assert seen == indices.tolist()  # no shuffle: the given order, unsorted batches restored


def test_flips_are_independent_per_view_at_half_rate():
    n = 600
    images = coded_images(n)
    loader = TwoViewLoader(images, np.zeros(n), views=(0, 6), batch_size=16, shuffle=True, augment=True,
                           seed=3, output="uint8")
    f0s, f1s, objs = [], [], []
    for _ in range(2):
        for x0, x1, _ in loader:
            v0, f0, obj = decode(x0)
            v1, f1, _ = decode(x1)
            assert (v0 == 0).all() and (v1 == 6).all()
            f0s.append(f0), f1s.append(f1), objs.append(obj)
    f0, f1 = torch.cat(f0s).double(), torch.cat(f1s).double()
    assert sorted(torch.cat(objs[:len(loader)]).tolist()) == sorted(i % 200 for i in range(n))  # each object once
    assert abs(f0.mean().item() - 0.5) < 0.04 and abs(f1.mean().item() - 0.5) < 0.04  # 1200 draws: std 0.014
    assert abs((f0 != f1).double().mean().item() - 0.5) < 0.05  # independent views disagree half the time
    x0, _, _ = next(iter(TwoViewLoader(images, np.zeros(n), batch_size=64, augment=True, output="uint8")))
    flipped = decode(x0)[1]
    assert flipped.any()
    np.testing.assert_array_equal(x0[flipped].numpy(), images[:64][flipped.numpy(), 0][..., ::-1])  # a mirror
    float0, _, _ = next(iter(TwoViewLoader(images, np.zeros(n), batch_size=64, augment=True)))
    ref0, _, _ = next(iter(TwoViewLoader(images, np.zeros(n), batch_size=64)))
    assert torch.equal(float0[flipped], ref0[flipped].flip(-1)) and torch.equal(float0[~flipped], ref0[~flipped])
    # the device path (torch.where on the uint8 batch, used on CUDA) flips exactly as the CPU path does
    raw = torch.from_numpy(np.ascontiguousarray(images[:64][:, [0, 6]].swapaxes(0, 1)))  # (2, 64, 1, H, W)
    dev0, _ = finish_batch(raw, torch.stack([flipped, torch.zeros_like(flipped)]), "float")
    assert torch.equal(dev0, float0)


def test_split_indices():
    train, val = split_indices(100, 0.2, seed=0)
    assert len(val) == 20 and len(train) == 80 and train.dtype == val.dtype == np.int64
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).tolist() == list(range(100))
    again = split_indices(100, 0.2, seed=0)
    assert np.array_equal(again[1], val) and not np.array_equal(split_indices(100, 0.2, seed=1)[1], val)
    assert len(split_indices(9843, 0.2, 0)[1]) == 1969
    with pytest.raises(ValueError, match="at least 2"):
        split_indices(1, 0.2, 0)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_indices(10, 1.0, 0)


def test_determinism_epochs_and_resume():
    images, labels = coded_images(50), np.arange(50) % 5
    kw = dict(batch_size=8, shuffle=True, augment=True, seed=7)
    a, b = TwoViewLoader(images, labels, **kw), TwoViewLoader(images, labels, **kw)
    first = all_batches(a)
    assert len(first) == len(a) == 7 and first[-1][0].shape[0] == 2
    assert all(all(torch.equal(s, t) for s, t in zip(p, q)) for p, q in zip(first, all_batches(b)))
    assert a.epoch == 1
    second = all_batches(a)  # the next iteration is epoch 1: another order
    assert not torch.equal(torch.cat([y for _, _, y in first]), torch.cat([y for _, _, y in second]))
    b.set_epoch(1)
    assert all(torch.equal(p[2], q[2]) and torch.equal(p[0], q[0]) for p, q in zip(second, all_batches(b)))
    b.set_epoch(0, start_batch=3)
    resumed = all_batches(b)
    assert len(resumed) == 4
    assert all(all(torch.equal(s, t) for s, t in zip(p, q)) for p, q in zip(first[3:], resumed))
    for seed in (8, -1):
        other = all_batches(TwoViewLoader(images, labels, **{**kw, "seed": seed}))
        assert not torch.equal(torch.cat([y for _, _, y in first]), torch.cat([y for _, _, y in other]))
    assert len(TwoViewLoader(images, labels, batch_size=8, drop_last=True)) == 6


def test_memmap_source_pickles_by_file_name(tmp_path):
    images, labels = coded_images(30), np.arange(30) % 2
    cache = write_cache(tmp_path / "c", {"train": (images, labels, [str(i) for i in range(30)]),
                                         "test": (images[:4], labels[:4], list("abcd"))}, ["cup", "vase"], {})
    split = open_split(cache, "train")
    loader = TwoViewLoader(split.images, split.labels, np.arange(5, 30), batch_size=4, shuffle=True, augment=True)
    source = pickle.loads(pickle.dumps(loader._source))
    assert len(pickle.dumps(loader._source)) < 10_000  # the file name travels, not the pixels
    np.testing.assert_array_equal(source.images, images)
    expected = all_batches(loader)
    assert all(all(torch.equal(s, t) for s, t in zip(p, q)) for p, q in zip(expected, [source[0, b] for b in range(7)]))


def test_bad_arguments_raise_clear_errors():
    images, labels = coded_images(10), np.zeros(10)
    with pytest.raises(ValueError, match=r"views=\(0, 12\) must be two view indices in 0..11"):
        TwoViewLoader(images, labels, views=(0, 12))
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        TwoViewLoader(images, labels, batch_size=0)
    with pytest.raises(ValueError, match="output='half' is unknown; allowed: float, uint8"):
        TwoViewLoader(images, labels, output="half")
    with pytest.raises(ValueError, match=r"indices must be in 0..9; got values from 0 to 10"):
        TwoViewLoader(images, labels, indices=[0, 10])
    with pytest.raises(ValueError, match="non-empty"):
        TwoViewLoader(images, labels, indices=[])
    with pytest.raises(ValueError, match=r"labels has shape \(9,\)"):
        TwoViewLoader(images, labels[:9])
    with pytest.raises(ValueError, match="uint8"):
        TwoViewLoader(images.astype(np.float32), labels)
    loader = TwoViewLoader(images, labels, batch_size=4)
    with pytest.raises(ValueError, match=r"start_batch=4 must be in 0..3"):
        loader.set_epoch(0, 4)


def test_build_loaders(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (n, 12, 1, 8, 8), dtype=np.uint8), np.arange(n) % 3,
                  [f"{s}_{i}" for i in range(n)]) for s, n in (("train", 25), ("test", 7))}
    cache = write_cache(tmp_path / "c", splits, ["bed", "cup", "sofa"], {"kind": "test"})
    cfg = DataConfig.smoke(data_dir=str(tmp_path), batch_size=4, eval_batch_size=6)
    assert cache_dir_for(cfg) == tmp_path / "embedded_npy_32px"
    assert cache_dir_for(DataConfig(data_dir="d", image_size=64)).as_posix() == "d/npy_64px"
    monkeypatch.setattr(data, "prepare_data", lambda cfg, progress=True: cache)
    loaders = build_loaders(cfg, "cpu", seed=1)
    assert loaders.sizes == {"train": 20, "val": 5, "test": 7} and loaders.classes == ["bed", "cup", "sofa"]
    assert loaders.train.augment and loaders.train.shuffle and loaders.train.batch_size == 4
    for name in ("train_eval", "val", "test"):
        loader = getattr(loaders, name)
        assert not loader.augment and not loader.shuffle and loader.batch_size == 6
    train_idx, val_idx = split_indices(25, cfg.val_fraction, cfg.split_seed)
    assert np.array_equal(loaders.train_eval.indices, train_idx) and np.array_equal(loaders.val.indices, val_idx)
    assert sorted(torch.cat([y for _, _, y in loaders.train]).tolist()) == sorted((train_idx % 3).tolist())
    x0, x1, y = next(iter(loaders.test))
    assert x0.shape == (6, 3, 8, 8) and y.tolist() == [0, 1, 2, 0, 1, 2]


def test_identical_views_share_the_image_and_the_flip():
    images, labels = coded_images(200), np.zeros(200)
    loader = TwoViewLoader(images, labels, views=(6, 6), batch_size=16, shuffle=True, augment=True, seed=4,
                           output="uint8")
    flips = []
    for x0, x1, _ in loader:
        assert torch.equal(x0, x1)
        view, flipped, _ = decode(x0)
        assert (view == 6).all()
        flips.append(flipped)
    assert 0.4 < torch.cat(flips).double().mean().item() < 0.6  # flipped, both views alike
    float0, float1, _ = next(iter(TwoViewLoader(images, labels, views=(6, 6), batch_size=16, augment=True)))
    assert torch.equal(float0, float1)
    # The device path (CUDA) gets the flips from the source: the same row twice.
    source = TwoViewLoader(images, labels, views=(6, 6), batch_size=64, augment=True)._source
    source.finish = False
    _, device_flips, _ = source[0, 0]
    assert torch.equal(device_flips[0], device_flips[1]) and device_flips[0].any() and not device_flips[0].all()
    distinct = TwoViewLoader(images, labels, views=(0, 6), batch_size=64, augment=True)._source
    distinct.finish = False
    assert not torch.equal(distinct[0, 0][1][0], distinct[0, 0][1][1])


def test_channels_and_normalisation_per_view():
    images = coded_images(6, channels=3)
    images[:, 1, 1:] = images[:, 1, :1]  # view 1 gray: three equal channels (as the digit caches store it)
    images[:, 0, 1] //= 2
    labels = np.zeros(6)
    x0, x1, _ = next(iter(TwoViewLoader(images, labels, views=(0, 1), batch_size=6, channels=(3, 1),
                                        mean=(0.5,), std=(0.25,))))
    assert x0.shape == (6, 3, H, W) and x1.shape == (6, 1, H, W) and x0.is_contiguous() and x1.is_contiguous()
    assert x0[2, 1, 0, 3].item() == pytest.approx(((16 * 0 + 3) // 2 / 255 - 0.5) / 0.25, abs=1e-6)
    assert x1[2, 0, 0, 3].item() == pytest.approx(((16 * 1 + 3) / 255 - 0.5) / 0.25, abs=1e-6)
    assert x1[4, 0, 1, 0].item() == pytest.approx((4 / 255 - 0.5) / 0.25, abs=1e-6)  # object id 4 in rows 1..
    u0, u1, _ = next(iter(TwoViewLoader(images, labels, views=(0, 1), batch_size=6, channels=(3, 1),
                                        mean=(0.5,), std=(0.25,), output="uint8")))
    assert u0.shape == (6, 3, H, W) and u1.shape == (6, 1, H, W)
    np.testing.assert_array_equal(u1.numpy(), images[:, 1, :1])
    g0, g1, _ = next(iter(TwoViewLoader(coded_images(6), labels, views=(0, 1), batch_size=6, channels=(1, 3),
                                        mean=(0.0,), std=(1.0,))))
    assert g0.shape == (6, 1, H, W) and g1.shape == (6, 3, H, W)
    assert torch.equal(g1[:, 0], g1[:, 2]) and g1[0, 1, 0, 5].item() == pytest.approx((16 + 5) / 255, abs=1e-6)
    with pytest.raises(ValueError, match=r"channels=\(3, 2\) must give 1 or 3"):
        TwoViewLoader(images, labels, channels=(3, 2))
    with pytest.raises(ValueError, match="3-channel views only"):
        TwoViewLoader(images, labels, views=(0, 1), channels=(3, 1))  # ImageNet's 3 means on a 1-channel view


def test_build_loaders_uses_a_stored_validation_split(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 256, (n, 2, 3, 8, 8), dtype=np.uint8), np.arange(n) % 2,
                  [f"{s}_{i}" for i in range(n)]) for s, n in (("train", 20), ("val", 6), ("test", 4))}
    cache = write_cache(tmp_path / "c", splits, ["a", "b"], {"kind": "test"})
    monkeypatch.setattr(data, "prepare_data", lambda cfg, progress=True: cache)
    cfg = DataConfig.smoke_digits(data_dir=str(tmp_path), batch_size=4, eval_batch_size=6)
    loaders = build_loaders(cfg, "cpu", seed=0)
    assert loaders.sizes == {"train": 20, "val": 6, "test": 4} and loaders.channels == (3, 1)
    assert np.array_equal(loaders.train_eval.indices, np.arange(20))  # the whole train split is D_train
    assert not loaders.train.augment  # digits are never flipped
    x0, x1, y = next(iter(loaders.val))
    hand = (splits["val"][0][:, 1, :1].astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(x1.numpy(), hand, atol=1e-5)  # the stored val split, not a part of train
    assert x0.shape == (6, 3, 8, 8) and y.tolist() == [0, 1, 0, 1, 0, 1]


def test_persistent_workers_across_epochs_and_resume(tmp_path):
    images, labels = coded_images(40), np.arange(40) % 3
    cache = write_cache(tmp_path / "c", {"train": (images, labels, [str(i) for i in range(40)]),
                                         "test": (images[:2], labels[:2], ["a", "b"])}, ["x", "y", "z"], {})
    split = open_split(cache, "train")
    kw = dict(batch_size=6, shuffle=True, augment=True, seed=5)
    serial = TwoViewLoader(split.images, split.labels, **kw)
    expected = [all_batches(serial) for _ in range(2)]
    workers = TwoViewLoader(split.images, split.labels, num_workers=2, **kw)  # batches come back in order
    assert workers.start_method == START_METHOD != "fork"
    got = [all_batches(workers)]
    pids = [w.pid for w in workers._workers._iterator._workers]
    assert len(pids) == 2
    got.append(all_batches(workers))  # epoch 1: other order and flips, the same worker process
    assert [w.pid for w in workers._workers._iterator._workers] == pids
    for e in range(2):
        assert all(all(torch.equal(s, t) for s, t in zip(p, q)) for p, q in zip(expected[e], got[e]))
    assert not torch.equal(got[0][0][2], got[1][0][2])
    workers.set_epoch(1, start_batch=4)
    resumed = all_batches(workers)
    assert len(resumed) == 3 and all(torch.equal(p[0], q[0]) for p, q in zip(expected[1][4:], resumed))
    assert pickle.loads(pickle.dumps(workers))._workers is None  # a loader travels without its processes
