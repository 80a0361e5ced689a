"""The studies' figures from runs.jsonl records (paper Figs. 2, 4, 8, 9; SPEC Sec. 11): d_util and d_speed for
identical versus distinct pairs, d_speed against d_util over a stated population, rho and d_util (best and last
checkpoint, undefined runs marked) against lambda, and the sensitivity sweeps. Figures are built without pyplot.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure

from ..methods.base import Sweep, get_method, methods
from .records import ok_records
from .stats import cls_cur_correlations, cls_cur_population, mean_std, rank, spearman, undefined_count

__all__ = ["plot_cls_cur", "plot_pair_kinds", "plot_regularization", "plot_sensitivity", "rank", "spearman",
           "study_figures", "summary_table"]

PAIR_COLORS = {"distinct": "tab:red", "identical": "tab:blue"}
MARKERS = ("o", "s", "^", "D", "v", "P")
# Axis labels of the records' figures; the methods' swept settings add theirs (`labels`).
LABELS = {"d_util": "$d_\\mathrm{util}$", "d_speed": "$d_\\mathrm{speed}$", "rho": "$\\rho$",
          "acc": "test accuracy", "l1": "$\\lambda$"}


def pair_order(labels: Sequence[str]) -> List[str]:
    """Pair labels: distinct, identical, then explicit views in text order."""
    labels = set(labels)
    return [p for p in ("distinct", "identical") if p in labels] + sorted(labels - {"distinct", "identical"})


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no finished run with {what}", ha="center", va="center", transform=ax.transAxes,
            color="gray")


def _log_x(ax, xs: Sequence[float]) -> None:
    """Log x axis for positive values; symlog when 0 is among them (e.g. lambda = 0, no regularization)."""
    xs = [x for x in xs if math.isfinite(x)]
    positive = [x for x in xs if x > 0]
    if not positive:
        return
    if len(positive) == len(xs):
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=min(positive))


def plot_pair_kinds(records: Sequence[dict], keys: Sequence[str] = ("d_util", "d_speed")) -> Figure:
    """Fig. 2: the distributions of d_util and d_speed for identical versus distinct pairs, per dataset, with means.

    Each run is a point (jittered sideways), each pair kind's mean a black bar labelled with its value.

    Args:
        records: runs.jsonl records (failed runs and NaN values are left out).
        keys: the figures to show, one column each.
    Returns:
        The figure: one row per dataset. Points carry gid "points:<pair>", mean bars "mean:<pair>".
    """
    ok = [r for r in records if r.get("status") == "ok"]
    datasets = sorted({r["dataset"] for r in ok}) or ["no runs"]
    fig = Figure(figsize=(4.4 * len(keys), 3.3 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), len(keys), squeeze=False)
    rng = np.random.default_rng(0)  # the jitter only moves points sideways
    for i, dataset in enumerate(datasets):
        for j, key in enumerate(keys):
            ax = axes[i, j]
            rs = ok_records([r for r in ok if r["dataset"] == dataset], (key,))
            labels = pair_order([r["pair"] for r in rs])
            for x, label in enumerate(labels):
                vals = np.array([r[key] for r in rs if r["pair"] == label])
                ax.scatter(x + rng.uniform(-0.15, 0.15, len(vals)), vals, s=20, alpha=0.7,
                           color=PAIR_COLORS.get(label, f"C{x + 2}"), gid=f"points:{label}")
                mean = float(vals.mean())
                ax.plot([x - 0.3, x + 0.3], [mean, mean], color="black", lw=2.5, gid=f"mean:{label}")
                ax.annotate(f"mean {mean:+.3f}\nn = {len(vals)}", (x + 0.33, mean), va="center", fontsize=8)
            if not labels:
                _empty(ax, key)
            ax.axhline(0.0, color="gray", lw=0.8, ls=":")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.6, max(len(labels), 1) - 0.4 + 0.5)
            ax.set_ylabel(LABELS.get(key, key))
            ax.set_title(f"{dataset}: {LABELS.get(key, key)}")
    return fig


def plot_cls_cur(records: Sequence[dict]) -> Figure:
    """"CLS predicts CUR": d_speed against d_util over the population `cls_cur_population` states (vanilla,
    unregularized, defined d_util), with Spearman's rank correlation over all of it and within each pair kind.

    Args:
        records: runs.jsonl records of one or several studies (the rest of them is left out, and counted).
    Returns:
        The figure. Points carry gid "points:<dataset>:<pair>", the correlation text gid "spearman".
    """
    rs = cls_cur_population(records)
    fig = Figure(figsize=(5.6, 4.6), layout="constrained")
    ax = fig.subplots()
    datasets = sorted({r["dataset"] for r in rs})
    for d, dataset in enumerate(datasets):
        for p, label in enumerate(pair_order([r["pair"] for r in rs if r["dataset"] == dataset])):
            pts = [r for r in rs if r["dataset"] == dataset and r["pair"] == label]
            ax.scatter([r["d_util"] for r in pts], [r["d_speed"] for r in pts], s=24, alpha=0.75,
                       marker=MARKERS[d % len(MARKERS)], color=PAIR_COLORS.get(label, f"C{p + 2}"),
                       label=f"{dataset}, {label}" if len(datasets) > 1 else label, gid=f"points:{dataset}:{label}")
    lines = [f"{k}: ρ = {rho:+.2f} (n = {n})" for k, (rho, n) in cls_cur_correlations(records).items()]
    vanilla = [r for r in records if r.get("status") == "ok" and r.get("algorithm") == "vanilla" and not r.get("l1")]
    dropped = undefined_count(vanilla)
    if dropped:
        lines.append(f"({dropped} with d_util undefined left out)")
    ax.text(0.03, 0.97, "Spearman " + "\n".join(lines), transform=ax.transAxes, va="top", fontsize=9, gid="spearman",
            bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
    ax.axhline(0.0, color="gray", lw=0.8, ls=":")
    ax.axvline(0.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel(f"{LABELS['d_util']} (test set, best checkpoint)")
    ax.set_ylabel(f"{LABELS['d_speed']} (at the best epoch)")
    ax.set_title("CLS vs. CUR: vanilla runs without L1, d_util defined", fontsize=10)
    if rs:
        ax.legend(loc="lower right", fontsize=8)
    else:
        _empty(ax, "d_util and d_speed")
    return fig


def _series(records: Sequence[dict], x_key: str, y_key: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x values, means, stds) of y over the runs (seeds) that share each x."""
    xs = sorted({r[x_key] for r in records})
    stats = [mean_std([r[y_key] for r in records if r[x_key] == x]) for x in xs]
    return np.array(xs, dtype=float), np.array([m for m, _ in stats]), np.array([s for _, s in stats])


