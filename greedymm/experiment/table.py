"""The paper's Table 1 (paper Sec. 6.4; SPEC Sec. 8-9): its numbers, the summary over seeds of our runs (mean and
standard deviation of the valid values), and the Markdown table beside the paper's column, rows in table order.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..data.registry import get_dataset
from ..methods.base import get_method, method_names, methods

# SPEC Sec. 8: the paper's test accuracy in %, mean +- std over 3 runs, and the approximate d_util, per dataset.
# "unimodal" is Table 1's "uni-modal (best)" row: the better of the m0 and m1 networks.
PAPER_TABLE1 = {
    "modelnet40": {
        "unimodal": {"acc": (89.34, 0.39)},
        "vanilla": {"acc": (90.09, 0.58), "d_util": -0.1},
        "rubi": {"acc": (90.45, 0.58)},
        "random": {"acc": (91.36, 0.10), "d_util": 0.0},
        "guided": {"acc": (91.37, 0.28), "d_util": 0.0},
    },
    "colored_mnist": {
        "unimodal": {"acc": (99.14, 0.11)},
        "vanilla": {"acc": (45.26, 0.46)},
        "rubi": {"acc": (44.79, 0.62)},
        "random": {"acc": (74.07, 2.75)},
        "guided": {"acc": (91.01, 1.20)},
    },
}
PAPER_MODELNET40 = PAPER_TABLE1["modelnet40"]
SUMMARY_KEYS = ("acc", "acc0", "acc1", "u_m1_m0", "u_m0_m1", "d_util", "d_speed")
# The modality measures (SPEC Sec. 13), summarised and shown when the runs have them.
MEASURE_KEYS = ("shapley0", "shapley1", "probe0", "probe1")


MEASURE_HEADS = {"shapley0": "φ0 %", "shapley1": "φ1 %", "probe0": "probe m0 %", "probe1": "probe m1 %"}


def paper_column(dataset: str) -> Optional[Dict[str, dict]]:
    """The paper's Table-1 column to show beside a dataset's results (its spec's `paper_column`), or None (e.g. the
    embedded dataset)."""
    key = get_dataset(dataset).paper_column
    return PAPER_TABLE1[key] if key else None


def unimodal_rows() -> List[str]:
    """The registered uni-modal methods (no CLS, no CUR), in table order."""
    return [name for name, method in methods().items() if not method.multimodal]


def is_paper_row(name: str) -> bool:
    """Whether a method is a row of the paper's Table 1 (an unregistered name is not)."""
    return name in method_names() and get_method(name).paper_row


def table_order(algorithms: Sequence[str]) -> List[str]:
    """Algorithms in table order (the registered methods': the paper's rows first), others after them in their given
    order."""
    registered = method_names()
    known = [a for a in registered if a in algorithms]
    return known + [a for a in dict.fromkeys(algorithms) if a not in registered]


