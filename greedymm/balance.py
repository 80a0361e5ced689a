"""Conditional learning speed and the balancing schedules (paper Sec. 3.3 and Algorithm 1;
SPEC Sec. 4-5): mu, s(m1|m0), s(m0|m1), d_speed, the vanilla / guided / random step modes, and `Algorithm`,
the plug-in through which every training algorithm (these three, the baselines, the balancers) meets the trainer.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .mmtm import FusionMode

CLS_GROUPS = ("m0", "m1", "m0_prime", "m1_prime")


class CLSTracker:
    """Computes mu(G; t) = sum ||grad p||^2 / sum ||p||^2 for the four CLS groups and accumulates them.

    All four mu come from two fused norm reductions (`torch._foreach_norm` over grads and over weights) and one
    small matrix product with the 0/1 group-membership matrix, so a step costs a handful of kernels and no host
    synchronisation; the cumulative sums live on the parameters' device in float64.

    Args:
        groups: the model's `cls_groups()`: a dict with the keys in CLS_GROUPS. Groups may share parameters
            (W_s, b_s are in both primed groups).
    """

    def __init__(self, groups: Dict[str, Sequence[nn.Parameter]]) -> None:
        missing = [g for g in CLS_GROUPS if g not in groups or len(groups[g]) == 0]
        if missing:
            raise ValueError(f"CLS groups {missing} are missing or empty; need non-empty {', '.join(CLS_GROUPS)}")
        index: Dict[int, int] = {}
        self.params: List[nn.Parameter] = []
        for g in CLS_GROUPS:
            for p in groups[g]:
                if id(p) not in index:
                    index[id(p)] = len(self.params)
                    self.params.append(p)
        device = self.params[0].device
        membership = torch.zeros(len(CLS_GROUPS), len(self.params), dtype=torch.float64, device=device)
        for row, g in enumerate(CLS_GROUPS):
            for p in groups[g]:
                membership[row, index[id(p)]] = 1.0
        self.membership = membership  # (4, P)
        self._sub_membership: Dict[tuple, torch.Tensor] = {}  # columns of the parameters that have gradients
        self.sums = torch.zeros(len(CLS_GROUPS), dtype=torch.float64, device=device)  # (4,) cumulative mu

    @torch.no_grad()
    def compute_mu(self) -> torch.Tensor:
        """mu of each group from the current gradients, which must be unscaled (call after backward,
        before the optimizer step).

        Returns:
            (4,) float64 tensor on the parameters' device, ordered as CLS_GROUPS.
        """
        grads = [p.grad for p in self.params]
        members = self.membership
        if any(g is None for g in grads):
            # Unused parameters (W_A in re-balance m0, say) have no gradient: they contribute 0 to the sums.
            keep = tuple(i for i, g in enumerate(grads) if g is not None)
            if keep not in self._sub_membership:  # cached: building the index would copy to the GPU every step
                self._sub_membership[keep] = self.membership[:, list(keep)]
            grads = [grads[i] for i in keep]
            members = self._sub_membership[keep]
        grad_sq = torch.stack(torch._foreach_norm(grads)).double().square() if grads else members.new_zeros(0)
        weight_sq = torch.stack(torch._foreach_norm(self.params)).double().square()  # (P,)
        return (members @ grad_sq) / (self.membership @ weight_sq)  # (4,)

    @torch.no_grad()
    def update(self, mu: torch.Tensor, regular: bool, skipped: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add mu to the cumulative sums if the step was regular and taken, and return the speeds.

        Args:
            mu: (4,) from `compute_mu`.
            regular: True for a fused (regular) step; re-balancing steps are not accumulated (SPEC Sec. 4).
            skipped: 0-d tensor, nonzero when the optimizer step is skipped (fp16 gradients overflowed): such a
                step's mu is inf/NaN and adds nothing. A tensor, so that no host synchronisation is needed.
        Returns:
            (3,) float64 tensor: s(m1|m0), s(m0|m1), d_speed (NaN before the first regular step).
        """
        if regular and skipped is None:
            self.sums += mu
        elif regular:
            self.sums += torch.where(skipped.to(self.sums.device) == 0, mu, torch.zeros_like(mu))
        s_m1_m0 = torch.log10(self.sums[2] / self.sums[0])
        s_m0_m1 = torch.log10(self.sums[3] / self.sums[1])
        return torch.stack([s_m1_m0, s_m0_m1, s_m1_m0 - s_m0_m1])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"sums": self.sums.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.sums = state["sums"].to(self.sums.device, torch.float64).clone()