def plot_regularization(records: Sequence[dict], tau: Optional[float] = None) -> Figure:
    """Figs. 4 and 8: rho, d_util and d_speed against the L1 strength lambda, mean +- std over seeds. d_util is drawn
    at the best checkpoint (solid) and at the last one (dashed); runs whose d_util is undefined (a head at chance, a
    collapsed fusion) are left out of the means and counted above the axis ("k undef.").

    Args:
        records: runs.jsonl records (failed runs and NaN values are left out).
        tau: the sparsity threshold, for the title (the records' own tau when None).
    Returns:
        The figure, three panels; each curve's line carries gid "<figure>:<dataset>:<pair>" (the last checkpoint's
        d_util "d_util_last:<dataset>:<pair>"), the undefined counts gid "undefined:<key>:<lambda>".
    """
    ok = ok_records(records, ("l1",))
    panels = (("rho",), ("d_util", "d_util_last"), ("d_speed",))
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    groups = sorted({(r["dataset"], r["pair"]) for r in ok}, key=lambda g: (g[0], pair_order([g[1]])))
    several = len({g[0] for g in groups}) > 1
    if tau is None:
        taus = {r.get("tau") for r in ok}
        tau = taus.pop() if len(taus) == 1 else None
    for ax, keys in zip(axes, panels):
        shown = False
        for n, (dataset, pair) in enumerate(groups):
            group = [r for r in ok if r["dataset"] == dataset and r["pair"] == pair]
            for key in keys:
                rs = ok_records(group, (key,))
                if not rs:
                    continue
                xs, means, stds = _series(rs, "l1", key)
                last = key.endswith("_last")
                name = f"{dataset}, {pair}" if several else pair
                bars = ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, ls="--" if last else "-",
                                   color=PAIR_COLORS.get(pair, f"C{n}"), mfc="white" if last else None,
                                   label=name + (" (last checkpoint)" if last else " (best)" if len(keys) > 1 else ""))
                bars.lines[0].set_gid(f"{key}:{dataset}:{pair}")  # the curve of means (caps and bars carry none)
                shown = True
            if keys[0] == "d_util":
                for lam in sorted({r["l1"] for r in group}):
                    k = undefined_count([r for r in group if r["l1"] == lam])
                    if k:
                        ax.annotate(f"{k} undef.", (lam, 1.0), xycoords=("data", "axes fraction"), ha="center",
                                    va="top", fontsize=7, color="gray", gid=f"undefined:d_util:{lam:g}")
        if shown:
            _log_x(ax, [r["l1"] for r in ok])
            ax.legend(fontsize=7)
        else:
            _empty(ax, keys[0])
        if keys[0] != "rho":
            ax.axhline(0.0, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(f"{LABELS['l1']} (L1 strength)")
        ax.set_ylabel(LABELS[keys[0]])
        title = ("sparsity ρ = share of |θ| < τ" + (f" = {tau:g}" if tau else "")) if keys[0] == "rho" else \
            LABELS[keys[0]] + (" (undefined runs left out)" if keys[0] == "d_util" else "")
        ax.set_title(title, fontsize=10)
    return fig


def sweeps() -> List[Tuple[str, Sweep]]:
    """The sensitivity figure's rows: (method, sweep) of every registered method's sweeps, in table order."""
    return [(name, sweep) for name, method in methods().items() for sweep in method.sweeps]


def labels() -> Dict[str, str]:
    """LABELS and the symbols of the methods' swept settings (e.g. epsilon: "$\\varepsilon$")."""
    return {**LABELS, **{sweep.setting: sweep.symbol for _, sweep in sweeps()}}


def plot_sensitivity(records: Sequence[dict]) -> Figure:
    """Fig. 9: guided training's test accuracy and d_util against epsilon and against W; below, when the study has
    them, the balancers' analogues: OGM-GE against alpha and Gradient Blending against its period n.

    Curves are mean +- std over seeds; in the epsilon row one curve per W (and per dataset and pair), in the W row
    one per epsilon; curves of a single point (the other sweep's shared setting) are left out when longer ones exist.

    Args:
        records: runs.jsonl records; each row counts only its algorithm's runs.
    Returns:
        The figure, one row per sweep (guided's two always) and two columns (acc, d_util); each curve's line carries
        gid "<figure>:<x>:<dataset>:<pair>" (guided's rows add ":<other>=<value>").
    """
    label = labels()
    short = {sweep.setting: sweep.short for _, sweep in sweeps()}
    rows = [(alg, sweep) for alg, sweep in sweeps()  # the paper's methods' rows always (Fig. 9), the others' if run
            if get_method(alg).paper_row or any(r.get("algorithm") == alg
                                                for r in ok_records(records, (sweep.setting,)))]
    fig = Figure(figsize=(9.0, 3.3 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for row, (alg, sweep) in enumerate(rows):
        x_key, other, meaning = sweep.setting, sweep.hold, sweep.meaning
        ok = [r for r in ok_records(records, (x_key,) + ((other,) if other else ())) if r.get("algorithm") == alg]
        several = len({(r["dataset"], r["pair"]) for r in ok}) > 1
        groups: Dict[tuple, List[dict]] = {}
        for r in ok:
            groups.setdefault((r["dataset"], r["pair"], r[other] if other else None), []).append(r)
        long = {g: rs for g, rs in groups.items() if len({r[x_key] for r in rs}) > 1}
        groups = long or groups
        for col, key in enumerate(("acc", "d_util")):
            ax = axes[row, col]
            shown = False
            for n, ((dataset, pair, value), rs) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
                rs = ok_records(rs, (key,))
                if not rs:
                    continue
                xs, means, stds = _series(rs, x_key, key)
                name = f"{short[other]} = {value:g}" if other else alg
                bars = ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, color=f"C{n}",
                                   label=f"{dataset}, {pair}, {name}" if several else name)
                bars.lines[0].set_gid(f"{key}:{x_key}:{dataset}:{pair}" + (f":{other}={value:g}" if other else ""))
                shown = True
            if shown:
                if sweep.log_x:
                    _log_x(ax, [r[x_key] for r in ok])
                ax.legend(fontsize=8)
            else:
                _empty(ax, f"{key} ({alg})")
            if key == "d_util":
                ax.axhline(0.0, color="gray", lw=0.8, ls=":")
            ax.set_xlabel(f"{label[x_key]} ({meaning})")
            ax.set_ylabel(label[key])
            ax.set_title(f"{alg}: {label[key]} against {label[x_key]}")
    return fig


def summary_table(records: Sequence[dict], by: Sequence[str], keys: Sequence[str]) -> str:
    """The numbers behind a figure as a Markdown table: mean +- std over the runs of each group.

    Args:
        records: runs.jsonl records (failed runs and NaN values are left out, per figure).
        by: the record fields that form the groups, e.g. ("dataset", "pair") or ("l1",).
        keys: the figures to aggregate, e.g. ("d_util", "d_speed").
    Returns:
        Markdown text: one row per group (in sorted order) with "mean ± std (n)" per key, and for d_util the
        number of runs whose d_util is undefined ("…, 2 undefined"), which the mean leaves out.
    """
    ok = [r for r in records if r.get("status") == "ok"]

    def group_of(r: dict) -> tuple:  # lists (views) as tuples, so groups can be collected in a set
        return tuple(tuple(v) if isinstance(v, list) else v for v in (r.get(b) for b in by))

    def order(group: tuple) -> tuple:  # numbers by value, before any text (None included)
        return tuple((0, x, "") if isinstance(x, (int, float)) and not isinstance(x, bool) else (1, 0, str(x))
                     for x in group)

    groups = sorted({group_of(r) for r in ok}, key=order)
    lines = ["| " + " | ".join(list(by) + list(keys)) + " |", "|" + "---|" * (len(by) + len(keys))]
    for g in groups:
        rs = [r for r in ok if group_of(r) == g]
        cells = [f"{x:g}" if isinstance(x, float) else str(x) for x in g]
        for k in keys:
            vals = [r[k] for r in ok_records(rs, (k,))]
            cell = "n/a" if not vals else "{:+.3f} ± {:.3f} ({})".format(*mean_std(vals), len(vals))
            undefined = undefined_count(rs, k) if k.startswith("d_util") else 0
            cells.append(cell + (f", {undefined} undefined" if undefined else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The figures a Study names in its `figures` (greedymm.study.grid.FIGURE_NAMES).
FIGURES: Mapping[str, Callable[[Sequence[dict]], Figure]] = {
    "pairs": plot_pair_kinds, "cls_cur": plot_cls_cur, "regularization": plot_regularization,
    "sensitivity": plot_sensitivity,
}


def study_figures(names: Sequence[str], records: Sequence[dict]) -> Dict[str, Figure]:
    """The named figures drawn from a study's records.

    Args:
        names: figure names (keys of FIGURES), e.g. a Study's `figures`.
        records: its runs.jsonl records.
    Returns:
        {name: Figure} in the given order.
    """
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"figures {unknown} are unknown; allowed: {', '.join(FIGURES)}")
    return {name: FIGURES[name](records) for name in names}
