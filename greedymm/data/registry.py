"""What makes a dataset (SPEC Sec. 1, 10 and 11): a `DatasetSpec` (views, defaults, input format, cache builder, model,
presets, paper column, study family), registered by the module that builds the dataset; adding a dataset is one
module. Imports neither torch nor numpy: the processes that build caches import this package.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..registry import DATASETS


@dataclass(frozen=True)
class InputFormat:
    """How a dataset's views reach the model."""

    view_channels: Optional[Tuple[int, ...]]  # channels delivered per view index; None: 3 for every view
    mean: Tuple[float, ...]  # per channel (3 values) or for all channels (1), on the 0..1 scale
    std: Tuple[float, ...]
    flip: bool  # random horizontal flip in training

    def channels(self, views: Sequence[int]) -> Tuple[int, int]:
        """Channels of x0 and x1 for the chosen views."""
        return tuple(3 if self.view_channels is None else self.view_channels[v] for v in views)


# A cache builder: (DataConfig, cache_dir, force, progress) -> cache_dir, or its "module:function" path.
CacheBuilder = Union[str, Callable[..., Any]]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the package needs to know about a dataset besides its files (one per `DataConfig.dataset`)."""

    name: str  # the DataConfig.dataset value
    num_views: int  # views per object in its cache (12 renders, 2 digits)
    default_views: Tuple[int, int]  # what views=None resolves to: m0, m1
    image_size: int  # what image_size=None resolves to, in pixels
    val_fraction: float  # what val_fraction=None resolves to (where the cache stores no validation split)
    input_format: InputFormat  # channels per view, normalisation, flip
    cache_builder: CacheBuilder  # builds or reuses the cache: builder(cfg, cache_dir, force=, progress=) -> cache_dir
    default_model: str  # zoo branch of its two-branch model (greedymm.models.zoo.build_two_branch)
    family: str  # which preset grids its studies take: "renders" or "digits"
    identical_view: int  # the view shown twice in the greedy-learner study's identical pairs (SPEC Sec. 11)
    url: str = ""  # what url="" resolves to ("" : the dataset finds its own sources)
    data_dir: str = "data"  # what data_dir="" resolves to
    cache_prefix: str = ""  # the cache folder is {data_dir}/{prefix}_{size}px; "" = "{name}_npy"
    data_preset: Mapping[str, Any] = field(default_factory=dict)  # DataConfig overrides of `for_dataset`
    train_preset: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig overrides, `options` included
    paper_column: Optional[str] = None  # the paper's Table-1 column it is compared with; None: none
    own_fields: Tuple[str, ...] = ()  # DataConfig fields only this dataset uses (left out of the others' identity)
    preview: str = "views"  # how the notebook draws the data: "views" (every view of a few objects) or "pairs" (m0
    # above m1, a training and a test grid: the digits' color shortcut)
    order: float = 1000  # position in listings (the built-in datasets first)


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register a dataset under `spec.name` (then `DataConfig(dataset=spec.name)` and everything after it work)."""
    DATASETS.add(spec.name, spec)
    return spec


def unregister_dataset(name: str) -> None:
    """Remove a registered dataset (e.g. a test's own)."""
    DATASETS.remove(name)


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a dataset; ValueError naming the registered ones for an unknown name."""
    return DATASETS.get(name)


def dataset_names() -> List[str]:
    """The registered datasets, in order."""
    return DATASETS.names()


def datasets() -> Dict[str, DatasetSpec]:
    """The registered specs by name, in order."""
    return dict(DATASETS.items())


def resolve(target: Union[str, Callable[..., Any]], what: str = "target", hint: str = "") -> Callable[..., Any]:
    """A callable itself, or the function a "module:function" path names (imported now).

    Args:
        target: a callable or "package.module:function" (dots after the colon reach attributes).
        what, hint: how errors name the target, and what they add after "is not a function".
    Returns:
        The function.
    """
    if callable(target):
        return target
    module, _, attr = str(target).partition(":")
    try:
        fn: Any = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{what}={target!r} cannot be loaded ({err}); give 'module:function' of an importable "
                         "module") from None
    if not callable(fn):
        raise ValueError(f"{what}={target!r} is not a function{hint}")
    return fn
