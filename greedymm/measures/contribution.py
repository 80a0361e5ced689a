"""The field's modality measures for any fusion (SPEC Sec. 13, our extension): the Shapley contribution of each
modality (closed form for two), a linear probe per frozen encoder, and a robustness curve per modality.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..models.mmtm import FusionMode
from ..models.two_branch import TwoBranchNet, final_linear
from ..runtime import Batch, autocast, to_device
from .cur import compute_cut_means
from .evaluate import evaluate

# Noise levels of the robustness curve, in units of the modality's input std over D_train (SPEC Sec. 13).
ROBUST_SIGMAS = (0.0, 0.25, 0.5, 1.0, 2.0)
PROBE_MAX_ITER = 1000  # iterations of the probes' logistic regression (lbfgs)


def shapley_values(v01: float, v0: float, v1: float, v_none: float) -> Dict[str, float]:
    """The Shapley contributions of two modalities from the value of each coalition (SPEC Sec. 13).

    phi0 = ((v01 - v1) + (v0 - v_none)) / 2, phi1 = ((v01 - v0) + (v1 - v_none)) / 2; phi0 + phi1 = v01 - v_none.

    Args:
        v01: v({0, 1}), the fused accuracy; v0: v({0}) (m1 cut); v1: v({1}) (m0 cut); v_none: v({}) (both cut).
    Returns:
        dict with shapley0, shapley1.
    """
    return {"shapley0": ((v01 - v1) + (v0 - v_none)) / 2, "shapley1": ((v01 - v0) + (v1 - v_none)) / 2}


def _heads(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """The maps from pooled features to each modality's logits: MMTM branch heads, late-fusion heads."""
    if getattr(model, "is_late", False):
        return model.head(0), model.head(1)
    return final_linear(model.branch0), final_linear(model.branch1)


@torch.no_grad()
def _feature_means(model: nn.Module, loader: Iterable[Batch], device: torch.device,
                   autocast_dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, torch.Tensor]:
    """D_train means of the pooled features (e0 (F0,), e1 (F1,)) in fused mode, eval mode (the model's cut means for
    late fusion, where they are the same)."""
    if getattr(model, "is_late", False):
        return model.cut_mean0.float(), model.cut_mean1.float()
    sums: List[torch.Tensor] = []
    n = 0
    for x0, x1, y in loader:
        x0, x1, _ = to_device(x0, x1, y, device, model)
        with autocast(device, autocast_dtype):
            feats = model(x0, x1, FusionMode.FUSED, return_features=True)[2]
        batch = [e.double().sum(0) for e in feats]
        sums = batch if not sums else [a + b for a, b in zip(sums, batch)]
        n += feats[0].shape[0]
    return (sums[0] / n).float(), (sums[1] / n).float()


