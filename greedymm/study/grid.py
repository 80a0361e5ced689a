"""The paper's studies as grids of run settings (paper Sec. 6.2-6.3, Figs. 2, 4, 8, 9; SPEC Sec. 11): a Study is
data (named axes, and per-method settings swept only for the methods that declare them), expanded into RunSpecs named
by `greedymm.config.run_name`, so every run of a study is an ordinary run with its ordinary logs and checkpoints.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..config import DataConfig, TrainConfig, check_option_names, run_name, settings_names, to_dict
from ..data.registry import get_dataset
from ..methods.base import get_method, method_names, methods

Pair = Union[str, Tuple[int, int]]
PAIR_KINDS = ("distinct", "identical")
# The figures a study can ask for (greedymm.study.figures.FIGURES draws them).
FIGURE_NAMES = ("pairs", "cls_cur", "regularization", "sensitivity")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def log_space(low: float, high: float, n: int) -> Tuple[float, ...]:
    """n values from `low` to `high`, evenly spaced on a log scale, rounded to 4 significant digits.

    Args:
        low, high: the ends (both > 0, included).
        n: how many values (>= 1; 1 gives `low`).
    Returns:
        The values, ascending when low < high.
    """
    if not (low > 0 and high > 0 and math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"log_space({low}, {high}, {n}): both ends must be positive finite numbers")
    if n < 1:
        raise ValueError(f"log_space: n={n} must be at least 1")
    if n == 1:
        return (float(f"{low:.4g}"),)
    step = (math.log10(high) - math.log10(low)) / (n - 1)
    return tuple(float(f"{10 ** (math.log10(low) + i * step):.4g}") for i in range(n))


@dataclass
class Grid:
    """One product of settings; a Study is the union of its grids. None in an axis means the dataset's preset."""

    datasets: Tuple[str, ...] = ("modelnet40",)  # DataConfig.dataset values
    pairs: Tuple[Pair, ...] = ("distinct",)  # "distinct" (the dataset's views), "identical", or explicit (v0, v1)
    algorithms: Tuple[str, ...] = ("vanilla",)  # training methods (`greedymm.methods.method_names()`)
    lrs: Tuple[Optional[float], ...] = (None,)  # learning rates; None = the dataset's preset
    seeds: Tuple[int, ...] = (0,)  # one run per seed
    l1s: Tuple[float, ...] = (0.0,)  # L1 strengths lambda (TrainConfig.l1)
    options: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)  # method settings swept, e.g. {"epsilon":
    # (0.01, 0.1)}, each for the methods that declare it only (another's runs take their preset); None = the preset

    AXES = ("datasets", "pairs", "algorithms", "lrs", "seeds", "l1s")

    def __post_init__(self) -> None:
        for name in self.AXES:
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"Grid.{name}={value!r} must be a list of values, e.g. {name}=[...]")
            if len(value) == 0:
                raise ValueError(f"Grid.{name} is empty: give at least one value (None takes the preset)")
            setattr(self, name, tuple(tuple(v) if isinstance(v, list) else v for v in value))
        allowed = method_names()
        unknown = [a for a in self.algorithms if a not in allowed]
        if unknown:
            raise ValueError(f"Grid.algorithms has {unknown}; allowed: {', '.join(allowed)}")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"Grid.options={self.options!r} must map method settings to lists of values, e.g. "
                             "options={'epsilon': [0.01, 0.1]}")
        check_option_names(self.options, "Grid.options")
        options = {}
        for key, value in self.options.items():
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"Grid.options[{key!r}]={value!r} must be a list of values, e.g. [...]")
            if len(value) == 0:
                raise ValueError(f"Grid.options[{key!r}] is empty: give at least one value (None takes the preset)")
            options[key] = tuple(value)
        self.options = options


