"""The conditional utilization rate (paper Sec. 3.2; SPEC Sec. 7, 11, 13): cut the fusion by replacing the other
modality's squeeze vectors (late fusion: features) with their means over D_train, compare accuracies with and without
it, and mark d_util undefined when a branch head is at chance or the fusion has collapsed.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from ..models.mmtm import FusionMode
from ..models.two_branch import TwoBranchNet
from ..runtime import Batch, autocast, to_device
from .evaluate import evaluate


@torch.no_grad()
def compute_cut_means(model: nn.Module, train_loader: Iterable[Batch], device: Optional[torch.device] = None,
                      autocast_dtype: Optional[torch.dtype] = None) -> None:
    """Fill the D_train means the cut mode replaces the other modality with, for any fusion, in eval mode: every
    MMTM's mean squeeze vectors (SPEC Sec. 3), or a late-fusion model's mean features e0, e1 (Sec. 13).

    Args:
        model: the trained two-branch model.
        train_loader: D_train batches without augmentation (e.g. `Loaders.train_eval`).
        device: the model's device if None.
        autocast_dtype: mixed-precision dtype on CUDA, or None.
    """
    if getattr(model, "is_late", False):
        _compute_feature_means(model, train_loader, device, autocast_dtype)
    else:
        compute_squeeze_means(model, train_loader, device, autocast_dtype)


def _compute_feature_means(model: nn.Module, train_loader: Iterable[Batch], device: Optional[torch.device],
                           autocast_dtype: Optional[torch.dtype]) -> None:
    """A late-fusion model's `set_cut_means`: the means of e0 (F0,) and e1 (F1,) over `train_loader`, eval mode."""
    _check_unaugmented(train_loader)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: List[torch.Tensor] = []
    n = 0
    try:
        for x0, x1, y in train_loader:
            x0, x1, _ = to_device(x0, x1, y, device, model)
            with autocast(device, autocast_dtype):
                feats = model(x0, x1, FusionMode.FUSED, return_features=True)[2]  # (e0 (B, F0), e1 (B, F1))
            batch = [e.detach().double().sum(0) for e in feats]
            sums = batch if not sums else [a + b for a, b in zip(sums, batch)]
            n += feats[0].shape[0]
        if n == 0:
            raise ValueError("compute_cut_means got an empty loader")
        model.set_cut_means(sums[0] / n, sums[1] / n)
    finally:
        model.train(was_training)


def _check_unaugmented(train_loader: Iterable[Batch]) -> None:
    if getattr(train_loader, "augment", False):
        raise ValueError("the squeeze means must come from D_train without augmentation; "
                         "pass a loader with augment=False (e.g. Loaders.train_eval)")


@torch.no_grad()
def compute_squeeze_means(model: TwoBranchNet, train_loader: Iterable[Batch],
                          device: Optional[torch.device] = None,
                          autocast_dtype: Optional[torch.dtype] = None) -> None:
    """Set every MMTM's `squeeze_mean_a/b` to the mean squeeze vectors over `train_loader`, in eval mode
    (`compute_cut_means` does this for any fusion).

    Args:
        model: the trained model.
        train_loader: D_train batches without augmentation (e.g. `Loaders.train_eval`).
        device: the model's device if None.
        autocast_dtype: mixed-precision dtype on CUDA, or None.
    """
    if getattr(model, "is_late", False):
        _compute_feature_means(model, train_loader, device, autocast_dtype)
        return
    _check_unaugmented(train_loader)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    mmtms = list(model.mmtms.values())
    for m in mmtms:
        m.squeeze_stats = [torch.zeros(m.channels_a, device=device), torch.zeros(m.channels_b, device=device), 0]
    try:
        for x0, x1, y in train_loader:
            x0, x1, _ = to_device(x0, x1, y, device, model)
            with autocast(device, autocast_dtype):
                model(x0, x1, FusionMode.FUSED)
        for m in mmtms:
            sum_a, sum_b, n = m.squeeze_stats
            if n == 0:
                raise ValueError("compute_squeeze_means got an empty loader")
            m.set_squeeze_means(sum_a / n, sum_b / n)
    finally:
        for m in mmtms:
            m.squeeze_stats = None
        model.train(was_training)


