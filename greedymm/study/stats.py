"""The studies' statistics (paper Sec. 6.2-6.3; SPEC Sec. 11): Spearman's rank correlation, mean and spread over
seeds, and the population on which "CLS predicts CUR" is tested: unregularized vanilla runs with a defined d_util.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .records import ok_records


def rank(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of the values, ties sharing their average rank."""
    a = np.asarray(values, dtype=float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    uniq, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    if (counts > 1).any():
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / counts)[inverse]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties averaged); NaN if undefined.

    Args:
        x, y: paired values (same length).
    Returns:
        The correlation in [-1, 1], or NaN with fewer than 2 pairs or a constant variable.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman: x has {len(x)} values and y {len(y)}; they must be paired")
    if len(x) < 2:
        return math.nan
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and standard deviation (over seeds; population std, 0 for one value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std())


def cls_cur_population(records: Sequence[dict]) -> List[dict]:
    """The runs on which the conditional learning speed is tested as a predictor of the conditional utilization rate
    (paper Sec. 6.2, Fig. 2): vanilla, unregularized (lambda = 0), finished, with a defined d_util and d_speed — across
    whatever seeds, learning rates, optimizers and view pairs the records hold. Regularized runs are left out (the
    penalty changes what the fusion can carry), and so are runs whose d_util is undefined (a head at chance, a
    collapsed fusion: `d_util_undefined`).

    Args:
        records: runs.jsonl records, of one or several studies.
    Returns:
        The records of the population.
    """
    return [r for r in ok_records(records, ("d_util", "d_speed"))
            if r.get("algorithm") == "vanilla" and not r.get("l1") and not r.get("d_util_undefined")]


def cls_cur_correlations(records: Sequence[dict]) -> Dict[str, Tuple[float, int]]:
    """Spearman's correlation between d_speed and d_util over the population (`cls_cur_population`) and within each
    pair kind.

    Args:
        records: runs.jsonl records.
    Returns:
        {"all": (rho, n), "<pair>": (rho, n), ...}; rho is NaN with fewer than two runs or a constant variable.
    """
    population = cls_cur_population(records)
    groups = {"all": population}
    for pair in sorted({r["pair"] for r in population}):
        groups[pair] = [r for r in population if r["pair"] == pair]
    return {k: (spearman([r["d_speed"] for r in rs], [r["d_util"] for r in rs]), len(rs)) for k, rs in groups.items()}


def undefined_count(records: Sequence[dict], key: str = "d_util") -> int:
    """How many finished runs have `key` marked undefined (its `<key>_undefined` reason is set)."""
    suffix = key[len("d_util"):] if key.startswith("d_util") else ""
    return sum(1 for r in records if r.get("status") == "ok" and r.get(f"d_util_undefined{suffix}"))