@dataclass
class Study:
    """A named study: the union of its grids, shared settings, and the figures it draws (SPEC Sec. 11)."""

    name: str  # names logging/studies/<name>/ (letters, digits, _ . -)
    grids: Tuple[Grid, ...] = (Grid(),)  # the runs: the union of these products (duplicates run once)
    tau: float = 1e-3  # sparsity threshold: rho = fraction of parameters with |theta| < tau
    data: Dict[str, Any] = field(default_factory=dict)  # DataConfig fields for every run (e.g. image_size)
    train: Dict[str, Any] = field(default_factory=dict)  # TrainConfig fields for every run (e.g. max_epochs)
    model: str = ""  # "" = the dataset's default model; or "module:function", num_classes -> two-branch model
    figures: Tuple[str, ...] = ()  # which of FIGURE_NAMES to draw from its runs
    expectation: str = ""  # the paper's claim in one sentence, shown beside the figures

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"Study name {self.name!r} must be a folder name: letters, digits, '_', '.', '-'")
        self.grids = tuple(Grid(**g) if isinstance(g, Mapping) else g for g in self.grids)
        if not self.grids:
            raise ValueError(f"study {self.name!r} has no grids")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"study {self.name!r}: tau={self.tau} must be a positive threshold")
        if self.model and not re.fullmatch(r"[\w.]+:[\w.]+", self.model):
            raise ValueError(f"study {self.name!r}: model={self.model!r} must be '' (the dataset's model) or "
                             "'module:function', a function num_classes -> two-branch model, e.g. "
                             "'greedymm.models.zoo:mmtm_convnet'")
        self.figures = tuple(self.figures)
        unknown = [f for f in self.figures if f not in FIGURE_NAMES]
        if unknown:
            raise ValueError(f"study {self.name!r}: figures {unknown} are unknown; allowed: {', '.join(FIGURE_NAMES)}")
        for key in ("algorithm", "seed", "lr", "l1", "run_name", "log_dir", "ckpt_dir"):
            if key in self.train:
                raise ValueError(f"study {self.name!r}: train[{key!r}] is set by the grid or by run_study, not by "
                                 "the study's shared settings")
        fields = [f.name for f in dataclasses.fields(TrainConfig)]
        unknown = [k for k in self.train if k not in fields]
        if unknown:
            raise ValueError(f"study {self.name!r}: train has {unknown}, which are not TrainConfig fields (a method's "
                             f"setting goes in train['options']); allowed: {', '.join(fields)}")
        for key in set(self.train.get("options", {})) & set(swept_settings()):
            raise ValueError(f"study {self.name!r}: train['options'][{key!r}] is set by the grid (Grid.options), not "
                             "by the study's shared settings")
        for key in ("dataset", "views", "data_dir"):
            if key in self.data:
                raise ValueError(f"study {self.name!r}: data[{key!r}] is set by the grid (datasets, pairs) or by "
                                 "run_study (data_dir), not by the study's shared settings")

    def to_dict(self) -> dict:
        """A JSON-ready dict; `Study.from_dict` reads it back."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Study":
        """The Study of a dict (e.g. parsed from JSON or YAML), grids given as dicts."""
        return cls(**{**d, "grids": tuple(Grid(**g) for g in d.get("grids", ()))})

    def size(self) -> int:
        """How many runs the study has."""
        return len(expand(self))


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its grid settings, its full configs and its name (picklable: it travels to workers)."""

    study: str  # the study's name
    dataset: str  # DataConfig.dataset
    pair: str  # "distinct", "identical", or "views a,b" for explicit views
    views: Tuple[int, int]  # the view indices of m0 and m1
    algorithm: str  # training algorithm
    lr: float  # learning rate (resolved)
    seed: int  # seed of weights, data order and flips
    l1: float  # L1 strength lambda
    options: Dict[str, Any]  # every method's swept settings (`swept_settings`): this run's, None where it has none
    tau: float  # the study's sparsity threshold
    model: str  # "" (the dataset's model) or "module:function" (Study.model)
    data: Dict[str, Any]  # the full DataConfig as a dict
    train: Dict[str, Any]  # the full TrainConfig as a dict
    run_name: str  # greedymm.config.run_name: logging/<run_name>/, checkpoints/<run_name>/

    def __getattr__(self, name: str) -> Any:
        """A swept setting by name, as a field (spec.epsilon, spec.ogm_alpha, ...)."""
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"RunSpec has no attribute {name!r}")

    def data_config(self) -> DataConfig:
        """The run's DataConfig."""
        return DataConfig(**self.data)

    def train_config(self) -> TrainConfig:
        """The run's TrainConfig (its algorithm and seed set)."""
        return TrainConfig(**self.train)

    @property
    def key(self) -> str:
        """What makes a record of this run current: the run, the sparsity threshold and the training budget (a
        larger budget continues the run; another tau re-measures rho without retraining)."""
        t = self.train
        return f"{self.run_name}|tau={self.tau!r}|max_epochs={t['max_epochs']}|max_steps={t['max_steps']}"

    def settings(self) -> dict:
        """Every setting of the run for its record: the grid's axes flat, the configs' identities nested."""
        data, train = self.data_config(), self.train_config()
        return {"study": self.study, "key": self.key, "run_name": self.run_name, "dataset": self.dataset,
                "pair": self.pair, "views": list(self.views), "model": self.model, "algorithm": self.algorithm,
                "lr": self.lr, "seed": self.seed, "l1": self.l1, **self.options, "tau": self.tau,
                "fusion": train.fusion,
                "batch_size": data.batch_size, "image_size": data.image_size, "momentum": train.momentum,
                "max_epochs": train.max_epochs, "max_steps": train.max_steps,
                "data": data.identity(), "train": train.identity()}