# A branch head counts as at chance when its accuracy is within this many binomial standard errors above 1/K.
CHANCE_SE = 2.0
# The fusion counts as collapsed when no fusion scale varies by more than this (its std over the test set): the
# cross-modal path then carries no per-sample information (paper Sec. 6.3's strongest penalties zero it).
COLLAPSE_TOL = 1e-2


def chance_level(num_classes: int, n: int, se: float = CHANCE_SE) -> float:
    """The accuracy up to which a head counts as at chance: 1/K + se * sqrt((1/K)(1 - 1/K) / n).

    Args:
        num_classes: K.
        n: the samples the accuracy was measured on.
        se: binomial standard errors above 1/K.
    Returns:
        The threshold.
    """
    if num_classes < 2 or n < 1:
        raise ValueError(f"chance_level needs num_classes >= 2 and n >= 1, got {num_classes} and {n}")
    p = 1.0 / num_classes
    return p + se * math.sqrt(p * (1 - p) / n)


def undefined_reason(acc0: float, acc1: float, num_classes: int, n: int, spread: Optional[float] = None,
                     tol: float = COLLAPSE_TOL) -> str:
    """Why d_util is undefined for a model, or "" when it is defined (SPEC Sec. 11).

    d_util compares how much each branch loses when the fusion is cut. A branch head at chance has nothing to lose,
    and a collapsed fusion (scales constant over the data) passes nothing to cut: both u are then ~0 because the
    measurement is empty, not because the model is balanced.

    Args:
        acc0, acc1: A(f0), A(f1), the branch accuracies with the fusion.
        num_classes: K.
        n: test samples.
        spread: the largest std of a fusion scale over the test set (`fusion_spread`); None to skip the check.
        tol: the collapse tolerance on `spread`.
    Returns:
        The reasons joined by "; ", or "".
    """
    reasons: List[str] = []
    if spread is not None and spread < tol:
        reasons.append(f"fusion collapsed: no fusion scale varies by more than {spread:.1e} over the test set "
                       f"(< {tol:g})")
    level = chance_level(num_classes, n)
    for k, acc in ((0, acc0), (1, acc1)):
        if acc <= level:
            reasons.append(f"branch {k} at chance: A(f{k}) = {acc:.3f} <= {level:.3f} (1/K + {CHANCE_SE:g} s.e.)")
    return "; ".join(reasons)


def utilization_rates(acc0: float, acc1: float, acc0_cut: float, acc1_cut: float) -> Dict[str, float]:
    """u(m1|m0), u(m0|m1) and d_util from the four accuracies (SPEC Sec. 7).

    Args:
        acc0, acc1: A(f0), A(f1): branch accuracies with the fusion.
        acc0_cut, acc1_cut: A(f0'), A(f1'): the same with the fusion cut.
    Returns:
        dict with u_m1_m0, u_m0_m1, d_util (NaN where a branch accuracy is 0).
    """
    u_m1_m0 = (acc0 - acc0_cut) / acc0 if acc0 > 0 else float("nan")
    u_m0_m1 = (acc1 - acc1_cut) / acc1 if acc1 > 0 else float("nan")
    return {"u_m1_m0": u_m1_m0, "u_m0_m1": u_m0_m1, "d_util": u_m1_m0 - u_m0_m1}


