"""Balancers from the related work (SPEC Sec. 12), our adaptations to the two-branch MMTM network: OGM-GE (Peng et al.,
CVPR 2022, on-the-fly gradient modulation with generalization enhancement) and Gradient Blending (Wang et al., CVPR
2020). Both plug into the trainer as `greedymm.balance.Algorithm`s, so the CLS, CUR and d_util measure them as the rest.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .balance import Algorithm, Outputs
from .mmtm import FusionMode
from .model import TwoBranchNet, final_linear


# ------------------------------------------------------------------------------------------------------------ OGM-GE
def ogm_coefficients(y0_hat: torch.Tensor, y1_hat: torch.Tensor, y: torch.Tensor,
                     alpha: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OGM's discrepancy ratio and modulation coefficients of one batch (their Eq. 10 and code), as 0-d tensors.

    s_k = sum_i softmax(yk_hat_i)[y_i]; rho = s_0 / s_1. If rho > 1 branch 0 dominates: k_0 = 1 - tanh(alpha * rho),
    k_1 = 1; otherwise (rho = 1 included, as in their code) k_1 = 1 - tanh(alpha / rho), k_0 = 1. When both scores
    underflow to 0 (rho = 0/0) neither branch is modulated. No host synchronisation: torch.where, no Python branch.

    Args:
        y0_hat: (B, K) logits of branch 0.
        y1_hat: (B, K) logits of branch 1.
        y: (B,) labels.
        alpha: the modulation strength (>= 0).
    Returns:
        (rho, k_0, k_1), float32 0-d tensors on the logits' device.
    """
    index = y[:, None]  # (B, 1)
    s0 = F.softmax(y0_hat.detach().float(), dim=1).gather(1, index).sum()  # sum_i p_0(y_i | x_i)
    s1 = F.softmax(y1_hat.detach().float(), dim=1).gather(1, index).sum()
    rho = s0 / s1
    one = torch.ones_like(rho)
    branch0_dominates = rho > 1
    k0 = torch.where(branch0_dominates, 1 - torch.tanh(alpha * rho), one)
    k1 = torch.where(branch0_dominates, one, 1 - torch.tanh(alpha / rho))
    k1 = torch.where(torch.isnan(rho), one, k1)  # 0/0: no information on which branch leads
    return rho, k0, k1