@torch.no_grad()
def coalition_values(model: nn.Module, train_loader: Iterable[Batch], test_loader: Iterable[Batch],
                     device: Optional[Union[str, torch.device]] = None, autocast_dtype: Optional[torch.dtype] = None,
                     cut_means: bool = True) -> Dict[str, float]:
    """v(S): the fused test accuracy with the modalities outside S cut to their D_train means (SPEC Sec. 13).

    Late fusion: cutting m_k replaces e_k by its D_train mean. MMTM: cutting m1 runs the MMTMs in cut mode for
    branch 0 (it sees m1 only through its mean squeeze) and replaces branch 1's pooled features by their D_train
    mean, and likewise for m0; both cut, both heads read the mean features.

    Args:
        model: the trained two-branch model, any fusion.
        train_loader: D_train without augmentation (the means).
        test_loader: the test batches.
        device, autocast_dtype: as `evaluate`.
        cut_means: compute the cut means first (False: `compute_cut_means` has run on this model as it is).
    Returns:
        dict with v01, v0 (m0 alone, m1 cut), v1 (m1 alone) and v_none.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if cut_means:
        compute_cut_means(model, train_loader, device, autocast_dtype)
    was_training = model.training
    model.eval()
    try:
        mean0, mean1 = _feature_means(model, train_loader, device, autocast_dtype)
        late = getattr(model, "is_late", False)
        predict = getattr(model, "predict", TwoBranchNet.predict)
        h0, h1 = _heads(model)
        if late:
            c0, c1 = model.partial_logits(mean0[None].to(device), mean1[None].to(device))  # (1, K) each
        else:
            c0, c1 = h0(mean0[None].to(device)), h1(mean1[None].to(device))  # the heads on the mean features
        counts = torch.zeros(4, dtype=torch.float64, device=device)
        n = 0
        for x0, x1, y in test_loader:
            x0, x1, y = to_device(x0, x1, y, device, model)
            with autocast(device, autocast_dtype):
                y0, y1 = model(x0, x1, FusionMode.FUSED)
                k0, k1 = model(x0, x1, FusionMode.CUT)  # cut branch outputs (late: z with the other cut)
            y0, y1, k0, k1 = y0.float(), y1.float(), k0.float(), k1.float()
            if late:  # k0 = z | e1 := mean e1 already
                alone0, alone1 = k0, k1
            else:
                alone0, alone1 = predict(k0, c1.float().expand_as(k0)), predict(c0.float().expand_as(k1), k1)
            none = predict(c0.float(), c1.float()).expand_as(y0)
            outs = (predict(y0, y1), alone0, alone1, none)
            counts += torch.stack([(o.argmax(1) == y).sum() for o in outs]).double()
            n += y.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("coalition_values got an empty test loader")
    v = (counts / n).tolist()
    return {"v01": v[0], "v0": v[1], "v1": v[2], "v_none": v[3]}


def shapley_contribution(model: nn.Module, train_loader: Iterable[Batch], test_loader: Iterable[Batch],
                         device: Optional[Union[str, torch.device]] = None,
                         autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """The Shapley contribution of each modality to the fused test accuracy, any fusion (SPEC Sec. 13).

    Returns:
        dict with shapley0, shapley1 and the coalition values v01, v0, v1, v_none (`coalition_values`).
    """
    v = coalition_values(model, train_loader, test_loader, device, autocast_dtype)
    return {**shapley_values(v["v01"], v["v0"], v["v1"], v["v_none"]), **v}


@torch.no_grad()
def modality_features(model: nn.Module, loader: Iterable[Batch], device: Optional[torch.device] = None,
                      autocast_dtype: Optional[torch.dtype] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each encoder's pooled features over a loader, eval mode, in cut mode: a late-fusion encoder sees its own
    modality only anyway; an MMTM branch then sees the other modality only through its D_train mean squeeze
    (call `compute_cut_means` first).

    Returns:
        (e0 (N, F0), e1 (N, F1), y (N,)) as float64 / int64 numpy arrays.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    f0, f1, ys = [], [], []
    try:
        for x0, x1, y in loader:
            x0, x1, _ = to_device(x0, x1, y, device, model)
            with autocast(device, autocast_dtype):
                e0, e1 = model(x0, x1, FusionMode.CUT, return_features=True)[2]
            f0.append(e0.double().cpu())
            f1.append(e1.double().cpu())
            ys.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(f0).numpy(), torch.cat(f1).numpy(), torch.cat(ys).numpy()


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int = 0,
              max_iter: int = PROBE_MAX_ITER) -> float:
    """Test accuracy of a multinomial logistic regression fitted on frozen features (standardised with the training
    features' mean and std; scikit-learn, lbfgs, fixed seed and iterations).

    Args:
        train_x (N, F), train_y (N,): D_train features and labels; test_x, test_y: the test set's.
        seed: the solver's random_state.
        max_iter: its iterations (a probe that has not converged by then is used as it is).
    Returns:
        The test accuracy.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mean, std = train_x.mean(0), train_x.std(0)
    std = np.where(std > 0, std, 1.0)  # a constant feature stays 0
    clf = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the fixed budget is the protocol
        clf.fit((train_x - mean) / std, train_y)
    return float((clf.predict((test_x - mean) / std) == test_y).mean())


def linear_probes(model: nn.Module, train_loader: Iterable[Batch], test_loader: Iterable[Batch],
                  device: Optional[Union[str, torch.device]] = None, autocast_dtype: Optional[torch.dtype] = None,
                  seed: int = 0, cut_means: bool = True) -> Dict[str, float]:
    """A linear probe per modality (SPEC Sec. 13): what each frozen encoder learned, whether or not the fused
    prediction uses it.

    Args:
        cut_means: compute the cut means first (False: `compute_cut_means` has run on this model as it is).
    Returns:
        dict with probe0, probe1: test accuracies of probes on e0 and on e1 fitted on D_train.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if cut_means:
        compute_cut_means(model, train_loader, device, autocast_dtype)
    tr0, tr1, try_ = modality_features(model, train_loader, device, autocast_dtype)
    te0, te1, tey = modality_features(model, test_loader, device, autocast_dtype)
    return {"probe0": fit_probe(tr0, try_, te0, tey, seed), "probe1": fit_probe(tr1, try_, te1, tey, seed)}


@torch.no_grad()
def input_std(loader: Iterable[Batch]) -> Tuple[float, float]:
    """The standard deviation of each modality's input over a loader (over all samples and elements)."""
    stats = torch.zeros(2, 3, dtype=torch.float64)  # per modality: count, sum, sum of squares
    for x0, x1, _ in loader:
        for k, x in enumerate((x0, x1)):
            x = x.double()
            stats[k] += torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), x.square().sum()])
    n, s, q = stats.unbind(1)
    return tuple(float(v) for v in ((q / n - (s / n).square()).clamp(min=0).sqrt()))  # type: ignore[return-value]