class Schedule:
    """Chooses the fusion mode of every training step: vanilla trains regular steps only."""

    name = "vanilla"

    def next_mode(self, epoch: int) -> FusionMode:
        """Mode of the next step.

        Args:
            epoch: 0-based epoch of the next step.
        Returns:
            The FusionMode for that step.
        """
        return FusionMode.FUSED

    def observe(self, mode: FusionMode, d_speed: float, skipped: bool = False) -> None:
        """Tell the schedule the d_speed after a step taken in `mode` (`skipped`: the optimizer skipped it)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class GuidedSchedule(Schedule):
    """Algorithm 1: after warm-up, once a regular step ends with |d_speed| > epsilon the next `window` steps
    re-balance m0 (d_speed > 0) or m1 (d_speed < 0); then regular steps resume and the check runs after each.

    The d_speed of the last warm-up step is checked before the first step after warm-up.

    Args:
        epsilon: imbalance tolerance (>= 0).
        window: re-balancing steps per window W (>= 1).
        warmup_epochs: epochs of regular steps first.
    """

    name = "guided"

    def __init__(self, epsilon: float, window: int, warmup_epochs: int = 1) -> None:
        if not epsilon >= 0:
            raise ValueError(f"epsilon={epsilon} must be >= 0 (the imbalance tolerance)")
        if window < 1:
            raise ValueError(f"window={window} must be at least 1 (re-balancing steps per window)")
        self.epsilon, self.window, self.warmup_epochs = epsilon, window, warmup_epochs
        self.remaining = 0  # re-balancing steps left in the current window
        self.window_mode = FusionMode.FUSED
        self.last_d_speed: Optional[float] = None  # d_speed after the last regular step, not yet checked

    def next_mode(self, epoch: int) -> FusionMode:
        if self.remaining > 0:
            self.remaining -= 1
            return self.window_mode
        d = self.last_d_speed
        if epoch >= self.warmup_epochs and d is not None and abs(d) > self.epsilon:
            # d_speed > 0: branch 0 learns relatively more through the fusion than from m0 -> accelerate m0.
            self.window_mode = FusionMode.REBALANCE_M0 if d > 0 else FusionMode.REBALANCE_M1
            self.remaining = self.window - 1
            self.last_d_speed = None
            return self.window_mode
        return FusionMode.FUSED

    def observe(self, mode: FusionMode, d_speed: float, skipped: bool = False) -> None:
        if skipped:  # no step was taken and nothing was added to the CLS sums: nothing new to check
            self.last_d_speed = None
        elif mode is FusionMode.FUSED:
            self.last_d_speed = d_speed

    def state_dict(self) -> dict:
        return {"remaining": self.remaining, "window_mode": self.window_mode.value,
                "last_d_speed": self.last_d_speed}

    def load_state_dict(self, state: dict) -> None:
        self.remaining = int(state["remaining"])
        self.window_mode = FusionMode(state["window_mode"])
        self.last_d_speed = state["last_d_speed"]


class RandomSchedule(Schedule):
    """After warm-up each step is drawn uniformly from {regular, re-balance m0, re-balance m1}.

    Args:
        warmup_epochs: epochs of regular steps first.
        seed: seed of the schedule's own generator (independent of data order and weights).
    """

    name = "random"
    MODES = (FusionMode.FUSED, FusionMode.REBALANCE_M0, FusionMode.REBALANCE_M1)

    def __init__(self, warmup_epochs: int = 1, seed: int = 0) -> None:
        self.warmup_epochs = warmup_epochs
        self.generator = torch.Generator().manual_seed(seed)

    def next_mode(self, epoch: int) -> FusionMode:
        if epoch < self.warmup_epochs:
            return FusionMode.FUSED
        return self.MODES[int(torch.randint(3, (), generator=self.generator))]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def make_schedule(algorithm: str, epsilon: float = 0.01, window: int = 5, warmup_epochs: int = 1,
                  seed: int = 0) -> Schedule:
    """Build the schedule of a training algorithm.

    Args:
        algorithm: "guided" or "random"; every other algorithm takes regular steps only (vanilla's schedule).
        epsilon, window: guided's tolerance and window.
        warmup_epochs: regular-only epochs before guided/random balancing.
        seed: random's seed.
    Returns:
        A Schedule.
    """
    if algorithm == "guided":
        return GuidedSchedule(epsilon, window, warmup_epochs)
    if algorithm == "random":
        return RandomSchedule(warmup_epochs, seed)
    return Schedule()


Outputs = Dict[str, torch.Tensor]  # a forward pass: "y0", "y1" (two branches) or "y" (one), plus extras


class Algorithm:
    """A training algorithm as the trainer sees it: the fusion mode of each step, the forward pass and loss, and
    optional hooks after the backward pass and at the end of an epoch.

    This class is the paper's multi-modal training (SPEC Sec. 2 and 5): the two-branch model, the loss
    CE(y0_hat, y) + CE(y1_hat, y), and the step modes of its schedule (vanilla, random or guided). Baselines
    (`greedymm.baselines`) and balancers override the pieces they change; the trainer keeps the rest (CLS, logs,
    checkpoints, exact resume) the same for all.

    Args:
        schedule: the step modes; vanilla's (regular steps only) if None.
    """

    name = "vanilla"
    multimodal = True  # two branches: the CLS is logged and the CUR applies (False for a uni-modal network)

    def __init__(self, schedule: Optional[Schedule] = None) -> None:
        self.schedule = schedule or Schedule()
        if type(self) is Algorithm:  # the paper's multi-modal training is named by its schedule
            self.name = self.schedule.name

    def setup(self, model: nn.Module) -> Optional[nn.Module]:
        """Called once by the trainer before training: check the model, build extra trainable modules.

        Returns:
            Modules trained and checkpointed beside the model (e.g. RUBi's bias classifier), or None.
        """
        if not hasattr(model, "cls_groups"):
            raise TypeError(f"algorithm {self.name!r} trains a two-branch model (TwoBranchNet); got "
                            f"{type(model).__name__}")
        return None

    def next_mode(self, epoch: int) -> FusionMode:
        """The fusion mode of the next step (0-based `epoch`)."""
        return self.schedule.next_mode(epoch)

    def forward(self, model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, mode: FusionMode) -> Outputs:
        """The training forward pass (run under autocast by the trainer).

        Returns:
            {"y0": (B, K), "y1": (B, K)} logits.
        """
        y0_hat, y1_hat = model(x0, x1, mode)
        return {"y0": y0_hat, "y1": y1_hat}

    def loss(self, out: Outputs, y: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The training loss and its named terms (logged per step and averaged per epoch as train_<name>).

        Returns:
            (loss, {"loss0": CE(y0_hat, y), "loss1": CE(y1_hat, y)}), the loss being their sum (SPEC Sec. 2).
        """
        loss0 = F.cross_entropy(out["y0"].float(), y)
        loss1 = F.cross_entropy(out["y1"].float(), y)
        return loss0 + loss1, {"loss0": loss0, "loss1": loss1}

    def after_backward(self, model: nn.Module, out: Outputs, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Called after the backward pass and the CLS, before the optimizer step, with unscaled gradients.

        Returns:
            0-d tensors to log with the step (read with the step's one host synchronisation).
        """
        return {}

    def observe(self, mode: FusionMode, record: dict) -> None:
        """Called after each step with its logged record (host values)."""
        self.schedule.observe(mode, record.get("d_speed", float("nan")), record.get("skipped", False))

    def end_epoch(self, record: dict) -> dict:
        """Called at the end of each epoch with its record (training and validation figures).

        Returns:
            Values to add to the epoch record.
        """
        return {}

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
