"""Benchmark of the data pipeline (SPEC Sec. 1): building the .npy cache from 224 px PNG renders (workers started by
forkserver, the default, next to fork), the two-view loader's throughput (float and uint8 output), and what loader
worker processes cost: the first batch of a fresh loader with 2 workers (fork, as before, paid every epoch; forkserver,
paid once since the workers persist) and a later epoch. Run as `python bench/bench_data.py`.

Worker processes started by forkserver or spawn re-run the main script's top level (Python's rule), so this script
imports torch (through the loader) only inside the functions that need it: the cache workers stay light, as they
are in a notebook, whose main module is the kernel's launcher.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import samples_per_s, update_results  # noqa: E402
import greedymm.data.cache as cache_module  # noqa: E402
from greedymm.data.cache import open_split  # noqa: E402
from greedymm.data.png_tree import build_cache  # noqa: E402
from greedymm.data.modelnet import MODELNET40_CLASSES  # noqa: E402

SIZE = 224
CLASSES = MODELNET40_CLASSES[:10]
PER_CLASS = {"train": 20, "test": 4}  # 10 classes x 24 = 240 objects
BUILDS, PASSES = 3, 15


def render(rng: np.random.Generator, n_views: int = 12) -> np.ndarray:
    """(12, SIZE, SIZE) uint8 gray renders of a shaded, striped ellipsoid on black, turning 30 deg per view."""
    yy, xx = (np.mgrid[:SIZE, :SIZE] - SIZE / 2) / (SIZE / 2)  # [-1, 1)
    a, b, c = rng.uniform(0.3, 0.8, 3)
    freq, phase = rng.uniform(4, 12), rng.uniform(0, np.pi)
    out = np.zeros((n_views, SIZE, SIZE), np.uint8)
    for v in range(n_views):
        angle = np.pi / 6 * v
        half_width = np.hypot(a * np.cos(angle), c * np.sin(angle))  # silhouette of the turning ellipsoid
        r2 = (xx / half_width) ** 2 + (yy / b) ** 2
        depth = np.sqrt(np.clip(1 - r2, 0, None))
        shade = 0.25 + 0.6 * depth + 0.15 * np.sin(freq * yy + phase + angle)
        out[v] = np.where(r2 < 1, np.clip(255 * shade, 0, 255), 0).astype(np.uint8)
    return out


def make_png_tree(root: Path) -> int:
    """Write the PNG tree in the ModelNet layout; returns the number of objects."""
    rng, n = np.random.default_rng(0), 0
    for cls in CLASSES:
        for split, count in PER_CLASS.items():
            folder = root / cls / split
            folder.mkdir(parents=True)
            for k in range(count):
                for v, view in enumerate(render(rng)):
                    Image.fromarray(view).save(folder / f"{cls}_{n + 1:04d}.obj.shaded_v{v + 1:03d}.png")
                n += 1
    return n


def loader_rate(images: np.ndarray, labels: np.ndarray, output: str) -> float:
    """Median samples/s over full passes of the training loader (two views, batch 8, shuffled, flipped, CPU)."""
    from greedymm.data.batches import TwoViewLoader

    loader = TwoViewLoader(images, labels, views=(0, 6), batch_size=8, shuffle=True, augment=True, seed=0,
                           device="cpu", output=output, num_workers=0)
    return samples_per_s(loader, len(images), PASSES)


def worker_costs(images: np.ndarray, labels: np.ndarray, method: str) -> tuple:
    """(seconds to the first batch of a fresh loader with 2 workers, median seconds of a later epoch)."""
    from greedymm.data.batches import TwoViewLoader

    loader = TwoViewLoader(images, labels, views=(0, 6), batch_size=8, shuffle=True, augment=True, seed=0,
                           device="cpu", output="uint8", num_workers=2, start_method=method)
    t0 = time.perf_counter()
    for _ in loader:
        first = time.perf_counter() - t0
        break
    epochs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in loader:
            pass
        epochs.append(time.perf_counter() - t0)
    return first, statistics.median(epochs)


def build_rate(root: Path, cache: Path, n_objects: int, method: str) -> float:
    """Median objects/s of forced cache builds with 2 workers started by `method`."""
    cache_module.START_METHOD = method
    rates = []
    for _ in range(BUILDS):
        t0 = time.perf_counter()
        build_cache(root, cache, CLASSES, image_size=SIZE, force=True, workers=2, progress=False)
        rates.append(n_objects / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp) / "renders"
        n_objects = make_png_tree(root)
        cache = Path(tmp) / "cache"
        default = cache_module.START_METHOD
        fork_rate = build_rate(root, cache, n_objects, "fork")
        rate = build_rate(root, cache, n_objects, default)
        train = open_split(cache, "train")
        figures = {
            "data.cache_build_objects_per_s": round(rate, 1),
            "data.cache_build_objects_per_s_fork": round(fork_rate, 1),
            "data.loader_samples_per_s_224": round(loader_rate(train.images, train.labels, "float"), 1),
            "data.loader_uint8_samples_per_s_224": round(loader_rate(train.images, train.labels, "uint8"), 1),
        }
        for method in ("fork", default):
            first, epoch = worker_costs(train.images, train.labels, method)
            figures[f"data.workers2_first_batch_s_{method}"] = round(first, 3)
            figures[f"data.workers2_epoch_s_{method}"] = round(epoch, 3)
        del train
    update_results(figures, show=True)


if __name__ == "__main__":
    main()