class _Noisy:
    """A loader whose modality `k` gets N(0, scale^2) noise, drawn on the CPU from a seeded generator per batch."""

    def __init__(self, loader: Iterable[Batch], k: int, scale: float, seed: int) -> None:
        self.loader, self.k, self.scale, self.seed = loader, k, scale, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for x0, x1, y in self.loader:
            xs = [x0, x1]
            x = xs[self.k].float()
            xs[self.k] = x + self.scale * torch.randn(x.shape, generator=g)
            yield xs[0], xs[1], y


def robustness_curves(model: nn.Module, train_loader: Iterable[Batch], test_loader: Iterable[Batch],
                      device: Optional[Union[str, torch.device]] = None, autocast_dtype: Optional[torch.dtype] = None,
                      sigmas: Sequence[float] = ROBUST_SIGMAS, seed: int = 0,
                      values: Optional[Mapping[str, float]] = None) -> Dict[str, list]:
    """Fused test accuracy as Gaussian noise of growing sigma (in units of the modality's input std over D_train) is
    added to one modality's input, and with that modality cut (SPEC Sec. 13); one curve per modality.

    Args:
        model: the trained two-branch model, any fusion.
        train_loader: D_train without augmentation (the input std, the cut means).
        test_loader: the test batches (in a fixed order: the noise is seeded per curve point).
        sigmas: the noise levels.
        seed: the noise's seed.
        values: the model's `coalition_values` if already measured (the cut points); measured when None.
    Returns:
        dict with robust_sigmas (the levels, then "cut"), robust0 and robust1 (the accuracies at each level, then
        with the modality cut: v({1}) for robust0, v({0}) for robust1).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stds = input_std(train_loader)
    v = values if values is not None else coalition_values(model, train_loader, test_loader, device, autocast_dtype)
    out: Dict[str, list] = {"robust_sigmas": [float(s) for s in sigmas] + ["cut"]}
    for k in (0, 1):
        curve = []
        for i, sigma in enumerate(sigmas):
            loader = test_loader if sigma == 0 else _Noisy(test_loader, k, sigma * stds[k], seed + 1000 * k + i)
            curve.append(evaluate(model, loader, device, FusionMode.FUSED, autocast_dtype)["acc"])
        out[f"robust{k}"] = curve + [v["v1"] if k == 0 else v["v0"]]
    return out


def modality_measures(model: nn.Module, train_loader: Iterable[Batch], test_loader: Iterable[Batch],
                      device: Optional[Union[str, torch.device]] = None, autocast_dtype: Optional[torch.dtype] = None,
                      seed: int = 0) -> Dict[str, Union[float, list]]:
    """Shapley contributions, linear probes and robustness curves in one call (a run's results record).

    Returns:
        The union of `shapley_contribution`, `linear_probes` and `robustness_curves`.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    compute_cut_means(model, train_loader, device, autocast_dtype)  # once for the three
    v = coalition_values(model, train_loader, test_loader, device, autocast_dtype, cut_means=False)
    out: Dict[str, Union[float, list]] = {**shapley_values(v["v01"], v["v0"], v["v1"], v["v_none"]), **v}
    out.update(linear_probes(model, train_loader, test_loader, device, autocast_dtype, seed, cut_means=False))
    out.update(robustness_curves(model, train_loader, test_loader, device, autocast_dtype, seed=seed, values=v))
    return out


NAN_MEASURES: Dict[str, Union[float, list]] = {
    "shapley0": math.nan, "shapley1": math.nan, "v01": math.nan, "v0": math.nan, "v1": math.nan,
    "v_none": math.nan, "probe0": math.nan, "probe1": math.nan}  # what a uni-modal run records