def conditional_utilization(model: TwoBranchNet, train_loader: Iterable[Batch], test_loader: Iterable[Batch],
                            device: Optional[Union[str, torch.device]] = None,
                            autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Compute A(f0), A(f1), A(f0'), A(f1'), the fused accuracy, u(m1|m0), u(m0|m1) and d_util on the test set.

    A late-fusion model (SPEC Sec. 13) compares the fused accuracy A(z) with A(z | e1 := mean e1) (u(m1|m0)) and
    A(z | e0 := mean e0) (u(m0|m1)); acc0 and acc1 are then the partial logits' own accuracies.

    Args:
        model: the trained model (load the best checkpoint first).
        train_loader: D_train batches without augmentation, for the squeeze (or feature) means.
        test_loader: test batches.
        device: the model's device if None.
        autocast_dtype: mixed-precision dtype on CUDA, or None for fp32.
    Returns:
        dict with acc (fused), acc0, acc1, acc0_cut, acc1_cut, u_m1_m0, u_m0_m1, d_util (NaN when undefined),
        fusion_spread (the largest std of a fusion scale over the test set), chance (the at-chance level) and
        d_util_undefined (why d_util is undefined, "" when it is defined).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if getattr(model, "is_late", False):
        return _late_utilization(model, train_loader, test_loader, device, autocast_dtype)
    compute_squeeze_means(model, train_loader, device, autocast_dtype)
    mmtms = list(model.mmtms.values())
    for m in mmtms:  # the fused pass also gathers the spread of the scales
        width = m.channels_a + m.channels_b
        m.scale_stats = [torch.zeros(width, dtype=torch.float64, device=device),
                         torch.zeros(width, dtype=torch.float64, device=device), 0]
    try:
        fused = evaluate(model, test_loader, device, FusionMode.FUSED, autocast_dtype)
        spread = max(_std(m.scale_stats) for m in mmtms)
    finally:
        for m in mmtms:
            m.scale_stats = None
    cut = evaluate(model, test_loader, device, FusionMode.CUT, autocast_dtype)
    out = {"acc": fused["acc"], "acc0": fused["acc0"], "acc1": fused["acc1"],
           "acc0_cut": cut["acc0"], "acc1_cut": cut["acc1"]}
    out.update(utilization_rates(out["acc0"], out["acc1"], out["acc0_cut"], out["acc1_cut"]))
    reason = undefined_reason(out["acc0"], out["acc1"], fused["classes"], fused["n"], spread)
    out.update(fusion_spread=spread, chance=chance_level(fused["classes"], fused["n"]), d_util_undefined=reason)
    if reason:
        out["d_util"] = math.nan  # the u's stay as measured; their difference means nothing
    return out


def _late_utilization(model: nn.Module, train_loader: Iterable[Batch], test_loader: Iterable[Batch],
                      device: torch.device, autocast_dtype: Optional[torch.dtype]) -> Dict[str, float]:
    """The CUR of a late-fusion model (SPEC Sec. 13): A(z) against A(z | e1 := mean e1) and A(z | e0 := mean e0).

    Returns:
        As `conditional_utilization`, with acc = A(z) (the reference of both rates), acc0, acc1 the partial logits'
        accuracies, acc0_cut = A(z | e1 cut), acc1_cut = A(z | e0 cut), and fusion_spread NaN (a late fusion cannot
        collapse: its prediction always sums both modalities' terms; d_util is undefined only when A(z) is at
        chance).
    """
    compute_cut_means(model, train_loader, device, autocast_dtype)
    fused = evaluate(model, test_loader, device, FusionMode.FUSED, autocast_dtype)
    cut = evaluate(model, test_loader, device, FusionMode.CUT, autocast_dtype)  # acc0: m1 cut, acc1: m0 cut
    out = {"acc": fused["acc"], "acc0": fused["acc0"], "acc1": fused["acc1"],
           "acc0_cut": cut["acc0"], "acc1_cut": cut["acc1"]}
    out.update(utilization_rates(fused["acc"], fused["acc"], out["acc0_cut"], out["acc1_cut"]))  # both against A(z)
    level = chance_level(fused["classes"], fused["n"])
    reason = (f"the fused prediction at chance: A(z) = {fused['acc']:.3f} <= {level:.3f} (1/K + {CHANCE_SE:g} s.e.)"
              if fused["acc"] <= level else "")
    out.update(fusion_spread=math.nan, chance=level, d_util_undefined=reason)
    if reason:
        out["d_util"] = math.nan
    return out


def _std(stats: list) -> float:
    """The largest per-channel standard deviation from [sums (C,), sums of squares (C,), n]."""
    total, squares, n = stats
    mean = total / n
    return float((squares / n - mean.square()).clamp(min=0).sqrt().max())
