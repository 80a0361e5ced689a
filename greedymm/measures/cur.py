"""The conditional utilization rate (paper Sec. 3.2; SPEC Sec. 7): cut the fusion by replacing the other
modality's squeeze vectors with their means over D_train, and compare accuracies with and without it.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

import torch

from ..models.mmtm import FusionMode
from ..models.two_branch import TwoBranchNet
from ..runtime import Batch, autocast, to_device
from .evaluate import evaluate


@torch.no_grad()
def compute_squeeze_means(model: TwoBranchNet, train_loader: Iterable[Batch],
                          device: Optional[torch.device] = None,
                          autocast_dtype: Optional[torch.dtype] = None) -> None:
    """Set every MMTM's `squeeze_mean_a/b` to the mean squeeze vectors over `train_loader`, in eval mode.

    Args:
        model: the trained model.
        train_loader: D_train batches without augmentation (e.g. `Loaders.train_eval`).
        device: the model's device if None.
        autocast_dtype: mixed-precision dtype on CUDA, or None.
    """
    if getattr(train_loader, "augment", False):
        raise ValueError("the squeeze means must come from D_train without augmentation; "
                         "pass a loader with augment=False (e.g. Loaders.train_eval)")
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

    Args:
        model: the trained model (load the best checkpoint first).
        train_loader: D_train batches without augmentation, for the squeeze means.
        test_loader: test batches.
        device: the model's device if None.
        autocast_dtype: mixed-precision dtype on CUDA, or None for fp32.
    Returns:
        dict with acc (fused), acc0, acc1, acc0_cut, acc1_cut, u_m1_m0, u_m0_m1, d_util.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    compute_squeeze_means(model, train_loader, device, autocast_dtype)
    fused = evaluate(model, test_loader, device, FusionMode.FUSED, autocast_dtype)
    cut = evaluate(model, test_loader, device, FusionMode.CUT, autocast_dtype)
    out = {"acc": fused["acc"], "acc0": fused["acc0"], "acc1": fused["acc1"],
           "acc0_cut": cut["acc0"], "acc1_cut": cut["acc1"]}
    out.update(utilization_rates(out["acc0"], out["acc1"], out["acc0_cut"], out["acc1_cut"]))
    return out
