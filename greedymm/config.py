"""Settings for data and training (paper Sec. 4-5 and Appendix; SPEC Sec. 1, 6 and 10), their presets, and a run's
identity and name. What depends on a dataset or a method comes from their registries (`greedymm.registry`): each
dataset's spec and each method's settings dataclass.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .registry import DATASETS, FUSIONS, METHODS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class DataConfig:
    """Where the two-view data comes from and how it is batched (SPEC Sec. 1, 10 and 11).

    `views`, `image_size`, `val_fraction`, `url` and `data_dir` left at None / "" take the dataset's defaults
    (its `DatasetSpec`), resolved when the config is made: a config always holds concrete values. To switch the dataset
    of an existing config, pass those fields as None / "" again, e.g. `dataclasses.replace(cfg, dataset=...,
    views=None, ...)`, or use `DataConfig.for_dataset`.
    """

    dataset: str = "modelnet40"  # a registered dataset: "modelnet40" (the paper's), "embedded", "colored_mnist", ...
    data_dir: str = ""  # downloads, renders, MNIST's IDX files and the .npy caches; "" = the dataset's default
    url: str = ""  # modelnet40: the archive; colored_mnist: the base URL of the IDX files; "" = the dataset's default
    mirrors: Tuple[str, ...] = ()  # further URLs (colored_mnist: base URLs) tried in order when `url` fails
    sha256: Optional[str] = None  # modelnet40: expected archive checksum; None skips the check
    make_npy_files: bool = False  # True forces the .npy cache to be rebuilt
    views: Optional[Tuple[int, int]] = None  # view indices of m0 and m1 (equal: identical modalities); None = default
    image_size: Optional[int] = None  # side of the cached square images, in pixels; None = the dataset's default
    batch_size: int = 8  # samples per training batch
    eval_batch_size: int = 64  # samples per evaluation batch
    num_workers: int = 0  # worker processes of the training loader (0 = load in the main process)
    val_fraction: Optional[float] = None  # share of the training split held out for validation; None = default
    split_seed: int = 0  # seed of the fixed validation split (and of colored_digits' test split)
    cache_workers: int = 0  # processes that build the cache (0 = one per CPU core)
    embedded_per_class: int = 120  # embedded dataset: training objects per class
    embedded_test_per_class: int = 40  # embedded dataset: test objects per class
    embedded_seed: int = 0  # embedded dataset: generator seed
    color_match: float = 1.0  # digits: share of training digits painted in their class color (the rest: a random one)
    color_noise_var: float = 0.03  # digits: variance of the Gaussian noise added to each color channel (0..1 scale)
    color_seed: int = 0  # digits: seed of the colors, drawn once and stored in the cache

    def __post_init__(self) -> None:
        if self.dataset in DATASETS:  # else validate() names the dataset
            spec = DATASETS.get(self.dataset)
            if self.views is None:
                self.views = spec.default_views
            if self.image_size is None:
                self.image_size = spec.image_size
            if self.val_fraction is None:
                self.val_fraction = spec.val_fraction
            if not self.url:
                self.url = spec.url
            if not self.data_dir:
                self.data_dir = spec.data_dir
        if self.views is not None:
            self.views = tuple(int(v) for v in self.views)  # JSON round trips give lists
        self.mirrors = tuple(self.mirrors)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and what is allowed."""
        spec = DATASETS.get(self.dataset)  # "dataset='cifar' is unknown; allowed: ..."
        if len(self.views) != 2:
            raise ValueError(f"views={self.views} must name exactly two view indices (m0, m1)")
        for v in self.views:
            if not 0 <= v < spec.num_views:
                raise ValueError(f"views={self.views}: each view index must be in 0..{spec.num_views - 1} for "
                                 f"dataset={self.dataset!r} (views=None takes its default, {spec.default_views})")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size={self.image_size} must be between 8 and 1024 pixels")
        for name in ("batch_size", "eval_batch_size", "embedded_per_class", "embedded_test_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("num_workers", "cache_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be strictly between 0 and 1")
        if not 0.0 <= self.color_match <= 1.0:
            raise ValueError(f"color_match={self.color_match} must be in [0, 1] (the share of training digits "
                             "painted in their class color)")
        if not (0.0 <= self.color_noise_var and math.isfinite(self.color_noise_var)):
            raise ValueError(f"color_noise_var={self.color_noise_var} must be a finite variance >= 0")

    # Fields that do not change a run's result: where files live, how fast they are read, evaluation batching.
    NOT_IDENTITY = ("data_dir", "url", "mirrors", "sha256", "make_npy_files", "eval_batch_size", "num_workers",
                    "cache_workers")

    def identity(self) -> dict:
        """The settings that define a run's data: every field that changes its result (see NOT_IDENTITY), less the
        fields that only other datasets use (their specs' `own_fields`)."""
        owned = {f for _, spec in DATASETS.items() for f in spec.own_fields}
        own = DATASETS.get(self.dataset).own_fields
        return {k: v for k, v in to_dict(self).items() if k not in self.NOT_IDENTITY and (k not in owned or k in own)}

    @classmethod
    def paper(cls, **overrides: Any) -> "DataConfig":
        """ModelNet40 front/rear views at 224 px, batch 8 (SPEC Sec. 1 and 6)."""
        return cls(**overrides)

    @classmethod
    def for_dataset(cls, name: str, **overrides: Any) -> "DataConfig":
        """The paper's settings for dataset `name` (its spec's `data_preset`): renders at batch 8 (SPEC Sec. 6),
        digits at batch 128 (Sec. 10).

        Args:
            name: a registered dataset (`greedymm.data.dataset_names()`).
            overrides: further fields.
        Returns:
            The config; views, image size and validation share are the dataset's defaults unless overridden.
        """
        spec = DATASETS.get(name)
        return cls(**{"dataset": name, **spec.data_preset, **overrides})

    @classmethod
    def quick(cls, **overrides: Any) -> "DataConfig":
        """The embedded dataset at 64 px: a CPU run of a few minutes."""
        return cls(**{"dataset": "embedded", "image_size": 64, "batch_size": 16, **overrides})

    @classmethod
    def smoke(cls, **overrides: Any) -> "DataConfig":
        """A tiny embedded dataset at 32 px for tests."""
        base = dict(dataset="embedded", image_size=32, batch_size=8,
                    embedded_per_class=12, embedded_test_per_class=4)
        return cls(**{**base, **overrides})

    @classmethod
    def smoke_digits(cls, **overrides: Any) -> "DataConfig":
        """colored_digits (1,797 scikit-learn digits, built in about a second) at 16 px, batch 32, for tests."""
        base = dict(dataset="colored_digits", image_size=16, batch_size=32, eval_batch_size=128)
        return cls(**{**base, **overrides})


# `TrainConfig.quick()` and the embedded dataset's preset: a few-minute CPU protocol
QUICK_TRAIN = dict(lr=0.05, momentum=0.9, max_epochs=8, plateau_patience=2)


@dataclass
class TrainConfig:
    """Optimisation, method and bookkeeping of one training run (SPEC Sec. 4-6).

    The method's own settings (guided's epsilon, OGM-GE's alpha, ...) are `options`, by the field names of the
    methods' settings dataclasses (`python -m greedymm list` shows them); a method reads the ones it declares and
    takes its defaults for the rest, so one config can carry the settings of several methods.
    """

    algorithm: str = "vanilla"  # a registered method: the Table-1 rows and the balancers (`greedymm.methods`)
    options: Dict[str, Any] = field(default_factory=dict)  # method settings by name, e.g. {"epsilon": 0.1}
    fusion: str = "mmtm"  # the two-branch model's fusion: "mmtm" (the paper's), "late_concat", "late_sum"
    lr: float = 0.1  # SGD learning rate
    momentum: float = 0.0  # SGD momentum (the paper uses none on ModelNet40)
    weight_decay: float = 0.0  # SGD weight decay
    l1: float = 0.0  # lambda of the L1 penalty lambda * sum |theta| over all parameters (paper Sec. 6.3)
    plateau_factor: float = 0.3  # lr multiplier when the training loss plateaus
    plateau_patience: int = 10  # epochs without improvement before the lr drops
    plateau_threshold: float = 1e-3  # relative improvement that counts as progress
    min_lr: float = 1e-6  # floor of the plateau scheduler
    max_epochs: int = 300  # hard epoch limit
    max_steps: Optional[int] = None  # optional budget of optimizer steps (None = no budget)
    full_acc_epochs: int = 5  # stop once training accuracy was 100% in this many epochs
    full_acc_steps: Optional[int] = None  # instead: once the epochs at 100% training accuracy hold this many steps
    seed: int = 0  # seeds weights, data order, augmentation and the random schedule
    precision: str = "auto"  # "auto" (CUDA: bf16 from capability 8.0, fp16 below; CPU: fp32), "fp32", "bf16", "fp16"
    channels_last: bool = True  # channels_last memory format on CUDA
    ckpt_every_steps: Optional[int] = None  # also write `last` every N steps (None = per epoch only)
    eval_test: bool = True  # evaluate the test set at the end of every epoch
    run_name: str = "run"  # names logging/<run_name>/ and checkpoints/<run_name>/
    log_dir: str = "logging"  # root of the per-run logs
    ckpt_dir: str = "checkpoints"  # root of the per-run checkpoints
    progress: bool = True  # tqdm progress bar per epoch

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and what is allowed."""
        method = METHODS.get(self.algorithm)  # "algorithm='greedy' is unknown; allowed: ..."
        FUSIONS.get(self.fusion)  # "fusion='early' is unknown; allowed: ..."
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr} must be a positive finite number")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be 0 or more")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ValueError(f"plateau_factor={self.plateau_factor} must be strictly between 0 and 1")
        if self.plateau_patience < 0 or self.plateau_threshold < 0 or self.min_lr < 0:
            raise ValueError("plateau_patience, plateau_threshold and min_lr must be 0 or more")
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs={self.max_epochs} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be at least 1, or None for no budget")
        if self.full_acc_epochs < 1:
            raise ValueError(f"full_acc_epochs={self.full_acc_epochs} must be at least 1")
        if self.full_acc_steps is not None and self.full_acc_steps < 1:
            raise ValueError(f"full_acc_steps={self.full_acc_steps} must be at least 1, or None to count epochs "
                             "(full_acc_epochs)")
        if not (self.l1 >= 0 and math.isfinite(self.l1)):
            raise ValueError(f"l1={self.l1} must be a finite number >= 0 (the L1 penalty strength lambda)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
        if self.ckpt_every_steps is not None and self.ckpt_every_steps < 1:
            raise ValueError(f"ckpt_every_steps={self.ckpt_every_steps} must be at least 1, or None")
        if not self.run_name or any(c in self.run_name for c in "/\\") or self.run_name in (".", ".."):
            raise ValueError(f"run_name={self.run_name!r} must be a non-empty folder name without slashes")
        self._validate_options(method)

    def _validate_options(self, method: Any) -> None:
        """Every option is some method's setting; each method that declares one checks its values, and this run's
        method checks its complete settings (e.g. guided's warm-up of at least 1 epoch)."""
        if not isinstance(self.options, dict):
            raise ValueError(f"options={self.options!r} must be a dict of method settings by name, e.g. "
                             "{'epsilon': 0.1}")
        check_option_names(self.options, "options")
        for _, other in METHODS.items():
            if other is method or any(k in settings_names(other) for k in self.options):
                settings = method_settings(other, self.options)
                if other is method:
                    method.check(settings)
                else:
                    settings.validate()

    # Fields that do not change a run's result: its name and folders, progress bars, extra checkpoints and test
    # evaluation, and the budgets (a run stopped by max_epochs or max_steps may be continued with a larger one).
    NOT_IDENTITY = ("run_name", "log_dir", "ckpt_dir", "progress", "ckpt_every_steps", "eval_test", "max_epochs",
                    "max_steps")
    # Fields added after greedymm 0.1, with the value that reproduces 0.1's behaviour: a run holding it leaves the
    # field out of its identity, so runs that do not use the new setting keep their names (and checkpoints).
    LEGACY = {"full_acc_steps": None, "fusion": "mmtm"}

    def settings(self) -> Any:
        """The settings dataclass of this run's method: `options` where they name its fields, defaults elsewhere."""
        return method_settings(METHODS.get(self.algorithm), self.options)

    def option(self, name: str) -> Any:
        """A method setting's value: `options[name]`, else the default of the methods that declare it."""
        if name in self.options:
            return self.options[name]
        defaults = option_defaults()
        if name not in defaults:
            raise ValueError(f"option {name!r} is declared by no method; allowed: {', '.join(defaults)}")
        return defaults[name]

    def identity(self) -> dict:
        """The settings that define a training run: every field that changes its result (see NOT_IDENTITY), flat,
        with this run's method settings (defaults filled) in place of `options`: another method's settings never
        make a run new."""
        shared = {k: v for k, v in to_dict(self).items() if k not in self.NOT_IDENTITY and k != "options"
                  and not (k in self.LEGACY and v == self.LEGACY[k])}
        return {**shared, **settings_identity(self.settings())}

    @classmethod
    def paper(cls, **overrides: Any) -> "TrainConfig":
        """SPEC Sec. 6: SGD lr 0.1, plateau schedule, 300 epochs (guided: epsilon 0.01, W 5, its defaults)."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> "TrainConfig":
        """A few-minute CPU run on the embedded dataset."""
        return cls(**{**QUICK_TRAIN, **overrides})

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> "TrainConfig":
        """The protocol of a dataset (its spec's `train_preset`): the paper's for ModelNet40 (SPEC Sec. 6) and the
        colored digits (SPEC Sec. 10: SGD momentum 0.9, lr 0.01, epsilon 0.1, W 5), `quick()`'s for the embedded
        dataset.

        Args:
            dataset: a registered dataset.
            overrides: fields to change; `options` are added to the preset's options.
        """
        preset = dict(DATASETS.get(dataset).train_preset)
        options = {**preset.pop("options", {}), **overrides.pop("options", {})}
        return cls(**{**preset, **overrides, "options": options})

    @classmethod
    def smoke(cls, **overrides: Any) -> "TrainConfig":
        """Seconds-long run for tests."""
        base = dict(lr=0.05, max_epochs=2, progress=False, eval_test=False)
        return cls(**{**base, **overrides})


def settings_names(method: Any) -> List[str]:
    """The field names of a method's settings dataclass (the options it reads)."""
    return [f.name for f in dataclasses.fields(method.Settings)]


def settings_identity(settings: Any) -> Dict[str, Any]:
    """A method's settings as they define a run: every field, less those that hold their `legacy` value (settings
    added after greedymm 0.1, at the value that reproduces it: see `greedymm.methods.base.setting`)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
            if not ("legacy" in f.metadata and getattr(settings, f.name) == f.metadata["legacy"])}


def method_settings(method: Any, options: Dict[str, Any]) -> Any:
    """A method's settings dataclass from `options`: the fields it declares, its defaults for the rest."""
    names = settings_names(method)
    return method.Settings(**{k: v for k, v in options.items() if k in names})


def option_defaults() -> Dict[str, Any]:
    """Every option a registered method declares, with its default (a setting several methods share, such as
    warmup_epochs, has one default: `greedymm.methods.register` checks it)."""
    defaults: Dict[str, Any] = {}
    for _, method in METHODS.items():
        for f in dataclasses.fields(method.Settings):
            defaults.setdefault(f.name, f.default_factory() if f.default is dataclasses.MISSING else f.default)
    return defaults


def check_option_names(names: Any, where: str) -> None:
    """Raise ValueError if a name is no registered method's setting, naming `where` it came from and the allowed."""
    declared = option_defaults()
    unknown = [k for k in names if k not in declared]
    if unknown:
        raise ValueError(f"{where} has {unknown}, which no method declares; allowed: {', '.join(declared)}")


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def settings_digest(data_cfg: DataConfig, train_cfg: TrainConfig, model: str = "") -> str:
    """8 hex digits of every setting that defines a run except its algorithm and seed (see `run_name`)."""
    identity = {"train": {k: v for k, v in train_cfg.identity().items() if k not in ("algorithm", "seed")},
                "data": data_cfg.identity(), "model": model}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def run_name(data_cfg: DataConfig, train_cfg: TrainConfig, model: str = "") -> str:
    """The folder name of a run under logging/ and checkpoints/: "{dataset}_{algorithm}_s{seed}_{digest}".

    The digest covers every other setting that changes the run's result (training, its method's settings, data and
    the model's name), so changing the learning rate, the batch size or the dataset's size makes a new run, not a
    resumed one.

    Args:
        data_cfg, train_cfg: the settings; train_cfg's algorithm and seed name the run.
        model: a name for a custom model factory ("" for the dataset's default model).
    Returns:
        e.g. "modelnet40_guided_s0_3f2a9c1b".
    """
    return f"{data_cfg.dataset}_{train_cfg.algorithm}_s{train_cfg.seed}_{settings_digest(data_cfg, train_cfg, model)}"
