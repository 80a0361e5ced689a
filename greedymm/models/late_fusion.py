"""Late-fusion two-encoder networks (SPEC Sec. 13, our extension): encoders E0, E1 whose pooled features meet only in
the classifier, `late_concat` (one linear layer on [e0; e1]) or `late_sum` (h0(e0) + h1(e1)); their four fusion modes
(the other modality's features replaced by a running or D_train mean) and CLS groups.
"""
from __future__ import annotations

from typing import Dict, List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .mmtm import FusionMode
from .two_branch import strip_final_linear

LATE_HEADS = ("late_concat", "late_sum")
Features = Tuple[torch.Tensor, torch.Tensor]  # the pooled features (e0 (B, F0), e1 (B, F1))


class LateFusionNet(nn.Module):
    """Two encoders and a late-fusion head (SPEC Sec. 13): e0 = E0(x0) (B, F0), e1 = E1(x1) (B, F1), and

    - `late_concat`: z = W [e0; e1] + b = W0 e0 + W1 e1 + b, one linear layer on [e0; e1] held as its blocks
      `head0` (W0), `head1` (W1) and `head_bias` (b); partial logits z0 = W0 e0 + b/2, z1 = W1 e1 + b/2 (as
      OGM-GE's official code splits it);
    - `late_sum`: z = h0(e0) + h1(e1), two nn.Linear heads (`head0`, `head1`); partial logits z0 = h0(e0),
      z1 = h1(e1).

    The forward returns the partial logits (z0, z1), so z = z0 + z1 (`predict`); one loss, CE(z, y) (`is_late`).
    Fusion modes: re-balance m0 replaces e1 by its running mean over regular (fused, training-mode) steps,
    re-balance m1 replaces e0; cut returns, per modality, the fused logits with the *other* modality's features
    replaced by their D_train mean (`compute_cut_means`): (z | e1 := mean e1, z | e0 := mean e0), the counterparts
    of MMTM's cut branches, which the CUR compares with z.

    Buffers: `feat_sum0` (F0), `feat_sum1` (F1) (float64) and `feat_count`: the running means; `cut_mean0`,
    `cut_mean1` and `has_cut_means`: the D_train means of the cut mode.

    Args:
        encoder0: x0 -> e0 (B, F0), e.g. a zoo branch without its final linear layer (`strip_final_linear`).
        encoder1: x1 -> e1 (B, F1).
        features: (F0, F1).
        num_classes: K.
        head: "late_concat" or "late_sum".
    """

    is_late = True

    def __init__(self, encoder0: nn.Module, encoder1: nn.Module, features: Tuple[int, int], num_classes: int,
                 head: str = "late_concat") -> None:
        super().__init__()
        if head not in LATE_HEADS:
            raise ValueError(f"head={head!r} is unknown; allowed: {', '.join(LATE_HEADS)}")
        f0, f1 = (int(f) for f in features)
        if min(f0, f1) < 1 or num_classes < 2:
            raise ValueError(f"LateFusionNet needs features >= 1 and num_classes >= 2, got features={tuple(features)}, "
                             f"num_classes={num_classes}")
        self.fusion = head
        self.features, self.num_classes = (f0, f1), int(num_classes)
        self.encoder0, self.encoder1 = encoder0, encoder1
        if head == "late_concat":
            # One linear layer on [e0; e1], held as its column blocks W0 (K, F0), W1 (K, F1) and the bias b (K,) so
            # that each block is a parameter of its own (the CLS groups, OGM-GE's split); initialised as
            # nn.Linear(F0 + F1, K) would be.
            full = nn.Linear(f0 + f1, num_classes)
            self.head0 = nn.Linear(f0, num_classes, bias=False)
            self.head1 = nn.Linear(f1, num_classes, bias=False)
            with torch.no_grad():
                self.head0.weight.copy_(full.weight[:, :f0])
                self.head1.weight.copy_(full.weight[:, f0:])
            self.head_bias = nn.Parameter(full.bias.detach().clone())
        else:
            self.head0 = nn.Linear(f0, num_classes)
            self.head1 = nn.Linear(f1, num_classes)
        self.register_buffer("feat_sum0", torch.zeros(f0, dtype=torch.float64))
        self.register_buffer("feat_sum1", torch.zeros(f1, dtype=torch.float64))
        self.register_buffer("feat_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("cut_mean0", torch.zeros(f0))
        self.register_buffer("cut_mean1", torch.zeros(f1))
        self.register_buffer("has_cut_means", torch.zeros((), dtype=torch.bool))
        # Host mirrors of feat_count > 0 and has_cut_means (no GPU synchronisation per forward pass).
        self._has_running_means = False
        self._has_cut_means = False
        self.register_load_state_dict_post_hook(_sync_host_flags)

    @classmethod
    def from_branches(cls, branch0: nn.Sequential, branch1: nn.Sequential, head: str = "late_concat"
                      ) -> "LateFusionNet":
        """A late-fusion net from two classifier branches (the zoo's, or a user's): each loses its final linear
        layer, whose in_features are F_k and out_features K, and a fresh head of kind `head` reads the features.

        Args:
            branch0, branch1: nn.Sequential of named stages, the last ending in nn.Linear(F_k, K).
            head: "late_concat" or "late_sum".
        Returns:
            The LateFusionNet (sharing the branches' modules).
        """
        enc0, lin0 = strip_final_linear(branch0)
        enc1, lin1 = strip_final_linear(branch1)
        if lin0.out_features != lin1.out_features:
            raise ValueError(f"the branches' final layers have {lin0.out_features} and {lin1.out_features} outputs; "
                             "both must give the K classes")
        return cls(enc0, enc1, (lin0.in_features, lin1.in_features), lin0.out_features, head)

    def extra_repr(self) -> str:
        return f"fusion={self.fusion}, features={self.features}, num_classes={self.num_classes}"

    # ------------------------------------------------------------------------------------------------ the contract
    def encoder(self, k: int) -> nn.Module:
        """Encoder k (x_k -> e_k)."""
        if k not in (0, 1):
            raise ValueError(f"encoder k={k!r} must be 0 (m0) or 1 (m1)")
        return self.encoder1 if k == 1 else self.encoder0

    def head(self, k: int) -> nn.Module:
        """The head that reads e_k: W_k (late_concat, no bias: b is shared) or h_k (late_sum)."""
        if k not in (0, 1):
            raise ValueError(f"head k={k!r} must be 0 (m0) or 1 (m1)")
        return self.head1 if k == 1 else self.head0

    @staticmethod
    def predict(y0_hat: torch.Tensor, y1_hat: torch.Tensor) -> torch.Tensor:
        """The fused prediction z = z0 + z1, (B, K)."""
        return y0_hat + y1_hat

    @property
    def has_running_scales(self) -> bool:
        """Whether a regular training step has filled the running feature means (the re-balancing modes need them)."""
        return self._has_running_means

    def running_means(self) -> Features:
        """(mean e0 (F0,), mean e1 (F1,)) over the samples of all regular training steps so far (float64)."""
        if not self._has_running_means:
            raise RuntimeError("the late-fusion running feature means are empty: re-balancing needs at least one "
                               "regular training step first (the guided and random schedules start after warm-up)")
        return self.feat_sum0 / self.feat_count, self.feat_sum1 / self.feat_count

    def set_cut_means(self, mean0: torch.Tensor, mean1: torch.Tensor) -> None:
        """Store the D_train means of e0 (F0,) and e1 (F1,) used by the cut mode."""
        self.cut_mean0.copy_(mean0)
        self.cut_mean1.copy_(mean1)
        self.has_cut_means.fill_(True)
        self._has_cut_means = True

    def cls_groups(self) -> Dict[str, List[nn.Parameter]]:
        """The CLS groups (SPEC Sec. 13): theta_m0 = E0, theta_m1 = E1; theta'_m0 = the head parameters that read m1
        (W1, or h1's weight and bias), theta'_m1 = those that read m0 (W0, or h0); late_concat's shared bias b is in
        no group.

        Returns:
            dict with "m0", "m1", "m0_prime", "m1_prime".
        """
        return {"m0": list(self.encoder0.parameters()), "m1": list(self.encoder1.parameters()),
                "m0_prime": list(self.head1.parameters()), "m1_prime": list(self.head0.parameters())}

    # ---------------------------------------------------------------------------------------------- forward
    def partial_logits(self, e0: torch.Tensor, e1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(z0, z1), each (B, K), from features e0 (B, F0) and e1 (B, F1); z = z0 + z1."""
        if self.fusion == "late_sum":
            return self.head0(e0), self.head1(e1)
        half = self.head_bias / 2  # (K,)
        return F.linear(e0, self.head0.weight, half), F.linear(e1, self.head1.weight, half)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, mode: Union[str, FusionMode] = FusionMode.FUSED,
                return_features: bool = False
                ) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, Features]]:
        """Encode both modalities and fuse them in mode `mode`.

        Args:
            x0: m0 input, e.g. (B, C_in, H, W).
            x1: m1 input, of its own shape.
            mode: fused, rebalance_m0 (e1 := its running mean), rebalance_m1 (e0 := its running mean) or cut.
            return_features: also return the encoders' features (e0, e1) (never the replaced ones).
        Returns:
            (y0_hat, y1_hat), (B, K) each: the partial logits (z0, z1); in cut mode (z | e1 := mean e1,
            z | e0 := mean e0). With return_features, also (e0 (B, F0), e1 (B, F1)).
        """
        mode = FusionMode.parse(mode)
        e0, e1 = self.encoder0(x0), self.encoder1(x1)
        for k, e in enumerate((e0, e1)):
            if e.dim() != 2 or e.shape[1] != self.features[k]:
                raise ValueError(f"encoder{k} gave features of shape {tuple(e.shape)}; expected (batch, "
                                 f"{self.features[k]}): pooled, flattened features")
        if mode is FusionMode.CUT:
            if not self._has_cut_means:
                raise RuntimeError("cut mode needs the feature means over D_train: call "
                                   "greedymm.measures.cur.compute_cut_means(model, train_loader) first")
            z0, z1 = self.partial_logits(e0, e1)  # (B, K) each
            c0, c1 = self.partial_logits(self.cut_mean0.to(e0.dtype)[None], self.cut_mean1.to(e1.dtype)[None])  # (1, K)
            out = (z0 + c1, c0 + z1)  # the fused logits with m1 cut, with m0 cut
        else:
            u0, u1 = e0, e1
            if mode is FusionMode.FUSED and self.training:
                # Sample-weighted means over regular training steps only, as MMTM's a-bar, b-bar (SPEC Sec. 3, 13).
                with torch.no_grad():
                    self.feat_sum0 += e0.detach().sum(0, dtype=torch.float64)
                    self.feat_sum1 += e1.detach().sum(0, dtype=torch.float64)
                    self.feat_count += e0.shape[0]
                self._has_running_means = True
            elif mode is FusionMode.REBALANCE_M0:  # E0 learns with no per-sample information from m1
                u1 = self.running_means()[1].to(e1.dtype).expand_as(e1)
            elif mode is FusionMode.REBALANCE_M1:
                u0 = self.running_means()[0].to(e0.dtype).expand_as(e0)
            out = self.partial_logits(u0, u1)
        if return_features:
            return out[0], out[1], (e0, e1)
        return out


def _sync_host_flags(module: LateFusionNet, incompatible_keys) -> None:
    """After load_state_dict: refresh the host mirrors of the loaded buffers (one sync, at load time)."""
    module._has_running_means = bool(module.feat_count > 0)
    module._has_cut_means = bool(module.has_cut_means)
