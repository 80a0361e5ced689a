"""How a model is trained (paper Sec. 5, Algorithm 1; SPEC Sec. 5, 9, 12): the `Method` plug-in through which every
method meets the trainer, its settings dataclass, the `StepContext` its hooks receive, the re-balancing schedules'
base, and the registry. A method is one module: a `Method` subclass with its `Settings`, decorated with `@register`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import method_settings
from ..measures.evaluate import Outputs
from ..models.mmtm import FusionMode
from ..registry import METHODS


@dataclass
class MethodSettings:
    """Base of every method's settings: one commented field per setting, named as `TrainConfig.options` names it.
    A field made with `setting(default, param="NAME")` is also the notebook parameter NAME."""

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what is allowed."""


_NO_LEGACY = object()


def setting(default: Any, param: Optional[str] = None, legacy: Any = _NO_LEGACY) -> Any:
    """A settings field with its default and, optionally, the notebook parameter (papermill) that sets it.

    `legacy` is for a setting added after greedymm 0.1: the value that reproduces 0.1's behaviour. A run holding it
    leaves the setting out of its identity, so it keeps the name (and resumes the checkpoints) 0.1 gave it.
    """
    metadata: Dict[str, Any] = {"param": param} if param else {}
    if legacy is not _NO_LEGACY:
        metadata["legacy"] = legacy
    return field(default=default, metadata=metadata)


@dataclass
class StepContext:
    """What every hook of a method receives about the current step."""

    epoch: int  # 0-based epoch of the step
    step: int  # 1-based number of this optimizer step
    batch: int  # 0-based batch index in the epoch
    mode: FusionMode  # the step's fusion mode (FUSED while `next_mode` chooses it; at an epoch's end, evaluation's)
    steps_per_epoch: Optional[int]  # batches per epoch (None: the loader has no length)


@dataclass(frozen=True)
class Sweep:
    """A setting that the sensitivity study sweeps (paper Fig. 9; SPEC Sec. 11-12), its default grid and its figure."""

    setting: str  # the settings field swept
    values: Union[Tuple[Any, ...], Mapping[str, Tuple[Any, ...]]]  # the grid, or one per dataset family
    meaning: str  # what the setting is, on the figure's axis
    symbol: str  # its symbol on the figure, e.g. "$W$"
    short: str = ""  # its plain symbol in the legend when it is held fixed, e.g. "W"
    hold: Optional[str] = None  # the setting held at its preset meanwhile (a pair of sweeps: guided's epsilon and W)
    log_x: bool = False  # a log axis for it
    param: Optional[str] = None  # the studies notebook's parameter that replaces the grid, e.g. "SENS_WINDOWS"

    def grid(self, family: str) -> Tuple[Any, ...]:
        """The default grid for a dataset family ("renders" or "digits")."""
        return tuple(self.values[family] if isinstance(self.values, Mapping) else self.values)


