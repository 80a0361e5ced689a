"""The paper's studies as grids of run settings (paper Sec. 6.2-6.3, Figs. 2, 4, 8, 9; SPEC Sec. 11): a Study is
data (named axes), expanded into RunSpecs named by `greedymm.experiment.run_name`, so every run of a study is an
ordinary run with its ordinary logs and checkpoints.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..config import ALGORITHMS, DataConfig, TrainConfig, to_dict
from ..experiment import run_name

Pair = Union[str, Tuple[int, int]]
PAIR_KINDS = ("distinct", "identical")
# Identical modalities (SPEC Sec. 11): one modality twice, the same image with the same flip. Renders: the front
# view (view 0) twice; digits: the gray digit (view 1) twice.
IDENTICAL_VIEW = {"modelnet40": 0, "embedded": 0, "colored_mnist": 1, "colored_digits": 1}
# The per-algorithm settings a grid sweeps: TrainConfig field -> Grid axis (each used by the algorithms that
# TrainConfig.ALGORITHM_ONLY names for it).
SWEPT = {"epsilon": "epsilons", "window": "windows", "ogm_alpha": "ogm_alphas", "gblend_period": "gblend_periods"}
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
    algorithms: Tuple[str, ...] = ("vanilla",)  # training algorithms (greedymm.config.ALGORITHMS)
    lrs: Tuple[Optional[float], ...] = (None,)  # learning rates; None = the dataset's preset
    seeds: Tuple[int, ...] = (0,)  # one run per seed
    l1s: Tuple[float, ...] = (0.0,)  # L1 strengths lambda (TrainConfig.l1)
    epsilons: Tuple[Optional[float], ...] = (None,)  # guided's imbalance tolerance; None = the preset
    windows: Tuple[Optional[int], ...] = (None,)  # guided's re-balancing window W; None = the preset
    ogm_alphas: Tuple[Optional[float], ...] = (None,)  # ogm_ge's modulation strength alpha; None = the preset
    gblend_periods: Tuple[Optional[int], ...] = (None,)  # gblend's re-estimation period n in epochs; None = preset

    AXES = ("datasets", "pairs", "algorithms", "lrs", "seeds", "l1s", "epsilons", "windows", "ogm_alphas",
            "gblend_periods")

    def __post_init__(self) -> None:
        for name in self.AXES:
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"Grid.{name}={value!r} must be a list of values, e.g. {name}=[...]")
            if len(value) == 0:
                raise ValueError(f"Grid.{name} is empty: give at least one value (None takes the preset)")
            setattr(self, name, tuple(tuple(v) if isinstance(v, list) else v for v in value))
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown:
            raise ValueError(f"Grid.algorithms has {unknown}; allowed: {', '.join(ALGORITHMS)}")


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
                             "'greedymm.model:mmtm_convnet'")
        self.figures = tuple(self.figures)
        unknown = [f for f in self.figures if f not in FIGURE_NAMES]
        if unknown:
            raise ValueError(f"study {self.name!r}: figures {unknown} are unknown; allowed: {', '.join(FIGURE_NAMES)}")
        for key in ("algorithm", "seed", "lr", "l1", "epsilon", "window", "run_name", "log_dir", "ckpt_dir"):
            if key in self.train:
                raise ValueError(f"study {self.name!r}: train[{key!r}] is set by the grid or by run_study, not by "
                                 "the study's shared settings")
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
    epsilon: Optional[float]  # guided's tolerance (None for algorithms without one)
    window: Optional[int]  # guided's W (None for algorithms without one)
    ogm_alpha: Optional[float]  # ogm_ge's alpha (None for other algorithms)
    gblend_period: Optional[int]  # gblend's n (None for other algorithms)
    tau: float  # the study's sparsity threshold
    model: str  # "" (the dataset's model) or "module:function" (Study.model)
    data: Dict[str, Any]  # the full DataConfig as a dict
    train: Dict[str, Any]  # the full TrainConfig as a dict
    run_name: str  # greedymm.experiment.run_name: logging/<run_name>/, checkpoints/<run_name>/

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
                "lr": self.lr, "seed": self.seed, "l1": self.l1, "epsilon": self.epsilon, "window": self.window,
                "ogm_alpha": self.ogm_alpha, "gblend_period": self.gblend_period, "tau": self.tau,
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
        ("distinct", default_views), ("identical", (v, v)) with v = IDENTICAL_VIEW[dataset], or
        ("views v0,v1", (v0, v1)).
    """
    if pair == "distinct":
        return "distinct", tuple(default_views)
    if pair == "identical":
        if dataset not in IDENTICAL_VIEW:
            raise ValueError(f"pair 'identical' has no view chosen for dataset={dataset!r}; pass explicit views, "
                             f"e.g. (0, 0), or one of {', '.join(IDENTICAL_VIEW)}")
        v = IDENTICAL_VIEW[dataset]
        return "identical", (v, v)
    if isinstance(pair, str) and re.fullmatch(r"\s*\d+\s*,\s*\d+\s*", pair):
        pair = tuple(int(p) for p in pair.split(","))
    if isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(v, int) for v in pair):
        return f"views {pair[0]},{pair[1]}", (int(pair[0]), int(pair[1]))
    raise ValueError(f"pair={pair!r} is unknown; allowed: 'distinct', 'identical', or two view indices such as "
                     "(0, 6) or '0,6'")


