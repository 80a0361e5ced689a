"""Accuracies, macro-F1 and losses of a model in evaluation mode (SPEC Sec. 2, 6, 7, 13): of the fused prediction and
of each branch, in any fusion mode (fused for validation and test, cut for the CUR), and the correct counts of a
training step; one host synchronisation per pass.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..models.mmtm import FusionMode
from ..models.two_branch import TwoBranchNet
from ..runtime import Batch, autocast, to_device

Outputs = Dict[str, torch.Tensor]  # a training forward pass: "y0", "y1" (two branches) or "y" (one), plus extras


def model_input(model: nn.Module, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The input of a uni-modal network: x0 or x1, by its `modality`."""
    return x1 if getattr(model, "modality", 0) == 1 else x0


def is_two_branch(model: nn.Module) -> bool:
    """True for a two-branch model with CLS groups (TwoBranchNet), False for a uni-modal network."""
    return hasattr(model, "cls_groups")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], device: Optional[torch.device] = None,
             mode: Union[str, FusionMode] = FusionMode.FUSED,
             autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Accuracies and mean losses in evaluation mode.

    Args:
        model: a two-branch model, or a uni-modal network (it reads x0 or x1 by its `modality`).
        loader: iterable of (x0, x1, y) batches.
        device: where to run; the model's device if None.
        mode: fusion mode (fused for validation/test; cut for the conditional utilization rate).
        autocast_dtype: mixed-precision dtype, or None for fp32.
    Returns:
        Two branches: acc (of `model.predict(y0_hat, y1_hat)`: MMTM (y0_hat + y1_hat) / 2, late fusion z = the sum),
        acc0, acc1 (of y0_hat, y1_hat: late fusion's partial logits), loss (the training loss: CE(y0_hat) +
        CE(y1_hat), late fusion CE(z)), loss0, loss1, loss_fused (CE of the fused logits), n (samples) and classes
        (K, the logits' width), f1, f1_0, f1_1 (macro-F1 of the fused prediction and of y0_hat, y1_hat). A uni-modal
        network: acc, loss, f1, n and classes.
    """
    device = device or next(model.parameters()).device
    two = is_two_branch(model)
    predict = getattr(model, "predict", TwoBranchNet.predict)
    was_training = model.training
    model.eval()
    totals = torch.zeros(6 if two else 2, dtype=torch.float64, device=device)
    confusion: Optional[torch.Tensor] = None  # (heads, K * K) counts of (label, prediction): the macro-F1
    n = classes = 0
    for x0, x1, y in loader:
        x0, x1, y = to_device(x0, x1, y, device, model)
        with autocast(device, autocast_dtype):
            if two:
                y0_hat, y1_hat = model(x0, x1, mode)
            else:
                y_hat = model(model_input(model, x0, x1))
        if two:
            y0_hat, y1_hat = y0_hat.float(), y1_hat.float()
            fused = predict(y0_hat, y1_hat)  # (B, K): MMTM the mean, late fusion the sum z
            losses = [F.cross_entropy(out, y, reduction="sum") for out in (y0_hat, y1_hat, fused)]
            corrects = [correct(out, y) for out in (fused, y0_hat, y1_hat)]
            totals += torch.stack(losses + corrects).double()
            heads = (fused, y0_hat, y1_hat)
        else:
            y_hat = y_hat.float()
            totals += torch.stack([F.cross_entropy(y_hat, y, reduction="sum"), correct(y_hat, y)]).double()
            heads = (y_hat,)
        classes = heads[0].shape[1]
        counts = torch.stack([torch.bincount(y * classes + h.argmax(1), minlength=classes * classes)
                              for h in heads])  # (heads, K * K)
        confusion = counts if confusion is None else confusion + counts
        n += y.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got an empty loader")
    values = torch.cat([totals, confusion.double().flatten()]).tolist()  # the one host synchronisation
    t = [v / n for v in values[:totals.numel()]]
    f1 = macro_f1(torch.tensor(values[totals.numel():], dtype=torch.float64).reshape(len(heads), classes, classes))
    if not two:
        return {"acc": t[1], "loss": t[0], "f1": f1[0], "n": n, "classes": classes}
    # The loss the model trains with: MMTM CE(y0_hat) + CE(y1_hat), late fusion CE(z) (SPEC Sec. 13).
    loss = t[2] if getattr(model, "is_late", False) else t[0] + t[1]
    return {"acc": t[3], "acc0": t[4], "acc1": t[5], "loss": loss, "loss0": t[0], "loss1": t[1],
            "loss_fused": t[2], "f1": f1[0], "f1_0": f1[1], "f1_1": f1[2], "n": n, "classes": classes}


def macro_f1(confusion: torch.Tensor) -> List[float]:
    """Macro-F1 of each head from its confusion counts: the mean over classes of 2 TP / (2 TP + FP + FN), over the
    classes that occur as a label or a prediction.

    Args:
        confusion: (heads, K, K) counts, [h, label, prediction].
    Returns:
        One macro-F1 per head.
    """
    tp = confusion.diagonal(dim1=1, dim2=2)  # (heads, K)
    denom = confusion.sum(2) + confusion.sum(1)  # 2 TP + FN + FP: labels plus predictions of each class
    present = denom > 0
    f1 = torch.where(present, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return (f1.sum(1) / present.sum(1).clamp(min=1)).tolist()


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions as a 0-d tensor (no sync)."""
    return (logits.argmax(1) == y).sum()


def corrects(out: Outputs, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Correct counts of a training forward pass: fused, y0_hat, y1_hat (two branches) or y_hat (one)."""
    if "y" in out:
        return {"correct": correct(out["y"].detach(), y)}
    y0_hat, y1_hat = out["y0"].detach(), out["y1"].detach()
    fused = out["z"].detach() if "z" in out else TwoBranchNet.predict(y0_hat, y1_hat)  # late fusion: z
    return {"correct": correct(fused, y), "correct0": correct(y0_hat, y), "correct1": correct(y1_hat, y)}