def summarize(runs: Sequence[dict], keys: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """Mean and standard deviation over seeds, per algorithm, counting only valid values.

    Args:
        runs: outputs of `run_one` (failed runs included) or `utilization_of_run`.
        keys: the figures to aggregate; SUMMARY_KEYS, and MEASURE_KEYS when a run has them, if None.
    Returns:
        {algorithm: {"runs": n, "failed": [seeds], "undefined": runs whose d_util is undefined, key: (mean, std,
        n_valid)}} in Table-1 order; a figure that is
        NaN in a run (failed, or not applicable) is left out of that figure's mean and count; std is 0 for one
        value, and (nan, nan, 0) means no valid value.
    """
    if keys is None:
        keys = SUMMARY_KEYS + tuple(k for k in MEASURE_KEYS if any(k in r for r in runs))
    by_alg: Dict[str, List[dict]] = {}
    for r in runs:
        by_alg.setdefault(r["algorithm"], []).append(r)
    table: Dict[str, dict] = {}
    for alg in table_order(list(by_alg)):
        rs = by_alg[alg]
        ok = [r for r in rs if r.get("status", "ok") == "ok"]
        row: Dict[str, object] = {"runs": len(rs), "failed": [r["seed"] for r in rs if r not in ok],
                                  "undefined": sum(1 for r in ok if r.get("d_util_undefined"))}
        for k in keys:
            vals = np.array([r.get(k, math.nan) for r in ok], dtype=float)
            vals = vals[np.isfinite(vals)]
            if len(vals) == 0:
                row[k] = (math.nan, math.nan, 0)
            else:
                row[k] = (float(vals.mean()), float(vals.std()) if len(vals) > 1 else 0.0, int(len(vals)))
        table[alg] = row
    return table


def best_unimodal(table: Mapping[str, dict]) -> Optional[str]:
    """The uni-modal row with the higher mean test accuracy (Table 1's "uni-modal (best)"), or None."""
    rows = [(table[a]["acc"][0], a) for a in unimodal_rows() if a in table and table[a]["acc"][2] > 0]
    return max(rows)[1] if rows else None


def format_table(table: Mapping[str, dict], paper: Optional[Mapping[str, dict]] = None) -> str:
    """A Markdown table of `summarize`'s output (accuracies in %), rows in the paper's order, with the paper's column.

    Args:
        table: from `summarize`.
        paper: a column of PAPER_TABLE1 (e.g. `paper_column("modelnet40")`) to show beside ours.
    Returns:
        Markdown text: mean ± std over valid seeds (the mean alone for one seed). "seeds" counts the runs whose
        figures are averaged, and names failed seeds; the better uni-modal row is marked "(best)" and carries the
        paper's uni-modal (best) figure; runs whose d_util is undefined are counted beside it ("(1 undefined)").
    """
    def pm(cell: tuple, scale: float = 1.0, digits: int = 3) -> str:
        mean, std, n = cell
        if n < 2:  # one seed has no spread to report; "± 0.00" would read as seeds that agree
            return "n/a" if n == 0 else f"{mean * scale:.{digits}f}"
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"

    best, unimodal = best_unimodal(table), unimodal_rows()
    # the escaped bar keeps u(m1|m0) from splitting a Markdown table cell
    head = ["algorithm", "seeds", "acc %", "acc ŷ0 %", "acc ŷ1 %", "u(m1\\|m0)", "u(m0\\|m1)", "d_util", "d_speed"]
    # Shapley and probe columns only when some row has them (tables of earlier results files render as before).
    measures = [k for k in MEASURE_KEYS if any(k in row and row[k][2] > 0 for row in table.values())]
    head += [MEASURE_HEADS[k] for k in measures]
    if paper:
        head += ["paper acc %", "paper d_util"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for alg in table_order(list(table)):  # a results file's JSON may hold the rows in another (sorted) order
        row = table[alg]
        failed = row.get("failed", [])
        seeds = str(row["acc"][2]) if not failed else f"{row['acc'][2]} of {row['runs']} (failed: " \
            f"{', '.join(f's{s}' for s in failed)})"
        name = f"{alg} (best)" if alg == best else alg
        cells = [name, seeds] + [pm(row[k], scale=100, digits=2) for k in ("acc", "acc0", "acc1")]
        cells += [pm(row[k]) for k in ("u_m1_m0", "u_m0_m1", "d_util", "d_speed")]
        if row.get("undefined"):  # left out of the mean, never counted as 0 ("balanced")
            cells[-2] += f" ({row['undefined']} undefined)"
        cells += [pm(row[k], scale=100, digits=2) if k in row else "n/a" for k in measures]
        if paper:
            ref = paper.get("unimodal" if alg == best else alg, {}) if alg not in unimodal or alg == best else {}
            acc = f"{ref['acc'][0]:.2f} ± {ref['acc'][1]:.2f}" if "acc" in ref else ""
            if not is_paper_row(alg):
                acc = "(not in the paper)"
            cells += [acc, f"≈ {ref['d_util']:+.1f}" if "d_util" in ref else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
