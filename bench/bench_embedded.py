"""Benchmark of the embedded data set (the SPEC Sec. 1 stand-in): seconds to render and cache `DataConfig.quick()`
(6 classes x 160 objects x 12 views at 64 px, all CPU cores), median of 3 forced builds, into bench/results.json
as `data.embedded_build_s`. Run as `python bench/bench_embedded.py`.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import update_results  # noqa: E402
from greedymm.config import DataConfig  # noqa: E402
from greedymm.data.embedded import build_embedded_cache  # noqa: E402


def main() -> None:
    cfg = DataConfig.quick()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):
            t0 = time.perf_counter()
            build_embedded_cache(cfg, Path(tmp) / "cache", force=True, progress=False)
            times.append(time.perf_counter() - t0)
    figures = {"data.embedded_build_s": round(statistics.median(times), 2)}
    update_results(figures, show=True)


if __name__ == "__main__":
    main()