class Method:
    """A training method as the trainer sees it: the network it trains, the fusion mode of each step, the forward
    pass, the loss and its backward pass, and hooks after the backward pass (after the CLS), after each step and at
    the end of an epoch. This base class is the paper's multi-modal training with regular steps only (vanilla, SPEC
    Sec. 2 and 5): the two-branch model and the loss CE(y0_hat, y) + CE(y1_hat, y), or CE(z, y) on a late-fusion model
    (SPEC Sec. 13). Methods override what they change;
    the trainer keeps the rest (CLS, logs, checkpoints, exact resume) the same for all.

    Args:
        settings: the method's settings (its `Settings`, defaults when None).
        seed: the run's seed (for a method's own random streams).
    """

    name: ClassVar[str] = ""  # registry key, e.g. "ogm_ge"
    label: ClassVar[str] = ""  # display name, e.g. "OGM-GE"
    color: ClassVar[str] = "tab:purple"  # matplotlib colour in the figures
    paper_row: ClassVar[bool] = False  # a row of the paper's Table 1 (False: "(not in the paper)")
    multimodal: ClassVar[bool] = True  # two branches: the CLS is logged and the CUR applies (False: uni-modal rows)
    rebalancing: ClassVar[bool] = False  # takes re-balancing steps (guided, random)
    order: ClassVar[float] = 1000  # position in tables and listings (the paper's rows first)
    Settings: ClassVar[Type[MethodSettings]] = MethodSettings
    sweeps: ClassVar[Tuple[Sweep, ...]] = ()  # what the sensitivity study sweeps, in its figure's row order
    tolerance: ClassVar[Optional[str]] = None  # a setting drawn as a +-band on d_speed figures (guided's epsilon)

    def __init__(self, settings: Optional[MethodSettings] = None, seed: int = 0) -> None:
        self.settings = settings if settings is not None else self.Settings()
        self.settings.validate()
        self.seed = int(seed)

    @classmethod
    def check(cls, settings: MethodSettings) -> None:
        """Check the complete settings of a run of this method (TrainConfig calls it); ValueError if unusable."""
        settings.validate()

    def build_model(self, two_branch: nn.Module) -> nn.Module:
        """The network this method trains, from a freshly built (seeded) two-branch model: the model itself."""
        return two_branch

    def setup(self, model: nn.Module) -> Optional[nn.Module]:
        """Called once by the trainer before training: check the model, build extra trainable modules.

        Returns:
            Modules trained and checkpointed beside the model (e.g. RUBi's bias classifier), or None.
        """
        if not hasattr(model, "cls_groups"):
            raise TypeError(f"algorithm {self.name!r} trains a two-branch model (TwoBranchNet); got "
                            f"{type(model).__name__}")
        return None

    def next_mode(self, ctx: StepContext) -> FusionMode:
        """The fusion mode of the step `ctx` describes: regular (fused) steps only."""
        return FusionMode.FUSED

    def forward(self, model: nn.Module, x0: torch.Tensor, x1: torch.Tensor, ctx: StepContext) -> Outputs:
        """The training forward pass (run under autocast by the trainer).

        Returns:
            {"y0": (B, K), "y1": (B, K)} logits; a late-fusion model (`model.is_late`) gives its partial logits
            there and adds "z": the fused logits z = model.predict(y0, y1) (SPEC Sec. 13).
        """
        y0_hat, y1_hat = model(x0, x1, ctx.mode)
        if getattr(model, "is_late", False):
            return {"y0": y0_hat, "y1": y1_hat, "z": model.predict(y0_hat, y1_hat)}
        return {"y0": y0_hat, "y1": y1_hat}

    def loss(self, out: Outputs, y: torch.Tensor, ctx: StepContext) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The training loss and its named terms (logged per step and averaged per epoch as train_<name>).

        Returns:
            MMTM: (loss, {"loss0": CE(y0_hat, y), "loss1": CE(y1_hat, y)}), the loss being their sum (SPEC Sec. 2).
            Late fusion ("z" in `out`): (CE(z, y), {"loss0", "loss1"}: the CE of the partial logits, for the logs
            only, without gradient) (SPEC Sec. 13).
        """
        if "z" in out:
            with torch.no_grad():
                loss0 = F.cross_entropy(out["y0"].detach().float(), y)
                loss1 = F.cross_entropy(out["y1"].detach().float(), y)
            return F.cross_entropy(out["z"].float(), y), {"loss0": loss0, "loss1": loss1}
        loss0 = F.cross_entropy(out["y0"].float(), y)
        loss1 = F.cross_entropy(out["y1"].float(), y)
        return loss0 + loss1, {"loss0": loss0, "loss1": loss1}

    def backward(self, loss: torch.Tensor, terms: Dict[str, torch.Tensor], ctx: StepContext) -> None:
        """Back-propagate `loss` (the trainer passes it already scaled when fp16 needs loss scaling)."""
        loss.backward()

    def after_backward(self, model: nn.Module, out: Outputs, y: torch.Tensor,
                       ctx: StepContext) -> Dict[str, torch.Tensor]:
        """Called after the backward pass and the CLS, before the optimizer step, with unscaled gradients.

        Returns:
            0-d tensors to log with the step (read with the step's one host synchronisation).
        """
        return {}

    def observe(self, ctx: StepContext, record: dict) -> None:
        """Called after each step with its logged record (host values: d_speed, skipped, ...)."""

    def end_epoch(self, record: dict, ctx: StepContext) -> dict:
        """Called at the end of each epoch with its record (training and validation figures).

        Returns:
            Values to add to the epoch record.
        """
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the method (the step modes' state under "schedule")."""
        return {"schedule": {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`."""


@dataclass
class RebalancingSettings(MethodSettings):
    """The settings of a method that takes re-balancing steps."""

    warmup_epochs: int = 1  # epochs of regular steps before re-balancing starts (at least 1: the running means)

    def validate(self) -> None:
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be 0 or more")


class Rebalancing(Method):
    """The base of the schedules that take re-balancing steps after a warm-up of regular ones (SPEC Sec. 5): a
    re-balancing step feeds one branch the running means of the fusion scales, which need regular steps first."""

    rebalancing = True
    Settings = RebalancingSettings

    @classmethod
    def check(cls, settings: MethodSettings) -> None:
        settings.validate()
        if settings.warmup_epochs < 1:
            raise ValueError(f"warmup_epochs={settings.warmup_epochs}: {cls.name} needs at least 1 warm-up epoch of "
                             "regular steps (its re-balancing steps use the running means of regular steps)")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def register(cls: Type[Method]) -> Type[Method]:
    """Class decorator: register a method under `cls.name`, after checking its declaration.

    A setting that several methods declare (guided's and random's warmup_epochs) must have one default and one
    notebook parameter, since `TrainConfig.options` holds one value for all of them.
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError(f"{cls!r} must be a Method subclass with a name")
    if not (dataclasses.is_dataclass(cls.Settings) and issubclass(cls.Settings, MethodSettings)):
        raise TypeError(f"{cls.__name__}.Settings must be a dataclass derived from MethodSettings")
    own = {f.name: f for f in dataclasses.fields(cls.Settings)}
    for name, other in METHODS.registered().items():  # as registered so far: this runs while built-ins load
        for f in dataclasses.fields(other.Settings):
            mine = own.get(f.name)
            if name != cls.name and mine is not None and (_default(mine) != _default(f) or
                                                          mine.metadata.get("param") != f.metadata.get("param")):
                raise ValueError(f"{cls.name}.Settings.{f.name} differs from {name}'s (default or notebook "
                                 "parameter): a setting several methods share must be declared alike")
    unknown = [s.setting for s in cls.sweeps if s.setting not in own or (s.hold and s.hold not in own)]
    if unknown:
        raise ValueError(f"{cls.name}.sweeps names {unknown}, which {cls.Settings.__name__} does not declare")
    METHODS.add(cls.name, cls)
    return cls


def unregister(name: str) -> None:
    """Remove a registered method (e.g. a test's own)."""
    METHODS.remove(name)


def get_method(name: str) -> Type[Method]:
    """The class of a registered method; ValueError naming the registered ones for an unknown name."""
    return METHODS.get(name)


def method_names() -> List[str]:
    """The registered methods in table order: the paper's rows first, then the others in registration order."""
    return METHODS.names()


def methods() -> Dict[str, Type[Method]]:
    """The registered method classes by name, in table order."""
    return dict(METHODS.items())


def make_method(name: str, options: Optional[Mapping[str, Any]] = None, seed: int = 0) -> Method:
    """A method by name, its settings read from `options` (the fields its Settings declares; defaults elsewhere).

    Args:
        name: a registered method.
        options: settings by field name (e.g. TrainConfig.options); keys other methods declare are ignored.
        seed: the run's seed.
    Returns:
        The Method.
    """
    cls = get_method(name)
    return cls(method_settings(cls, dict(options or {})), seed)


def method_color(name: str, default: Optional[str] = None) -> Optional[str]:
    """The colour of a registered method, `default` for another name."""
    return get_method(name).color if name in METHODS else default
