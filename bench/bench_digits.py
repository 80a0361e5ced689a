"""Benchmark of the digit datasets (SPEC Sec. 10): seconds to build the colored_digits cache from scratch (the
scikit-learn digits at 28 px, painted, written; median of 3 forced builds, and the first one, which also imports
scikit-learn), and the digit training loader's
throughput at batch 128 (float x0 (B, 3, 28, 28) and x1 (B, 1, 28, 28), next to the raw uint8 that the CUDA path
ships). Run as `python bench/bench_digits.py`.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import samples_per_s, update_results  # noqa: E402
from greedymm.config import DataConfig  # noqa: E402
from greedymm.data.batches import TwoViewLoader  # noqa: E402
from greedymm.data.digits import DIGITS, build_digits_cache  # noqa: E402
from greedymm.data.loader import cache_dir_for, dataset_splits  # noqa: E402

BUILDS, PASSES = 3, 10


def loader_rate(split, indices, output: str) -> float:
    """Median samples/s over full passes of the digit training loader (batch 128, shuffled, CPU)."""
    loader = TwoViewLoader(split.images, split.labels, indices, views=(0, 1), batch_size=128, shuffle=True,
                           channels=DIGITS.channels((0, 1)), mean=DIGITS.mean, std=DIGITS.std, output=output)
    return samples_per_s(loader, len(indices), PASSES)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench_digits_") as tmp:
        cfg = DataConfig.for_dataset("colored_digits", data_dir=tmp)
        times = []
        for _ in range(BUILDS):
            t0 = time.perf_counter()
            build_digits_cache(cfg, cache_dir_for(cfg), force=True, progress=False)
            times.append(time.perf_counter() - t0)
        train, indices = dataset_splits(cache_dir_for(cfg), cfg.val_fraction, cfg.split_seed)["train"]
        figures = {
            "data.colored_digits_build_s": round(statistics.median(times), 3),
            "data.colored_digits_first_build_s": round(times[0], 3),
            "data.colored_loader_samples_per_s": round(loader_rate(train, indices, "float"), 1),
            "data.colored_loader_uint8_samples_per_s": round(loader_rate(train, indices, "uint8"), 1),
        }
        del train
    update_results(figures, show=True)


if __name__ == "__main__":
    main()
