"""Tests of Colored-and-gray MNIST and the scikit-learn digits (greedymm/data/digits.py, SPEC Sec. 10): the painting,
the splits, the cache, MNIST's IDX files (placed by hand, downloaded from a 127.0.0.1 server, corrupt), the loader's
channels and normalisation, the prepare lock, and the pairs figure.
"""
from __future__ import annotations

import gzip
import hashlib
import multiprocessing
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import greedymm.data.digits as digits
import greedymm.data.loader as loader_module
from greedymm.config import DataConfig
from greedymm.data.cache import open_split, read_manifest, split_indices
from greedymm.data.digits import CLASS_COLORS, DIGIT_CLASSES, DigitsError, paint
from greedymm.data.download import DownloadError
from greedymm.data.loader import LOCK_NAME, build_loaders, cache_dir_for, prepare_data

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the digits' normalisation, on every channel


def nearest_color(color: np.ndarray) -> np.ndarray:
    """(N, 3) colors -> (N,) index of the nearest class color."""
    return ((color[:, None] - CLASS_COLORS[None]) ** 2).sum(-1).argmin(1)


# ---------------------------------------------------------------------------------------------------------------
# Painting


def test_colors_are_bright_and_well_separated():
    assert CLASS_COLORS.shape == (10, 3) and CLASS_COLORS.min() >= 0 and CLASS_COLORS.max() <= 1
    assert CLASS_COLORS.max(axis=1).min() == 1.0  # no dark color: the painted digit stays visible
    dist = np.sqrt(((CLASS_COLORS[:, None] - CLASS_COLORS[None]) ** 2).sum(-1))
    assert dist[~np.eye(10, dtype=bool)].min() > 0.7


