"""Figures of the experiment (paper Sec. 5, Figs. 2-4; SPEC Sec. 13): views, learning curves, d_speed with re-balancing
steps shaded, d_util per method in its colour, robustness curves. Every function returns a Figure built without
pyplot: no global state, nothing shown twice in a notebook, `fig.savefig` for files.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .methods.base import method_color

MODE_COLORS = {"rebalance_m0": "tab:green", "rebalance_m1": "tab:red"}


def pick_examples(labels: np.ndarray, n: int) -> List[int]:
    """Indices of the first object of each of the first `n` classes that have objects (absent classes skipped).

    Args:
        labels: (N,) class index of each object.
        n: how many classes to show.
    Returns:
        Up to n indices, one per class, in class order.
    """
    labels = np.asarray(labels)
    present = np.unique(labels)[:n]
    return [int(np.flatnonzero(labels == c)[0]) for c in present]


def plot_views(images: np.ndarray, names: Sequence[str], labels: Sequence[str], views: Sequence[int] = (0, 6),
               max_objects: int = 4) -> Figure:
    """Grid of the 12 views of a few objects, the two chosen views framed (m0 green, m1 red).

    Args:
        images: uint8 (N, 12, C, H, W), e.g. the first objects of a cache split.
        names: object names, N.
        labels: class names of the objects, N.
        views: the view indices used as m0 and m1.
        max_objects: rows to draw.
    Returns:
        The figure.
    """
    n = min(max_objects, len(images))
    n_views = images.shape[1]
    fig = Figure(figsize=(1.2 * n_views, 1.3 * n + 0.4), layout="constrained")
    axes = fig.subplots(n, n_views, squeeze=False)
    for i in range(n):
        for v in range(n_views):
            ax = axes[i, v]
            img = images[i, v].transpose(1, 2, 0)  # (H, W, C)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if v in views:
                color = "tab:green" if v == views[0] else "tab:red"
                for side in ax.spines.values():
                    side.set_edgecolor(color)
                    side.set_linewidth(3)
            if i == 0:
                tag = " (m0)" if v == views[0] else " (m1)" if v == views[1] else ""
                ax.set_title(f"view {v}{tag}", fontsize=8)
            if v == 0:
                ax.set_ylabel(f"{labels[i]}\n{names[i]}", fontsize=7)
    fig.suptitle("12 views per object; the two modalities framed", fontsize=10)
    return fig


def plot_pairs(x_colored: np.ndarray, x_gray: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
               title: str = "colored (m0) and gray (m1) digits", max_pairs: int = 20, columns: int = 10) -> Figure:
    """Grid of (colored, gray) digit pairs, the colored one above, each titled with its class (SPEC Sec. 10).

    Shown for training digits, the class colors line up with the labels (the shortcut); for test digits they do not.

    Args:
        x_colored: (N, 3, H, W) m0 images, uint8 (0..255) or float (0..1), e.g. `split.images[:, 0]`.
        x_gray: (N, 1 or 3, H, W) m1 images, same scale.
        labels: class index of each pair, N.
        class_names: names of the classes.
        title: the figure's title (say which split the pairs come from).
        max_pairs: pairs to draw (the first ones).
        columns: pairs per row.
    Returns:
        The figure.
    """
    x_colored, x_gray = np.asarray(x_colored), np.asarray(x_gray)
    if x_colored.ndim != 4 or x_colored.shape[1] != 3 or x_gray.ndim != 4 or x_gray.shape[1] not in (1, 3) \
            or len(x_gray) != len(x_colored) or len(labels) != len(x_colored):
        raise ValueError(f"x_colored must be (N, 3, H, W), x_gray (N, 1 or 3, H, W) and labels N; got "
                         f"{x_colored.shape}, {x_gray.shape} and {len(labels)} labels")
    n = min(max_pairs, len(x_colored))
    if n < 1:
        raise ValueError("no pairs to draw")
    cols = min(columns, n)
    rows = -(-n // cols)
    vmax = 255 if x_colored.dtype == np.uint8 else 1.0
    fig = Figure(figsize=(1.1 * cols + 0.6, 2.2 * rows + 0.5), layout="constrained")
    axes = fig.subplots(2 * rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i in range(n):
        r, c = divmod(i, cols)
        colored = np.clip(x_colored[i].transpose(1, 2, 0) / vmax, 0, 1)  # (H, W, 3) for imshow
        axes[2 * r, c].imshow(colored)
        axes[2 * r + 1, c].imshow(x_gray[i, 0], cmap="gray", vmin=0, vmax=vmax)
        axes[2 * r, c].set_title(str(class_names[int(labels[i])]), fontsize=9)
    for r in range(rows):
        axes[2 * r, 0].set_ylabel("m0", fontsize=8)
        axes[2 * r + 1, 0].set_ylabel("m1", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_learning_curves(histories: Mapping[str, Sequence[dict]]) -> Figure:
    """Training loss and validation accuracy (fused, y0_hat, y1_hat) per epoch for each run.

    Args:
        histories: run label (e.g. "guided") -> epoch records from `train` (epochs.jsonl).
    Returns:
        The figure: loss | fused accuracy | branch accuracies.
    """
    fig = Figure(figsize=(14, 3.6), layout="constrained")
    ax_loss, ax_acc, ax_branch = fig.subplots(1, 3)
    for label, hist in histories.items():
        color = method_color(label.split()[0], None)
        epochs = [h["epoch"] for h in hist]
        ax_loss.plot(epochs, [h["train_loss"] for h in hist], color=color, label=f"{label} train")
        if hist and "val_loss" in hist[0]:
            ax_loss.plot(epochs, [h["val_loss"] for h in hist], color=color, ls="--", label=f"{label} val")
        split = "val" if hist and "val_acc" in hist[0] else "train"
        ax_acc.plot(epochs, [h[f"{split}_acc"] for h in hist], color=color, label=label)
        if hist and f"{split}_acc0" in hist[0]:  # a uni-modal network has no branch accuracies
            ax_branch.plot(epochs, [h[f"{split}_acc0"] for h in hist], color=color, label=f"{label} y0 (m0)")
            ax_branch.plot(epochs, [h[f"{split}_acc1"] for h in hist], color=color, ls=":", label=f"{label} y1 (m1)")
    ax_loss.set(title="loss CE(y0) + CE(y1)", xlabel="epoch", yscale="log")  # early val losses dwarf the rest
    split = "val" if any(hist and "val_acc" in hist[0] for hist in histories.values()) else "train"
    ax_acc.set(title=f"{split} accuracy (two branches: of (y0 + y1) / 2)", xlabel="epoch", ylim=(0, 1.02))
    ax_branch.set(title=f"{split} accuracy of each branch", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc, ax_branch):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _mode_spans(modes: Sequence[str]) -> List[tuple]:
    """Runs of equal non-fused modes as (mode, first step, last step), 1-based steps."""
    spans, start = [], None
    for i, mode in enumerate(list(modes) + ["fused"]):
        if start is not None and mode != modes[start]:
            spans.append((modes[start], start + 1, i))
            start = None
        if start is None and mode != "fused" and i < len(modes):
            start = i
    return spans


def plot_d_speed(step_logs: Mapping[str, Sequence[dict]], epsilon: Optional[float] = None) -> Figure:
    """d_speed over training steps, one panel per run, re-balancing steps shaded by modality.

    Args:
        step_logs: run label -> step records from `train` (steps.jsonl).
        epsilon: draws the guided tolerance band +-epsilon when given.
    Returns:
        The figure.
    """
    fig = Figure(figsize=(12, 2.4 * len(step_logs)), layout="constrained")
    axes = fig.subplots(len(step_logs), 1, sharex=True, squeeze=False)
    for ax, (label, steps) in zip(axes[:, 0], step_logs.items()):
        x = [s["step"] for s in steps]
        ax.plot(x, [s["d_speed"] for s in steps], color=method_color(label.split()[0], "k"), lw=1)
        for mode, first, last in _mode_spans([s["mode"] for s in steps]):
            ax.axvspan(x[first - 1] - 0.5, x[last - 1] + 0.5, color=MODE_COLORS[mode], alpha=0.25, lw=0)
        if epsilon is not None:
            ax.axhspan(-epsilon, epsilon, color="k", alpha=0.08, lw=0)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel("d_speed")
        ax.set_title(label, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    handles = [Patch(color=MODE_COLORS[m], alpha=0.4, label=m.replace("_", " ")) for m in MODE_COLORS]
    axes[0, 0].legend(handles=handles, fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("training step")
    return fig


def plot_d_util(d_utils: Mapping[str, Sequence[float]], paper: Optional[Mapping[str, float]] = None) -> Figure:
    """Bar plot of d_util per algorithm: mean over seeds, with the seeds as dots and the paper's values.

    Args:
        d_utils: algorithm -> d_util of each seed.
        paper: algorithm -> the paper's approximate d_util, drawn as a black tick if given.
    Returns:
        The figure.
    """
    fig = Figure(figsize=(1.6 + 1.4 * len(d_utils), 3.4), layout="constrained")
    ax = fig.subplots()
    names = list(d_utils)
    for i, name in enumerate(names):
        vals = np.asarray(d_utils[name], dtype=float)
        ax.bar(i, np.nanmean(vals), color=method_color(name, "tab:purple"), alpha=0.8,
               yerr=np.nanstd(vals) if len(vals) > 1 else None, capsize=4)
        ax.scatter(np.full(len(vals), i), vals, color="k", s=12, zorder=3)
        if paper and name in paper:
            ax.plot([i - 0.35, i + 0.35], [paper[name]] * 2, color="k", ls="--", lw=1.5,
                    label="paper (ModelNet40)" if i == 0 else None)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("d_util = u(m1|m0) - u(m0|m1)")
    ax.set_title("imbalance in utilization (test set)", fontsize=10)
    if paper:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_robustness(curves: Mapping[str, Sequence[Mapping[str, Sequence]]]) -> Figure:
    """The robustness curves of each row (SPEC Sec. 13): fused test accuracy as noise of growing sigma is added to
    one modality's input, then with that modality cut; one panel per row, m0 and m1 noised, mean over seeds (the
    seeds as thin lines).

    Args:
        curves: algorithm -> one record per seed, each with robust_sigmas (the levels, then "cut"), robust0 and
            robust1 (`greedymm.measures.contribution.robustness_curves`).
    Returns:
        The figure.
    """
    names = list(curves)
    fig = Figure(figsize=(0.6 + 2.6 * max(1, len(names)), 3.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(names)), sharey=True, squeeze=False)[0])
    for ax, name in zip(axes, names):
        runs = list(curves[name])
        labels = [str(s) if s == "cut" else f"{float(s):g}" for s in runs[0]["robust_sigmas"]] if runs else []
        x = np.arange(len(labels))
        for k, color in ((0, "tab:green"), (1, "tab:red")):
            ys = np.array([r[f"robust{k}"] for r in runs], dtype=float)  # (seeds, levels)
            for y in ys:
                ax.plot(x, y, color=color, lw=0.6, alpha=0.35)
            if len(ys):
                ax.plot(x, np.nanmean(ys, axis=0), color=color, lw=2, marker="o", ms=3, label=f"noise on m{k}")
        ax.set_xticks(x, labels)
        ax.set_xlabel("noise σ (input stds over D_train)")
        ax.set_title(name, fontsize=10, color=method_color(name, "k"))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fused test accuracy")
    axes[0].legend(fontsize=7)
    return fig