def expand(study: Study, log_dir: Union[str, Path] = "logging", ckpt_dir: Union[str, Path] = "checkpoints",
           data_dir: Optional[Union[str, Path]] = None) -> List[RunSpec]:
    """The runs of a study, in grid order (datasets, pairs, algorithms, lrs, l1s, epsilons, windows, ogm_alphas,
    gblend_periods, seeds).

    Settings an algorithm does not use (epsilon and W outside guided, alpha outside ogm_ge, n outside gblend) are
    not expanded for it, and a run that two grids share appears once.

    Args:
        study: the Study.
        log_dir, ckpt_dir: roots of the runs' logs and checkpoints (made absolute: workers may run elsewhere).
        data_dir: where the data lives; None = each dataset's default (made absolute too, from here).
    Returns:
        One RunSpec per run.
    """
    paths = {"log_dir": str(Path(log_dir).absolute()), "ckpt_dir": str(Path(ckpt_dir).absolute())}
    data_extra = {"data_dir": str(Path(data_dir).absolute())} if data_dir is not None else {}
    algorithm_only = TrainConfig.ALGORITHM_ONLY
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
            uses = {field: algorithm in algorithm_only[field] for field in SWEPT}
            # an axis the algorithm does not use collapses to its preset: (None,)
            axes = [getattr(grid, axis) if uses[field] else (None,) for field, axis in SWEPT.items()]
            for lr, l1, *swept, seed in itertools.product(grid.lrs, grid.l1s, *axes, grid.seeds):
                chosen = {k: v for k, v in zip(("lr", *SWEPT), (lr, *swept)) if v is not None}
                try:
                    train = dataclasses.replace(preset, algorithm=algorithm, seed=int(seed), l1=float(l1), **chosen,
                                                **paths)
                except ValueError as err:
                    raise ValueError(f"study {study.name!r}: {err}") from None
                name = run_name(data, train, algorithm, int(seed), study.model)
                train = dataclasses.replace(train, run_name=name, progress=False)
                own = {field: getattr(train, field) if uses[field] else None for field in SWEPT}
                spec = RunSpec(study.name, dataset, label, views, algorithm, train.lr, int(seed), train.l1,
                               own["epsilon"], own["window"], own["ogm_alpha"], own["gblend_period"], study.tau,
                               study.model, to_dict(data), to_dict(train), name)
                specs.setdefault(spec.key, spec)
    return list(specs.values())