def test_paint_is_gray_times_color_and_draws_at_the_set_rate():
    rng = np.random.default_rng(0)
    n = 20000
    gray = rng.integers(0, 256, (n, 3, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    colored, color, color_class = paint(gray, labels, np.random.default_rng(1), match=0.7, noise_var=0.03)
    assert colored.shape == (n, 3, 3, 3) and colored.dtype == np.uint8
    assert color.shape == (n, 3) and color.dtype == np.float32 and color_class.dtype == np.int64
    # By hand for one pixel: gray 200 painted (0.25, 0.5, 1.0) is (50, 100, 200).
    one, c1, _ = paint(np.full((1, 1, 1), 200, np.uint8), np.array([0]), np.random.default_rng(0), 1.0, 0.0)
    assert c1.tolist() == [[1.0, 0.0, 0.0]] and one[0, :, 0, 0].tolist() == [200, 0, 0]
    # Colored = gray x color, up to rounding, for every digit and channel.
    assert np.abs(colored - gray[:, None].astype(np.float64) * color[:, :, None, None]).max() <= 0.5 + 1e-4
    # 70% take their class color, the other 30% a uniformly random class's (their own one time in ten).
    assert abs((color_class == labels).mean() - (0.7 + 0.3 / 10)) < 0.015  # std 0.003
    # Noise: variance 0.03 per channel around the class color, clipped to [0, 1].
    assert color.min() >= 0 and color.max() <= 1
    pastel = np.isin(color_class, [7, 8, 9])  # their 0.5 channels are never clipped at 3 std
    deviation = color[pastel] - CLASS_COLORS[color_class[pastel]]
    half = CLASS_COLORS[color_class[pastel]] == 0.5
    assert abs(deviation[half].var() - 0.03) < 0.003 and abs(deviation[half].mean()) < 0.01
    assert np.isclose(np.mean(deviation[CLASS_COLORS[color_class[pastel]] == 1.0] == 0), 0.5, atol=0.03)  # clipped
    # Seeded: the same generator state gives the same colors.
    again = paint(gray, labels, np.random.default_rng(1), match=0.7, noise_var=0.03)
    assert np.array_equal(again[0], colored) and np.array_equal(again[2], color_class)


def test_match_one_predicts_the_label_match_zero_does_not():
    n = 20000
    labels = np.arange(n) % 10
    gray = np.full((n, 1, 1), 255, np.uint8)
    _, color, color_class = paint(gray, labels, np.random.default_rng(2), match=1.0, noise_var=0.03)
    assert np.array_equal(color_class, labels)
    assert (nearest_color(color) == labels).mean() > 0.9  # color predicts the label almost perfectly
    _, color, color_class = paint(gray, labels, np.random.default_rng(3), match=0.0, noise_var=0.03)
    # Independent of the label: every label's histogram of color classes is flat (2000 draws per label).
    hist = np.stack([np.bincount(color_class[labels == k], minlength=10) for k in range(10)]) / (n / 10)
    assert np.abs(hist - 0.1).max() < 0.025  # std of one cell 0.0067
    assert abs((nearest_color(color) == labels).mean() - 0.1) < 0.02


def test_paint_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        paint(np.zeros((2, 4, 4), np.float32), np.zeros(2), np.random.default_rng(0), 1.0, 0.03)
    with pytest.raises(ValueError, match=r"match=1.5 must be in \[0, 1\]"):
        paint(np.zeros((2, 4, 4), np.uint8), np.zeros(2), np.random.default_rng(0), 1.5, 0.03)


# ---------------------------------------------------------------------------------------------------------------
# colored_digits: the scikit-learn digits


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    cfg = DataConfig.smoke_digits(data_dir=str(tmp_path_factory.mktemp("digits")))
    return cfg, prepare_data(cfg, progress=False)


def test_colored_digits_splits_shapes_and_pixels(digits_cache):
    from sklearn.datasets import load_digits

    cfg, cache = digits_cache
    assert cache == Path(cfg.data_dir) / "colored_digits_npy_16px"
    m = read_manifest(cache)
    assert m["splits"] == ["train", "val", "test"] and m["views"] == 2 and m["channels"] == 3
    assert m["classes"] == list(DIGIT_CLASSES) and m["extras"] == ["color", "color_class"]
    assert m["counts"] == {"train": 1078, "val": 360, "test": 359}  # 60/20/20 of 1,797
    reference = load_digits()
    seen = []
    for split in ("train", "val", "test"):
        s = open_split(cache, split)
        assert s.images.shape == (m["counts"][split], 2, 3, 16, 16) and s.images.dtype == np.uint8
        ids = np.array([int(name.split("_")[1]) for name in s.names])
        seen.append(ids)
        np.testing.assert_array_equal(s.labels, reference.target[ids])
        gray = s.images[:, 1]
        assert (gray == gray[:, :1]).all()  # the gray view: 3 equal channels
        # Colored = gray x the stored color, up to rounding (m0 has m1's intensity pattern).
        assert np.abs(s.images[:, 0] - gray[:, :1] * s.extras["color"][:, :, None, None]).max() <= 0.5 + 1e-4
        # Upsampled like MNIST: the 8x8 digit (16 levels) scaled to 0..255 and resized into a centred 11x11 box
        # (20/28 of 16 px); two black rows above, three below.
        eight = np.rint(reference.images[ids[0]] * 255 / 16).astype(np.uint8)
        box = np.asarray(Image.fromarray(eight).resize((11, 11), Image.BILINEAR))
        np.testing.assert_array_equal(gray[0, 0, 2:13, 2:13], box)
        assert gray[:, :, :2].max() == 0 and gray[:, :, 13:].max() == 0
    ids = np.concatenate(seen)
    assert sorted(ids.tolist()) == list(range(1797))  # disjoint, and together every digit
    rest, test = split_indices(1797, 0.2, cfg.split_seed)
    np.testing.assert_array_equal(np.sort(seen[2]), test)


def test_training_colors_give_the_label_validation_and_test_colors_do_not(digits_cache):
    _, cache = digits_cache
    rates = {}
    for split in ("train", "val", "test"):
        s = open_split(cache, split)
        rates[split] = (s.extras["color_class"] == s.labels).mean(), (nearest_color(s.extras["color"]) == s.labels)
    assert rates["train"][0] == 1.0 and rates["train"][1].mean() > 0.88
    for split in ("val", "test"):  # 360 digits: std of the rate 0.016
        assert abs(rates[split][0] - 0.1) < 0.06 and rates[split][1].mean() < 0.18
    val, test = open_split(cache, "val"), open_split(cache, "test")
    assert not np.array_equal(val.extras["color_class"][:50], test.extras["color_class"][:50])  # own streams


def test_color_settings_rebuild_the_cache(tmp_path, monkeypatch):
    builds = []
    make = digits.make_digit_splits
    monkeypatch.setattr(digits, "make_digit_splits", lambda cfg, files: builds.append(cfg) or make(cfg, files))
    cfg = DataConfig.smoke_digits(data_dir=str(tmp_path))
    cache = prepare_data(cfg, progress=False)
    assert prepare_data(cfg, progress=False) == cache and len(builds) == 1  # reused
    half = DataConfig.smoke_digits(data_dir=str(tmp_path), color_match=0.5)
    prepare_data(half, progress=False)
    s = open_split(cache, "train")
    assert read_manifest(cache)["source"]["color_match"] == 0.5
    assert 0.45 + 0.05 - 0.06 < (s.extras["color_class"] == s.labels).mean() < 0.55 + 0.06  # 0.5 + 0.5 / 10
    noisy = DataConfig.smoke_digits(data_dir=str(tmp_path), color_match=0.5, color_noise_var=0.0)
    prepare_data(noisy, progress=False)
    s = open_split(cache, "train")
    np.testing.assert_array_equal(s.extras["color"], CLASS_COLORS[s.extras["color_class"]])  # no noise
    assert len(builds) == 3
    prepare_data(DataConfig.smoke_digits(data_dir=str(tmp_path), color_match=0.5, color_noise_var=0.0,
                                         make_npy_files=True), progress=False)
    assert len(builds) == 4  # forced
    before = open_split(cache, "val").extras["color"].copy()
    prepare_data(DataConfig.smoke_digits(data_dir=str(tmp_path), color_match=0.5, color_noise_var=0.0,
                                         color_seed=1), progress=False)
    assert not np.array_equal(open_split(cache, "val").extras["color"], before)


def test_generator_version_makes_the_cache_stale(tmp_path, monkeypatch):
    cfg = DataConfig.smoke_digits(data_dir=str(tmp_path))
    cache = prepare_data(cfg, progress=False)
    (cache / "train_images.npy").unlink()  # a cache missing a file is not current
    prepare_data(cfg, progress=False)
    assert (cache / "train_images.npy").is_file()
    os.utime(cache / "manifest.json", ns=(0, 0))
    monkeypatch.setattr(digits, "DIGITS_VERSION", digits.DIGITS_VERSION + 1)
    prepare_data(cfg, progress=False)
    assert os.stat(cache / "manifest.json").st_mtime_ns > 0  # rewritten
    assert read_manifest(cache)["source"]["version"] == digits.DIGITS_VERSION


# ---------------------------------------------------------------------------------------------------------------
# The loader on digits


def test_loader_delivers_three_and_one_channels_normalised_unflipped(digits_cache):
    cfg, cache = digits_cache
    loaders = build_loaders(cfg, "cpu", seed=0, progress=False)
    assert loaders.channels == (3, 1) and loaders.sizes == {"train": 1078, "val": 360, "test": 359}
    assert not loaders.train.augment and loaders.train.shuffle and loaders.train.batch_size == 32
    train, val = open_split(cache, "train"), open_split(cache, "val")
    x0, x1, y = next(iter(loaders.train_eval))  # fixed order: the first 128 training digits
    assert x0.shape == (128, 3, 16, 16) and x1.shape == (128, 1, 16, 16) and x0.dtype == x1.dtype == torch.float32
    n, c, h, w = 3, 1, 7, 8
    raw0, raw1 = int(train.images[n, 0, c, h, w]), int(train.images[n, 1, 0, h, w])
    assert raw1 > 0
    assert x0[n, c, h, w].item() == pytest.approx((raw0 / 255 - MNIST_MEAN) / MNIST_STD, abs=1e-6)
    assert x1[n, 0, h, w].item() == pytest.approx((raw1 / 255 - MNIST_MEAN) / MNIST_STD, abs=1e-6)
    assert x1[n, 0, 0, 0].item() == pytest.approx(-0.1307 / 0.3081, abs=1e-6)  # black background: -0.4242
    assert y.tolist() == train.labels[:128].tolist()
    # The training batches are the stored images, never flipped; the stored val split is the validation set.
    order = loaders.train.order(0)
    x0, x1, y = next(iter(loaders.train))
    hand = (train.images[order[:32], 0].astype(np.float64) / 255 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(x0.numpy(), hand, atol=1e-5)
    assert sorted(order.tolist()) == list(range(1078))
    vy = torch.cat([b[2] for b in loaders.val])
    assert vy.tolist() == val.labels.tolist()


@pytest.mark.parametrize("views, channels", [((1, 1), (1, 1)), ((0, 0), (3, 3)), ((1, 0), (1, 3))])
def test_digit_view_choices(digits_cache, views, channels):
    cfg, cache = digits_cache
    cfg = DataConfig.smoke_digits(data_dir=cfg.data_dir, views=views)
    loaders = build_loaders(cfg, "cpu", seed=0, progress=False)
    assert loaders.channels == channels
    x0, x1, _ = next(iter(loaders.train))
    assert x0.shape[1] == channels[0] and x1.shape[1] == channels[1]
    if views[0] == views[1]:
        assert torch.equal(x0, x1)  # identical modalities
    else:
        train = open_split(cache, "train")
        idx = loaders.train.order(0)[:32]
        hand = (train.images[idx, 1, :1].astype(np.float64) / 255 - MNIST_MEAN) / MNIST_STD
        np.testing.assert_allclose(x0.numpy(), hand, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# colored_mnist: MNIST's IDX files

N_TRAIN, N_TEST = 60, 20


def fake_mnist(seed: int = 0) -> dict:
    """{file name: (array, kind)}: small MNIST-shaped digits (a bright square per sample) and labels."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        images = np.zeros((n, 28, 28), np.uint8)
        for i in range(n):
            r, c = rng.integers(4, 18, 2)
            images[i, r:r + 6, c:c + 6] = rng.integers(60, 256)
        out[f"{split}-images-idx3-ubyte"] = images
        out[f"{split}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    return out


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding: magic 0x0000 08 ndim, the dimensions as big-endian uint32, the bytes."""
    head = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def place(folder: Path, files: dict, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in files.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def check_mnist_cache(cache: Path, files: dict) -> None:
    """The cache holds the fake digits: D_train and validation from the training file, test from t10k."""
    train_idx, val_idx = split_indices(N_TRAIN, 1 / 6, 0)
    assert len(val_idx) == 10
    for split, source, idx in (("train", "train", train_idx), ("val", "train", val_idx),
                               ("test", "t10k", np.arange(N_TEST))):
        s = open_split(cache, split)
        assert s.images.shape == (len(idx), 2, 3, 28, 28)
        np.testing.assert_array_equal(s.images[:, 1, 0], files[f"{source}-images-idx3-ubyte"][idx])
        np.testing.assert_array_equal(s.labels, files[f"{source}-labels-idx1-ubyte"][idx])
        assert s.names[0] == f"mnist_{'test' if source == 't10k' else 'train'}_{idx[0]:05d}"
    assert (open_split(cache, "train").extras["color_class"] == open_split(cache, "train").labels).all()


@pytest.fixture
def no_mirrors(monkeypatch):
    """torchvision's mirrors replaced by a port nothing listens on: no real host is contacted."""
    dead = f"http://127.0.0.1:{unused_port()}/mnist/"
    monkeypatch.setattr(digits, "mnist_resources", lambda: ([dead], {}))
    real = digits.download
    monkeypatch.setattr(digits, "download", lambda *a, **kw: real(*a, **{**kw, "retries": 1, "backoff": 0.01,
                                                                         "timeout": 2}))
    return dead


@pytest.mark.parametrize("where, gz", [("", False), ("MNIST/raw", True), ("", True)])
def test_mnist_files_placed_by_hand(tmp_path, no_mirrors, where, gz):
    files = fake_mnist()
    place(tmp_path / where, files, gz)
    cfg = DataConfig.for_dataset("colored_mnist", data_dir=str(tmp_path))
    assert cfg.views == (0, 1) and cfg.image_size == 28 and cfg.batch_size == 128
    cache = prepare_data(cfg, progress=False)
    assert cache == tmp_path / "colored_mnist_npy_28px"
    check_mnist_cache(cache, files)
    sizes = read_manifest(cache)["source"]["files"]
    placed = tmp_path / where / ("t10k-labels-idx1-ubyte" + ".gz" * gz)
    assert sizes["t10k-labels-idx1-ubyte"] == placed.stat().st_size
    # The files deleted, the cache is used as it is; a changed file makes it stale.
    for p in (tmp_path / where).iterdir():
        if "ubyte" in p.name:
            p.unlink()
    stamp = os.stat(cache / "manifest.json").st_ino
    assert prepare_data(cfg, progress=False) == cache and os.stat(cache / "manifest.json").st_ino == stamp
    other = fake_mnist(seed=1)
    other["train-images-idx3-ubyte"] = other["train-images-idx3-ubyte"][:50]
    other["train-labels-idx1-ubyte"] = other["train-labels-idx1-ubyte"][:50]
    place(tmp_path / where, other, gz)
    prepare_data(cfg, progress=False)
    assert open_split(cache, "train").images.shape[0] + open_split(cache, "val").images.shape[0] == 50


class Mirror:
    """A 127.0.0.1 HTTP server of {path: bytes}; records the paths asked for."""

    def __init__(self, files: dict) -> None:
        self.files, self.requests = files, []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                mirror.requests.append(self.path)
                body = mirror.files.get(self.path)
                if body is None:
                    return self.send_error(404)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/mnist/"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mirror():
    files = fake_mnist()
    served = {f"/mnist/{name}.gz": gzip.compress(idx_bytes(a)) for name, a in files.items()}
    m = Mirror(served)
    m.fake, m.md5 = files, {p.rsplit("/", 1)[1]: hashlib.md5(b).hexdigest() for p, b in served.items()}
    yield m
    m.close()


def test_mnist_download_from_torchvision_mirrors(tmp_path, mirror, no_mirrors, monkeypatch):
    monkeypatch.setattr(digits, "mnist_resources", lambda: ([no_mirrors, mirror.base.rstrip("/")], mirror.md5))
    cfg = DataConfig.for_dataset("colored_mnist", data_dir=str(tmp_path))
    assert cfg.url == ""
    check_mnist_cache(prepare_data(cfg, progress=False), mirror.fake)
    raw = tmp_path / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{n}.gz" for n in mirror.fake)  # no .part left
    assert sorted(mirror.requests) == sorted(f"/mnist/{n}.gz" for n in mirror.fake)


def test_mnist_url_replaces_the_mirrors_and_md5_is_checked(tmp_path, mirror, no_mirrors, monkeypatch):
    monkeypatch.setattr(digits, "mnist_resources", lambda: ([no_mirrors], mirror.md5))
    cfg = DataConfig.for_dataset("colored_mnist", data_dir=str(tmp_path), url=mirror.base)
    check_mnist_cache(prepare_data(cfg, progress=False), mirror.fake)
    # A file whose md5 differs from torchvision's is refused and deleted; no cache is written.
    bad = {**mirror.md5, "t10k-images-idx3-ubyte.gz": "0" * 32}
    monkeypatch.setattr(digits, "mnist_resources", lambda: ([no_mirrors], bad))
    other = tmp_path / "other"
    with pytest.raises(DownloadError, match="md5 of the download is"):
        prepare_data(DataConfig.for_dataset("colored_mnist", data_dir=str(other), url=mirror.base), progress=False)
    assert not (other / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").exists()
    assert not (other / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz.part").exists()
    assert read_manifest(other / "colored_mnist_npy_28px") is None


def test_failed_download_says_what_to_do(tmp_path, no_mirrors):
    cfg = DataConfig.for_dataset("colored_mnist", data_dir=str(tmp_path))
    with pytest.raises(DownloadError, match=r"(?s)could not download train-images-idx3-ubyte.gz.*"
                                            r"place them in .*MNIST/raw.*colored_digits"):
        prepare_data(cfg, progress=False)
    assert read_manifest(tmp_path / "colored_mnist_npy_28px") is None


@pytest.mark.parametrize("damage, message", [
    ("magic", r"train-labels-idx1-ubyte is not an IDX file of MNIST labels: magic number 00000803"),
    ("truncated", r"t10k-images-idx3-ubyte holds 15696 bytes but its header announces \(30, 28, 28\)"),
    ("gzip", r"train-images-idx3-ubyte.gz cannot be read"),
    ("size", r"t10k-images-idx3-ubyte.gz holds 32x32 images; MNIST's are 28x28"),
    ("count", r"holds 20 images but .*t10k-labels-idx1-ubyte.gz 19 labels"),
])
def test_corrupt_mnist_files_give_a_clear_error(tmp_path, no_mirrors, damage, message):
    files = fake_mnist()
    place(tmp_path, files, gz=True)
    if damage == "magic":  # an images file where the labels should be
        (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(files["train-images-idx3-ubyte"]))
    elif damage == "truncated":  # announces 30 images, holds 20 x 28 x 28 + 16 bytes
        data = bytearray(idx_bytes(files["t10k-images-idx3-ubyte"]))
        data[4:8] = (30).to_bytes(4, "big")
        (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes(data))
    elif damage == "gzip":
        path = tmp_path / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "size":
        place(tmp_path, {"t10k-images-idx3-ubyte": np.zeros((N_TEST, 32, 32), np.uint8)}, gz=True)
    else:
        place(tmp_path, {"t10k-labels-idx1-ubyte": files["t10k-labels-idx1-ubyte"][:19]}, gz=True)
    with pytest.raises(DigitsError, match=r"(?s)" + message + r".*(delete|same number)"):
        prepare_data(DataConfig.for_dataset("colored_mnist", data_dir=str(tmp_path)), progress=False)
    assert not (tmp_path / "colored_mnist_npy_28px").exists() or \
        sorted(p.name for p in (tmp_path / "colored_mnist_npy_28px").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Several processes preparing at once


def _prepare_in_child(cfg: DataConfig, ready: Path, out: "multiprocessing.Queue", builds: Path) -> None:
    """A child process (spawned: no fork from a process whose torch runs threads) that counts its builds."""
    make = digits.make_digit_splits

    def counting(*args, **kwargs):
        with open(builds, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # a slow build: the other process must wait for it, not start its own
        return make(*args, **kwargs)

    digits.make_digit_splits = counting
    ready.touch()
    cache = prepare_data(cfg, progress=False)
    out.put(os.stat(cache / "manifest.json").st_ino)


def test_two_processes_build_the_cache_once(tmp_path):
    from filelock import FileLock

    builds = tmp_path / "builds.txt"
    ctx = multiprocessing.get_context("spawn")
    for force, expected_builds in ((False, 1), (True, 2)):
        cfg = DataConfig.smoke_digits(data_dir=str(tmp_path), make_npy_files=force)
        out = ctx.Queue()
        lock = FileLock(str(tmp_path / LOCK_NAME))
        lock.acquire()  # both children block on it, having looked at the cache
        ready = [tmp_path / f"ready{i}" for i in range(2)]
        children = [ctx.Process(target=_prepare_in_child, args=(cfg, r, out, builds)) for r in ready]
        for child in children:
            child.start()
        deadline = time.time() + 20
        while not all(r.exists() for r in ready) and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        lock.release()
        stamps = [out.get(timeout=60) for _ in children]
        for child in children:
            child.join(timeout=60)
            assert child.exitcode == 0
        for r in ready:
            r.unlink()
        # Built once (first round); with make_npy_files, rebuilt once more, not twice: the second child sees the
        # cache that the first built while it waited.
        assert len(builds.read_text().split()) == expected_builds
        assert stamps[0] == stamps[1] == os.stat(cache_dir_for(cfg) / "manifest.json").st_ino


# ---------------------------------------------------------------------------------------------------------------
# Settings and the figure


def test_per_dataset_defaults_and_identity():
    for name, views, size, data_dir in (("modelnet40", (0, 6), 224, "ModelNet"),
                                        ("embedded", (0, 6), 224, "ModelNet"),
                                        ("colored_mnist", (0, 1), 28, "data"),
                                        ("colored_digits", (0, 1), 28, "data")):
        cfg = DataConfig(dataset=name)
        assert (cfg.views, cfg.image_size, cfg.data_dir) == (views, size, data_dir)
    assert DataConfig(dataset="colored_mnist").val_fraction * 60000 == pytest.approx(10000)
    assert DataConfig().url.startswith("http://supermoe") and DataConfig(dataset="colored_mnist").url == ""
    assert DataConfig.for_dataset("colored_digits").batch_size == 128
    assert DataConfig.for_dataset("modelnet40").batch_size == 8
    assert DataConfig.for_dataset("colored_mnist", batch_size=64, views=(1, 1)).views == (1, 1)
    assert DataConfig(views=(3, 3)).views == (3, 3)  # identical modalities are allowed
    with pytest.raises(ValueError, match=r"views=\(0, 6\): each view index must be in 0..1 for dataset='colored_mnist"):
        DataConfig(dataset="colored_mnist", views=(0, 6))
    with pytest.raises(ValueError, match="color_match=1.2 must be in"):
        DataConfig.smoke_digits(color_match=1.2)
    with pytest.raises(ValueError, match="color_noise_var=-0.1"):
        DataConfig.smoke_digits(color_noise_var=-0.1)
    with pytest.raises(ValueError, match="dataset='mnist' is unknown"):
        DataConfig.for_dataset("mnist")
    identity = DataConfig.smoke_digits().identity()
    for key in ("color_match", "color_noise_var", "color_seed", "views", "image_size", "val_fraction", "split_seed"):
        assert key in identity
    for key in ("data_dir", "url", "mirrors", "num_workers", "make_npy_files"):
        assert key not in identity
    assert DataConfig.smoke_digits(color_seed=1).identity() != identity
    assert DataConfig.smoke_digits(data_dir="elsewhere").identity() == identity
    assert DataConfig.smoke_digits(views=None).identity() == DataConfig.smoke_digits(views=(0, 1)).identity()


def test_plot_pairs_draws_colored_over_gray(digits_cache):
    from greedymm.plots import plot_pairs

    _, cache = digits_cache
    s = open_split(cache, "train")
    fig = plot_pairs(s.images[:12, 0], s.images[:12, 1], s.labels[:12], s.classes, "training pairs", columns=5)
    axes = np.array(fig.axes).reshape(6, 5)  # 3 rows of 5 pairs, each a colored and a gray row
    np.testing.assert_allclose(axes[0, 1].images[0].get_array(), s.images[1, 0].transpose(1, 2, 0) / 255)
    np.testing.assert_array_equal(axes[3, 2].images[0].get_array(), s.images[7, 1, 0])
    assert axes[2, 1].get_title() == s.classes[s.labels[6]] and fig.get_suptitle() == "training pairs"
    assert not axes[4, 2].images and not axes[5, 4].images  # 12 pairs: the last 3 slots stay empty
    with pytest.raises(ValueError, match=r"x_colored must be \(N, 3, H, W\)"):
        plot_pairs(s.images[:4, 1, :1], s.images[:4, 1], s.labels[:4], s.classes, "")