def encoder_weights(branch: nn.Module) -> List[nn.Parameter]:
    """The weights OGM-GE modulates in a branch: those of its convolutions (the 4-D gradients of their code; not the
    convolutions' biases, the norms, the linear head). A branch without convolutions (an MLP on vectors) gives the
    weights of its linear layers but the final one (`greedymm.model.final_linear`, the head).

    Args:
        branch: an nn.Sequential of named stages (e.g. `TwoBranchNet.branch0`).
    Returns:
        The parameters, in module order; empty if the branch has neither.
    """
    convs = [m.weight for m in branch.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if convs:
        return convs
    linears = [m for m in branch.modules() if isinstance(m, nn.Linear)]
    head = final_linear(branch) if linears else None
    return [m.weight for m in linears if m is not head]


class OGMGE(Algorithm):
    """OGM-GE (Peng et al., CVPR 2022) adapted to the two-branch MMTM network (SPEC Sec. 12).

    Every step is a regular (fused) step with the paper's loss CE(y0_hat) + CE(y1_hat). After the backward pass and
    the CLS, before the optimizer step, inside the modulation window: the convolution-weight gradients of the
    dominant branch are multiplied by its k (`ogm_coefficients`); GE then adds Gaussian noise N(0, std(g)) to each
    convolution-weight gradient g of both branches, std(g) being measured on the gradient before modulation, as in
    their code. Outside the window nothing is modulated and no noise is added (their code does the same); rho is
    still logged, with k_0 = k_1 = 1 (the coefficients applied). The CLS's mu is computed by the trainer before this
    hook, so it measures the gradients before modulation and noise.

    Our adaptation: their late-fusion models give each modality a logit share of the fusion layer; here y_k_hat is
    branch k's own head, which also sees the other modality through the MMTMs. Batch norms, the linear heads and the
    MMTMs are never modulated. A branch without convolutions (an MLP on vectors) has its linear layers but the head
    modulated instead (`encoder_weights`).

    The noise comes from a torch.Generator on the parameters' device, owned by this algorithm and saved in its
    state_dict, so a resumed run draws the same noise as an uninterrupted one.

    Args:
        alpha: modulation strength (>= 0).
        start_epoch: epochs trained before the modulation starts.
        end_epoch: the modulation stops after this many epochs; None: never.
        noise: add the GE noise (False: OGM alone).
        seed: seed of the noise generator.
    """

    name = "ogm_ge"

    def __init__(self, alpha: float = 0.1, start_epoch: int = 0, end_epoch: Optional[int] = None,
                 noise: bool = True, seed: int = 0) -> None:
        super().__init__()
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha={alpha} must be a finite number >= 0")
        if start_epoch < 0 or (end_epoch is not None and end_epoch <= start_epoch):
            raise ValueError(f"the modulation window start_epoch={start_epoch}, end_epoch={end_epoch} must have "
                             "0 <= start_epoch < end_epoch (or end_epoch None for no end)")
        # not self.end_epoch: that name is the Algorithm's end-of-epoch hook
        self.alpha, self.window = float(alpha), (int(start_epoch), end_epoch)
        self.noise, self.seed = bool(noise), int(seed)
        self.modulated: Tuple[List[nn.Parameter], List[nn.Parameter]] = ([], [])
        self.generator: Optional[torch.Generator] = None
        self.draws = 0  # noise draws so far: re-seeds the generator if a run resumes on another kind of device
        self._epoch = 0  # epoch of the current step, from next_mode

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        branches = [getattr(model, name, None) for name in ("branch0", "branch1")]
        if any(b is None for b in branches):
            raise TypeError(f"algorithm {self.name!r} modulates the branches `branch0` and `branch1` of a "
                            f"TwoBranchNet; {type(model).__name__} has no such attributes")
        self.modulated = (encoder_weights(branches[0]), encoder_weights(branches[1]))
        for k, params in enumerate(self.modulated):
            if not params:
                raise ValueError(f"algorithm {self.name!r} modulates the convolution weights of each branch (or, "
                                 f"without convolutions, its linear layers but the head), and branch{k} has neither")
        self.generator = torch.Generator(device=self.modulated[0][0].device).manual_seed(self._stream_seed(0))
        return None

    def _stream_seed(self, draws: int) -> int:
        # Not `seed` itself: the global generator, seeded with it, draws the initial weights and the data order, and
        # the noise should not replay those numbers.
        return self.seed * 1_000_003 + 977 + draws

    def active(self, epoch: int) -> bool:
        """Whether the modulation (and the GE noise) applies in this 0-based epoch."""
        start, end = self.window
        return epoch >= start and (end is None or epoch < end)

    def next_mode(self, epoch: int) -> FusionMode:
        self._epoch = epoch
        return super().next_mode(epoch)

    @torch.no_grad()
    def after_backward(self, model: nn.Module, out: Outputs, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Modulate the dominant branch's convolution-weight gradients and add the GE noise (inside the window).

        Returns:
            {"rho": rho, "k0": k_0, "k1": k_1}: the ratio and the coefficients applied (1 outside the window).
        """
        rho, k0, k1 = ogm_coefficients(out["y0"], out["y1"], y, self.alpha)
        if not self.active(self._epoch):
            one = torch.ones_like(rho)
            return {"rho": rho, "k0": one, "k1": one}
        grads0 = [p.grad for p in self.modulated[0] if p.grad is not None]
        grads1 = [p.grad for p in self.modulated[1] if p.grad is not None]
        grads = grads0 + grads1
        if self.noise and grads:
            stds = [g.std() for g in grads]  # of the gradients before modulation, as their code
        # The non-dominant branch is multiplied by exactly 1: its gradients stay bit-identical.
        if grads0:
            torch._foreach_mul_(grads0, k0.to(grads0[0].dtype))
        if grads1:
            torch._foreach_mul_(grads1, k1.to(grads1[0].dtype))
        if self.noise and grads:
            sizes = [g.numel() for g in grads]
            flat = torch.randn(sum(sizes), generator=self.generator, device=grads[0].device, dtype=grads[0].dtype)
            noise = [n.view(g.shape) for n, g in zip(flat.split(sizes), grads)]  # one draw for all gradients
            torch._foreach_addcmul_(grads, noise, stds)  # g <- k g + std(g) * N(0, 1)
            self.draws += 1
        return {"rho": rho, "k0": k0, "k1": k1}

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.generator is not None:
            state.update(generator=self.generator.get_state(), generator_device=self.generator.device.type)
        state["draws"] = self.draws
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.draws = int(state["draws"])
        if self.generator is None or "generator" not in state:
            return
        if state["generator_device"] == self.generator.device.type:
            self.generator.set_state(state["generator"])
        else:  # CPU and CUDA generators have different states: continue with a fresh, still seeded, stream
            self.generator.manual_seed(self._stream_seed(self.draws))


# -------------------------------------------------------------------------------------------------- Gradient Blending
BLEND_HEADS = ("0", "1", "fused")  # y0_hat, y1_hat and the fused (y0_hat + y1_hat) / 2


def head_losses(record: dict) -> Tuple[List[float], List[float]]:
    """G and O of the three heads at the end of an epoch, from its record.

    G = validation loss, O = validation loss - training loss, for y0_hat (val_loss0, train_loss0), y1_hat and the
    fused head (val_loss_fused, train_loss_fused). The training loss is the epoch's running mean over its batches
    (the trainer's train_<term>), not a separate pass over D_train.

    Args:
        record: an epoch record with val_loss0/1/_fused and train_loss0/1/_fused.
    Returns:
        (G, O), three values each in BLEND_HEADS order.
    """
    terms = ("loss0", "loss1", "loss_fused")  # in BLEND_HEADS order
    missing = [f"{split}_{t}" for split in ("val", "train") for t in terms if f"{split}_{t}" not in record]
    if missing:
        raise ValueError(f"Gradient Blending estimates its weights on the validation split, and the epoch record lacks "
                         f"{missing}: train gblend with a val_loader")
    g = [float(record[f"val_{t}"]) for t in terms]
    return g, [gv - float(record[f"train_{t}"]) for gv, t in zip(g, terms)]


def blend_weights(g_start: Sequence[float], o_start: Sequence[float], g_end: Sequence[float],
                  o_end: Sequence[float]) -> List[float]:
    """Gradient Blending's weights from one window N -> N + n (Wang et al. 2020, their OGR-based estimate).

    Per head: dG = G(N) - G(N+n), dO = O(N+n) - O(N), raw = max(dG / dO^2, 0); the weights are raw / sum(raw).
    Cases: dO = 0 with dG > 0 is the limit dG / dO^2 = +inf, a head that generalised without overfitting: such heads
    share the weight equally, the others get 0; dO = 0 with dG <= 0 gives 0; a non-finite dG or dO gives 0; when every
    raw is 0 (no head generalised better), the weights are equal.

    Args:
        g_start, o_start: G and O of each head at the window's start (epoch N).
        g_end, o_end: the same at its end (epoch N + n).
    Returns:
        One weight per head, >= 0, summing to 1.
    """
    if not len(g_start) == len(o_start) == len(g_end) == len(o_end) >= 1:
        raise ValueError("blend_weights needs G and O of the same heads at the window's start and end")
    raw = []
    for gs, os_, ge, oe in zip(g_start, o_start, g_end, o_end):
        d_g, d_o = gs - ge, oe - os_
        if not (math.isfinite(d_g) and math.isfinite(d_o)):
            raw.append(0.0)
        elif d_o == 0:
            raw.append(math.inf if d_g > 0 else 0.0)
        else:
            raw.append(max(d_g / d_o ** 2, 0.0))  # may overflow to inf for a tiny dO: the limit case below
    n = len(raw)
    if any(math.isinf(r) for r in raw):
        best = [r for r in raw if math.isinf(r)]
        return [1.0 / len(best) if math.isinf(r) else 0.0 for r in raw]
    total = sum(raw)
    if total == 0:
        return [1.0 / n] * n
    return [r / total for r in raw]


class GradientBlending(Algorithm):
    """Gradient Blending (Wang et al., CVPR 2020) on the two-branch MMTM network (SPEC Sec. 12).

    Three heads, y0_hat, y1_hat and the fused (y0_hat + y1_hat) / 2, and the loss sum_h w_h CE(head_h, y). The
    weights start equal (1/3); the first window starts at the end of epoch 1 (the first time both a validation and a
    training loss exist), and at the end of epochs 1 + n, 1 + 2n, ... they are re-estimated from the last window by
    `blend_weights`. The held-out data is the validation split, which thereby also shapes the model that it then
    picks as the best checkpoint. Every step is a regular (fused) step.

    Our adaptation: their heads are separate classifiers on each modality's features and on the late-fused features;
    here y_k_hat is branch k's own head (which sees the other modality through the MMTMs), and the fused head is the
    model's prediction. With weights summing to 1 the gradients are smaller than the paper's loss CE(y0_hat) +
    CE(y1_hat) (half of them with equal weights), as in their formulation.

    Logged: w0, w1, w_fused every step (the weights of that step) and every epoch (those it trained with, and
    next_w0, next_w1, next_w_fused for the next epoch); loss0, loss1, loss_fused are the unweighted CE of each head.

    Args:
        period: n, epochs between re-estimations (>= 1).
    """

    name = "gblend"

    def __init__(self, period: int = 3) -> None:
        super().__init__()
        if period < 1:
            raise ValueError(f"period={period} must be at least 1 (epochs between re-estimations)")
        self.period = int(period)
        self.weights = self._as_float32([1 / 3] * 3)  # w0, w1, w_fused
        self.anchor: Optional[dict] = None  # {"epoch", "G", "O"} at the start of the current window
        self._w = torch.tensor(self.weights)  # (3,) on the model's device after setup

    @staticmethod
    def _as_float32(weights: Sequence[float]) -> List[float]:
        # The loss uses float32 weights: keep exactly those values, so the step and epoch logs agree.
        return torch.tensor(weights, dtype=torch.float32).tolist()

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self._w = torch.tensor(self.weights, dtype=torch.float32, device=next(model.parameters()).device)
        return None

    def _set_weights(self, weights: Sequence[float]) -> None:
        self.weights = self._as_float32(weights)
        self._w = torch.tensor(self.weights, dtype=torch.float32, device=self._w.device)  # once per re-estimation

    def loss(self, out: Outputs, y: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """sum_h w_h CE(head_h, y) over y0_hat, y1_hat and the fused head.

        Returns:
            (loss, {"loss0", "loss1", "loss_fused"}: the unweighted CE of each head).
        """
        y0_hat, y1_hat = out["y0"].float(), out["y1"].float()
        losses = torch.stack([F.cross_entropy(y0_hat, y), F.cross_entropy(y1_hat, y),
                              F.cross_entropy(TwoBranchNet.predict(y0_hat, y1_hat), y)])  # (3,)
        return (self._w * losses).sum(), {"loss0": losses[0], "loss1": losses[1], "loss_fused": losses[2]}

    def after_backward(self, model: nn.Module, out: Outputs, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {f"w{h}" if h != "fused" else "w_fused": self._w[i] for i, h in enumerate(BLEND_HEADS)}

    def end_epoch(self, record: dict) -> dict:
        """Record G and O of the heads; at the end of epochs 1 + n, 1 + 2n, ... re-estimate the weights.

        Returns:
            w0, w1, w_fused (the weights this epoch trained with) and next_w0, next_w1, next_w_fused.
        """
        used = list(self.weights)
        epoch = int(record["epoch"])  # 1-based: the epoch just completed
        g, o = head_losses(record)
        if (epoch - 1) % self.period == 0:  # a window boundary: epochs 1, 1 + n, 1 + 2n, ...
            if self.anchor is not None:
                self._set_weights(blend_weights(self.anchor["G"], self.anchor["O"], g, o))
            self.anchor = {"epoch": epoch, "G": g, "O": o}
        names = ["w0", "w1", "w_fused"]
        return {**dict(zip(names, used)), **{f"next_{k}": w for k, w in zip(names, self.weights)}}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "weights": list(self.weights), "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._set_weights(state["weights"])
        self.anchor = state["anchor"]
