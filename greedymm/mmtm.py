"""The Multi-Modal Transfer Module (MMTM) and its four fusion modes (paper Sec. 3.1 and 4.1;
SPEC Sec. 2-3): fused, re-balance m0, re-balance m1 and cut.
"""
from __future__ import annotations

from enum import Enum
from typing import Tuple, Union

import torch
from torch import nn


class FusionMode(str, Enum):
    """How every MMTM of a forward pass computes its channel scales (SPEC Sec. 3)."""

    FUSED = "fused"  # regular steps and evaluation
    REBALANCE_M0 = "rebalance_m0"  # branch 0 gets the running-mean scale: accelerates learning from m0
    REBALANCE_M1 = "rebalance_m1"  # branch 1 gets the running-mean scale: accelerates learning from m1
    CUT = "cut"  # the other modality's squeeze is replaced by its mean: conditional utilization rate

    @classmethod
    def parse(cls, mode: Union[str, "FusionMode"]) -> "FusionMode":
        """Turn a string into a FusionMode with a clear error for unknown names."""
        try:
            return cls(mode)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"fusion mode {mode!r} is unknown; allowed: {allowed}") from None


class MMTM(nn.Module):
    """Fuses two feature maps A (branch 0) and B (branch 1) of `channels` channels each.

    S = [pool(A); pool(B)], Z = ReLU(W_s S + b_s), A' = A * sigmoid(W_A Z + b_A), B' = B * sigmoid(W_B Z + b_B).
    `fc_squeeze` (W_s) is shared by both modalities, `fc_a` (W_A) only shapes branch 0, `fc_b` (W_B) branch 1.

    Buffers: `scale_sum_a/b` and `scale_count` give the running means a-bar, b-bar of the scales over all
    samples of regular training steps; `squeeze_mean_a/b` are the means of the squeeze vectors over D_train
    used by the cut mode (set by `greedymm.utilization.compute_squeeze_means`).

    Args:
        channels: channel count C of both feature maps.
        ratio: the authors' bottleneck ratio; W_s maps 2C to 2 * 2C / ratio (= C for ratio 4).
    """

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        if channels < 1 or ratio < 1:
            raise ValueError(f"MMTM needs channels >= 1 and ratio >= 1, got channels={channels}, ratio={ratio}")
        hidden = max(1, 2 * (2 * channels) // ratio)
        self.channels = channels
        self.fc_squeeze = nn.Linear(2 * channels, hidden)
        self.fc_a = nn.Linear(hidden, channels)
        self.fc_b = nn.Linear(hidden, channels)
        # float64: a cumulative sum over hundreds of thousands of samples must not lose the small terms.
        self.register_buffer("scale_sum_a", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("scale_sum_b", torch.zeros(channels, dtype=torch.float64))
        self.register_buffer("scale_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("squeeze_mean_a", torch.zeros(channels))
        self.register_buffer("squeeze_mean_b", torch.zeros(channels))
        self.register_buffer("has_squeeze_means", torch.zeros((), dtype=torch.bool))
        # Set by compute_squeeze_means: while not None, forward adds the squeeze vectors here.
        self.squeeze_stats: Union[None, list] = None
        # Host mirrors of scale_count > 0 and has_squeeze_means: checking the buffers themselves would
        # synchronise with a GPU in every forward pass.
        self._has_running_scales = False
        self._has_squeeze_means = False
        self.register_load_state_dict_post_hook(_sync_host_flags)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def set_squeeze_means(self, mean_a: torch.Tensor, mean_b: torch.Tensor) -> None:
        """Store the mean squeeze vectors over D_train (C,) each, used by the cut mode."""
        self.squeeze_mean_a.copy_(mean_a)
        self.squeeze_mean_b.copy_(mean_b)
        self.has_squeeze_means.fill_(True)
        self._has_squeeze_means = True

    def running_scales(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (a-bar, b-bar): per-channel means of sigmoid(E_A), sigmoid(E_B) over regular steps, (C,) each."""
        if not self._has_running_scales:
            raise RuntimeError("MMTM running means are empty: re-balancing needs at least one regular "
                               "training step first (the guided and random schedules start after warm-up)")
        return self.scale_sum_a / self.scale_count, self.scale_sum_b / self.scale_count

    def forward(self, a: torch.Tensor, b: torch.Tensor,
                mode: Union[str, FusionMode] = FusionMode.FUSED) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rescale A and B channel-wise.

        Args:
            a: branch-0 features (B, C, H, W) (any number of trailing spatial dims).
            b: branch-1 features (B, C, H', W').
            mode: a FusionMode or its string value.
        Returns:
            (A', B') with the shapes of A and B.
        """
        mode = FusionMode.parse(mode)
        s_a = a.flatten(2).mean(-1)  # (B, C)
        s_b = b.flatten(2).mean(-1)  # (B, C)
        if self.squeeze_stats is not None:
            self.squeeze_stats[0] += s_a.detach().float().sum(0)
            self.squeeze_stats[1] += s_b.detach().float().sum(0)
            self.squeeze_stats[2] += s_a.shape[0]

        if mode is FusionMode.CUT:
            if not self._has_squeeze_means:
                raise RuntimeError("cut mode needs the squeeze means over D_train: call "
                                   "greedymm.utilization.compute_squeeze_means(model, train_loader) first")
            mean_a = self.squeeze_mean_a.to(s_a.dtype).expand_as(s_a)  # (B, C)
            mean_b = self.squeeze_mean_b.to(s_b.dtype).expand_as(s_b)  # (B, C)
            # Branch 0 sees m1 only through its mean squeeze, branch 1 sees m0 only through its mean.
            scale_a = torch.sigmoid(self.fc_a(self._excite(s_a, mean_b)))
            scale_b = torch.sigmoid(self.fc_b(self._excite(mean_a, s_b)))
        else:
            z = self._excite(s_a, s_b)  # (B, hidden)
            scale_a = torch.sigmoid(self.fc_a(z))  # (B, C)
            scale_b = torch.sigmoid(self.fc_b(z))  # (B, C)
            if mode is FusionMode.FUSED and self.training:
                # a-bar and b-bar: sample-weighted means over regular training steps only (SPEC Sec. 3;
                # the authors' code also counted eval/re-balancing passes and fed b-bar from sigmoid(E_A)).
                with torch.no_grad():
                    self.scale_sum_a += scale_a.detach().sum(0, dtype=torch.float64)
                    self.scale_sum_b += scale_b.detach().sum(0, dtype=torch.float64)
                    self.scale_count += scale_a.shape[0]
                self._has_running_scales = True
            elif mode is FusionMode.REBALANCE_M0:
                scale_a = self.running_scales()[0].to(scale_a.dtype).expand_as(scale_a)
            elif mode is FusionMode.REBALANCE_M1:
                scale_b = self.running_scales()[1].to(scale_b.dtype).expand_as(scale_b)
        return a * _as_map(scale_a, a), b * _as_map(scale_b, b)

    def _excite(self, s_a: torch.Tensor, s_b: torch.Tensor) -> torch.Tensor:
        """Z = ReLU(W_s [S_A; S_B] + b_s): (B, C) x2 -> (B, hidden)."""
        return torch.relu(self.fc_squeeze(torch.cat([s_a, s_b], dim=1)))


def _sync_host_flags(module: MMTM, incompatible_keys) -> None:
    """After load_state_dict: refresh the host mirrors of the loaded buffers (one sync, at load time)."""
    module._has_running_scales = bool(module.scale_count > 0)
    module._has_squeeze_means = bool(module.has_squeeze_means)


def _as_map(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C, 1, ..., 1) broadcastable against x."""
    return scale.reshape(scale.shape + (1,) * (x.dim() - 2)).to(x.dtype)
