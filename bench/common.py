"""Shared helpers of the benchmarks: medians and merging figures into bench/results.json."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

from greedymm.io import write_text

RESULTS = Path(__file__).with_name("results.json")


def median_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of `fn()` in milliseconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def samples_per_s(loader, samples: int, passes: int) -> float:
    """Median samples/s over `passes` full passes of `loader` (each `samples` long), after one untimed pass that maps
    the pages and primes the allocator."""
    for _ in loader:
        pass
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for _ in loader:
            pass
        rates.append(samples / (time.perf_counter() - t0))
    return statistics.median(rates)


def update_results(figures: Dict[str, float], show: bool = False) -> None:
    """Merge `figures` into bench/results.json (atomic write), keeping other scripts' keys; `show` also prints them,
    one "key: value" line each."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.update(figures)
    write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", RESULTS)
    if show:
        for key, value in figures.items():
            print(f"{key}: {value}")
