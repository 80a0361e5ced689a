"""The Multi-Modal Transfer Module (MMTM; Joze et al. 2020, paper Sec. 3.1 and 4.1; SPEC Sec. 2-3) and its four
fusion modes (fused, re-balance m0, re-balance m1, cut), and the squeeze-and-excitation block of the uni-modal
baseline (SPEC Sec. 9). Both take features of any shape: (B, C), (B, C, T), (B, C, H, W) or (B, C, D, H, W).
"""
from __future__ import annotations

from enum import Enum
from typing import Optional, Tuple, Union

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


def mmtm_hidden(channels_a: int, channels_b: int, ratio: int = 4) -> int:
    """The MMTM bottleneck width, as in the authors' code: int(2 * (C_A + C_B) / ratio) (= C when C_A = C_B = C
    and ratio = 4), at least 1."""
    return max(1, int(2 * (channels_a + channels_b) / ratio))


class MMTM(nn.Module):
    """Fuses the features A of branch 0 (C_A channels) and B of branch 1 (C_B channels).

    S_A = pool(A), S_B = pool(B) (the mean over whatever spatial dimensions there are; none for vectors),
    Z = ReLU(W_s [S_A; S_B] + b_s), A' = A * sigmoid(W_A Z + b_A), B' = B * sigmoid(W_B Z + b_B).
    `fc_squeeze` (W_s: C_A + C_B -> hidden) is shared by both modalities, `fc_a` (W_A: hidden -> C_A) only shapes
    branch 0, `fc_b` (W_B: hidden -> C_B) branch 1. A and B may have different ranks, e.g. (B, C_A) and
    (B, C_B, H, W).

    Buffers: `scale_sum_a` (C_A), `scale_sum_b` (C_B) and `scale_count` give the running means a-bar, b-bar of the
    scales over all samples of regular training steps; `squeeze_mean_a` (C_A) / `squeeze_mean_b` (C_B) are the
    means of the squeeze vectors over D_train used by the cut mode (set by
    `greedymm.measures.cur.compute_squeeze_means`).

    Args:
        channels_a: C_A, channels of branch 0's features.
        channels_b: C_B, channels of branch 1's features; C_A if None.
        ratio: the authors' bottleneck ratio: hidden = int(2 * (C_A + C_B) / ratio) (see `mmtm_hidden`).
    """

    def __init__(self, channels_a: int, channels_b: Optional[int] = None, ratio: int = 4) -> None:
        super().__init__()
        channels_b = channels_a if channels_b is None else channels_b
        if channels_a < 1 or channels_b < 1 or ratio < 1:
            raise ValueError(f"MMTM needs channels_a, channels_b >= 1 and ratio >= 1, got channels_a={channels_a}, "
                             f"channels_b={channels_b}, ratio={ratio}")
        self.channels_a, self.channels_b = int(channels_a), int(channels_b)
        self.hidden = mmtm_hidden(self.channels_a, self.channels_b, ratio)
        self.fc_squeeze = nn.Linear(self.channels_a + self.channels_b, self.hidden)
        self.fc_a = nn.Linear(self.hidden, self.channels_a)
        self.fc_b = nn.Linear(self.hidden, self.channels_b)
        # float64: a cumulative sum over hundreds of thousands of samples must not lose the small terms.
        self.register_buffer("scale_sum_a", torch.zeros(self.channels_a, dtype=torch.float64))
        self.register_buffer("scale_sum_b", torch.zeros(self.channels_b, dtype=torch.float64))
        self.register_buffer("scale_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("squeeze_mean_a", torch.zeros(self.channels_a))
        self.register_buffer("squeeze_mean_b", torch.zeros(self.channels_b))
        self.register_buffer("has_squeeze_means", torch.zeros((), dtype=torch.bool))
        # Set by compute_squeeze_means: while not None, forward adds the squeeze vectors here.
        self.squeeze_stats: Union[None, list] = None
        # Set by greedymm.measures.cur.fusion_spread: while not None, forward in fused mode adds the scales' per-channel
        # sums and sums of squares here (float64), for their spread over a data set.
        self.scale_stats: Union[None, list] = None
        # Host mirrors of scale_count > 0 and has_squeeze_means: checking the buffers themselves would
        # synchronise with a GPU in every forward pass.
        self._has_running_scales = False
        self._has_squeeze_means = False
        self.register_load_state_dict_post_hook(_sync_host_flags)

    def extra_repr(self) -> str:
        return f"channels_a={self.channels_a}, channels_b={self.channels_b}, hidden={self.hidden}"

    def set_squeeze_means(self, mean_a: torch.Tensor, mean_b: torch.Tensor) -> None:
        """Store the mean squeeze vectors over D_train, (C_A,) and (C_B,), used by the cut mode."""
        self.squeeze_mean_a.copy_(mean_a)
        self.squeeze_mean_b.copy_(mean_b)
        self.has_squeeze_means.fill_(True)
        self._has_squeeze_means = True

    @property
    def has_running_scales(self) -> bool:
        """Whether a regular training step has filled the running means a-bar, b-bar (no host synchronisation)."""
        return self._has_running_scales

    def running_scales(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return (a-bar (C_A,), b-bar (C_B,)): per-channel means of sigmoid(E_A), sigmoid(E_B) over regular steps."""
        if not self._has_running_scales:
            raise RuntimeError("MMTM running means are empty: re-balancing needs at least one regular "
                               "training step first (the guided and random schedules start after warm-up)")
        return self.scale_sum_a / self.scale_count, self.scale_sum_b / self.scale_count

    def forward(self, a: torch.Tensor, b: torch.Tensor,
                mode: Union[str, FusionMode] = FusionMode.FUSED) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rescale A and B channel-wise.

        Args:
            a: branch-0 features (B, C_A, *spatial): a vector, sequence, image or volume per sample.
            b: branch-1 features (B, C_B, *spatial'), any rank of its own.
            mode: a FusionMode or its string value.
        Returns:
            (A', B') with the shapes of A and B.
        """
        mode = FusionMode.parse(mode)
        s_a = _squeeze(a, self.channels_a, "a (branch 0)")  # (B, C_A)
        s_b = _squeeze(b, self.channels_b, "b (branch 1)")  # (B, C_B)
        if s_a.shape[0] != s_b.shape[0]:
            raise ValueError(f"MMTM got batches of {s_a.shape[0]} and {s_b.shape[0]} samples; both branches must "
                             "see the same batch")
        if self.squeeze_stats is not None:
            self.squeeze_stats[0] += s_a.detach().float().sum(0)
            self.squeeze_stats[1] += s_b.detach().float().sum(0)
            self.squeeze_stats[2] += s_a.shape[0]

        if mode is FusionMode.CUT:
            if not self._has_squeeze_means:
                raise RuntimeError("cut mode needs the squeeze means over D_train: call "
                                   "greedymm.measures.cur.compute_squeeze_means(model, train_loader) first")
            mean_a = self.squeeze_mean_a.to(s_a.dtype).expand_as(s_a)  # (B, C_A)
            mean_b = self.squeeze_mean_b.to(s_b.dtype).expand_as(s_b)  # (B, C_B)
            # Branch 0 sees m1 only through its mean squeeze, branch 1 sees m0 only through its mean.
            scale_a = torch.sigmoid(self.fc_a(self._excite(s_a, mean_b)))  # (B, C_A)
            scale_b = torch.sigmoid(self.fc_b(self._excite(mean_a, s_b)))  # (B, C_B)
        else:
            z = self._excite(s_a, s_b)  # (B, hidden)
            scale_a = torch.sigmoid(self.fc_a(z))  # (B, C_A)
            scale_b = torch.sigmoid(self.fc_b(z))  # (B, C_B)
            if self.scale_stats is not None and mode is FusionMode.FUSED:
                scales = torch.cat([scale_a, scale_b], dim=1).detach().double()  # (B, C_A + C_B)
                self.scale_stats[0] += scales.sum(0)
                self.scale_stats[1] += scales.square().sum(0)
                self.scale_stats[2] += scales.shape[0]
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
        """Z = ReLU(W_s [S_A; S_B] + b_s): (B, C_A), (B, C_B) -> (B, hidden)."""
        return torch.relu(self.fc_squeeze(torch.cat([s_a, s_b], dim=1)))


class SqueezeExcite(nn.Module):
    """The squeeze-and-excitation block of the uni-modal baseline (SPEC Sec. 9): an MMTM that sees one modality.

    s = pool(A) over the spatial dims (any number), z = ReLU(W_s s + b_s), A' = A * sigmoid(W_e z + b_e), with
    `fc_squeeze` (W_s: C -> hidden) and `fc_excite` (W_e: hidden -> C).

    Args:
        channels: C, channels of the features.
        hidden: width of z; C if None (the hidden size of MMTM(C) for the authors' ratio 4).
    """

    def __init__(self, channels: int, hidden: Optional[int] = None) -> None:
        super().__init__()
        hidden = channels if hidden is None else hidden
        if channels < 1 or hidden < 1:
            raise ValueError(f"SqueezeExcite needs channels >= 1 and hidden >= 1, got channels={channels}, "
                             f"hidden={hidden}")
        self.channels, self.hidden = int(channels), int(hidden)
        self.fc_squeeze = nn.Linear(self.channels, self.hidden)
        self.fc_excite = nn.Linear(self.hidden, self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}"

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """Rescale A channel-wise from its own squeeze: (B, C, *spatial) -> the same shape."""
        s = _squeeze(a, self.channels, "the SE input")  # (B, C)
        z = torch.relu(self.fc_squeeze(s))  # (B, hidden)
        return a * _as_map(torch.sigmoid(self.fc_excite(z)), a)


def _squeeze(x: torch.Tensor, channels: int, name: str = "x") -> torch.Tensor:
    """The squeeze of the MMTM and the SE block: the mean over every dim after the channel dim.

    Args:
        x: features (B, C), (B, C, T), (B, C, H, W) or (B, C, D, H, W).
        channels: the C the module was built for.
        name: how errors call x.
    Returns:
        (B, C); x itself for vectors.
    """
    if x.dim() < 2 or x.shape[1] != channels:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (batch, {channels}, *spatial): "
                         f"{channels} channels in dim 1, then any spatial dims (none for vectors)")
    return x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x


def _sync_host_flags(module: MMTM, incompatible_keys) -> None:
    """After load_state_dict: refresh the host mirrors of the loaded buffers (one sync, at load time)."""
    module._has_running_scales = bool(module.scale_count > 0)
    module._has_squeeze_means = bool(module.has_squeeze_means)


def _as_map(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C, 1, ..., 1) broadcastable against x (unchanged for vectors)."""
    return scale.reshape(scale.shape + (1,) * (x.dim() - 2)).to(x.dtype)