def pair_views(dataset: str, pair: Pair, default_views: Tuple[int, int]) -> Tuple[str, Tuple[int, int]]:
    """The label and the views of a pair setting.

    Args:
        dataset: DataConfig.dataset.
        pair: "distinct", "identical", a (v0, v1) pair or the text "v0,v1".
        default_views: the dataset's views (m0, m1).
    Returns:
        ("distinct", default_views), ("identical", (v, v)) with v the dataset's `identical_view` (renders: the
        front view; digits: the gray digit: the same image with the same flip, SPEC Sec. 11), or ("views v0,v1",
        (v0, v1)).
    """
    if pair == "distinct":
        return "distinct", tuple(default_views)
    if pair == "identical":
        v = get_dataset(dataset).identical_view
        return "identical", (v, v)
    if isinstance(pair, str) and re.fullmatch(r"\s*\d+\s*,\s*\d+\s*", pair):
        pair = tuple(int(p) for p in pair.split(","))
    if isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(v, int) for v in pair):
        return f"views {pair[0]},{pair[1]}", (int(pair[0]), int(pair[1]))
    raise ValueError(f"pair={pair!r} is unknown; allowed: 'distinct', 'identical', or two view indices such as "
                     "(0, 6) or '0,6'")


def swept_settings() -> List[str]:
    """The settings some registered method's sensitivity sweeps: every record carries them (None where unused)."""
    return list(dict.fromkeys(s.setting for method in methods().values() for s in method.sweeps))


def expand(study: Study, log_dir: Union[str, Path] = "logging", ckpt_dir: Union[str, Path] = "checkpoints",
           data_dir: Optional[Union[str, Path]] = None) -> List[RunSpec]:
    """The runs of a study, in grid order (datasets, pairs, algorithms, lrs, l1s, the options in the order the
    method's settings declare them, seeds).

    A setting in Grid.options is expanded only for the methods that declare it (guided's epsilon and W, OGM-GE's
    alpha, Gradient Blending's n), and a run that two grids share appears once.

    Args:
        study: the Study.
        log_dir, ckpt_dir: roots of the runs' logs and checkpoints (made absolute: workers may run elsewhere).
        data_dir: where the data lives; None = each dataset's default (made absolute too, from here).
    Returns:
        One RunSpec per run.
    """
    paths = {"log_dir": str(Path(log_dir).absolute()), "ckpt_dir": str(Path(ckpt_dir).absolute())}
    data_extra = {"data_dir": str(Path(data_dir).absolute())} if data_dir is not None else {}
    recorded = swept_settings()
    specs: Dict[str, RunSpec] = {}
    for grid in study.grids:
        for dataset, pair, algorithm in itertools.product(grid.datasets, grid.pairs, grid.algorithms):
            default = DataConfig.for_dataset(dataset, **study.data, **data_extra)
            label, views = pair_views(dataset, pair, default.views)
            try:
                data = dataclasses.replace(default, views=views, data_dir=str(Path(default.data_dir).absolute()))
            except ValueError as err:
                raise ValueError(f"study {study.name!r}, dataset {dataset!r}, pair {pair!r}: {err}") from None
            preset = TrainConfig.for_dataset(dataset, **study.train)
            declared = settings_names(get_method(algorithm))
            swept = [k for k in declared if k in grid.options]  # another method's settings: its preset, unexpanded
            for lr, l1, *values, seed in itertools.product(grid.lrs, grid.l1s, *(grid.options[k] for k in swept),
                                                           grid.seeds):
                chosen = {k: v for k, v in zip(swept, values) if v is not None}
                try:
                    train = dataclasses.replace(preset, algorithm=algorithm, seed=int(seed), l1=float(l1),
                                                options={**preset.options, **chosen},
                                                **({"lr": lr} if lr is not None else {}), **paths)
                except ValueError as err:
                    raise ValueError(f"study {study.name!r}: {err}") from None
                name = run_name(data, train, study.model)
                train = dataclasses.replace(train, run_name=name, progress=False)
                own = {k: train.option(k) if k in declared else None for k in recorded}
                spec = RunSpec(study.name, dataset, label, views, algorithm, train.lr, int(seed), train.l1, own,
                               study.tau, study.model, to_dict(data), to_dict(train), name)
                specs.setdefault(spec.key, spec)
    return list(specs.values())
