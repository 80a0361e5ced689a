"""Settings for data and training (paper Sec. 4-5 and Appendix; SPEC.md Sec. 1 and 6).

Two dataclasses with one commented line per field, and presets: `paper()`, `quick()`, `smoke()`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

MODELNET_URL = "http://supermoe.cs.umass.edu/shape_recog/shaded_images.tar.gz"
# The rows of the paper's Table 1, in its order (SPEC Sec. 5 and 9). The first two train a uni-modal network on m0
# or m1; "rubi" is the RUBi baseline; the others train the two-branch network.
PAPER_ROWS = ("unimodal_m0", "unimodal_m1", "vanilla", "rubi", "random", "guided")
# Every training algorithm: the paper's rows, then the balancers from the related work (not in the paper; SPEC
# Sec. 12): "ogm_ge" (OGM-GE, Peng et al. 2022) and "gblend" (Gradient Blending, Wang et al. 2020).
BALANCERS = ("ogm_ge", "gblend")
ALGORITHMS = PAPER_ROWS + BALANCERS
# Algorithms that take re-balancing steps, which need the running means of at least one regular epoch first.
REBALANCING = ("random", "guided")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DATASETS = ("modelnet40", "embedded", "colored_mnist", "colored_digits")
DIGIT_DATASETS = ("colored_mnist", "colored_digits")  # view 0 colored digit (3 channels), view 1 gray digit (1)
# Views per object in each dataset's cache (the ModelNet40 renders and the embedded set have 12, the digits 2).
DATASET_VIEWS = {"modelnet40": 12, "embedded": 12, "colored_mnist": 2, "colored_digits": 2}
# What `views=None`, `image_size=None` and `val_fraction=None` resolve to. Renders: front/rear at 224 px, 20% of
# the training objects held out (SPEC Sec. 1). Digits: colored/gray at MNIST's 28 px; colored_mnist holds out 10,000
# of MNIST's 60,000 training digits, colored_digits 25% of the 80% left after its 20% test split (60/20/20).
DEFAULT_VIEWS = {"modelnet40": (0, 6), "embedded": (0, 6), "colored_mnist": (0, 1), "colored_digits": (0, 1)}
DEFAULT_IMAGE_SIZE = {"modelnet40": 224, "embedded": 224, "colored_mnist": 28, "colored_digits": 28}
DEFAULT_VAL_FRACTION = {"modelnet40": 0.2, "embedded": 0.2, "colored_mnist": 1 / 6, "colored_digits": 0.25}
# What `url=""` resolves to; colored_mnist keeps "": torchvision's MNIST mirrors, looked up when downloading.
DEFAULT_URL = {"modelnet40": MODELNET_URL, "embedded": "", "colored_mnist": "", "colored_digits": ""}
# What `data_dir=""` resolves to; "data" is torchvision's usual root (MNIST's files in data/MNIST/raw/).
DEFAULT_DATA_DIR = {"modelnet40": "ModelNet", "embedded": "ModelNet", "colored_mnist": "data", "colored_digits": "data"}


@dataclass
class DataConfig:
    """Where the two-view data comes from and how it is batched (SPEC Sec. 1, 10 and 11).

    `views`, `image_size`, `val_fraction`, `url` and `data_dir` left at None / "" take the dataset's defaults
    (DEFAULT_*), resolved when the config is made: a config always holds concrete values. To switch the dataset
    of an existing config, pass those fields as None / "" again, e.g. `dataclasses.replace(cfg, dataset=...,
    views=None, ...)`, or use `DataConfig.for_dataset`.
    """

    dataset: str = "modelnet40"  # "modelnet40" (the paper's), "embedded" (generated), "colored_mnist", "colored_digits"
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
            if self.views is None:
                self.views = DEFAULT_VIEWS[self.dataset]
            if self.image_size is None:
                self.image_size = DEFAULT_IMAGE_SIZE[self.dataset]
            if self.val_fraction is None:
                self.val_fraction = DEFAULT_VAL_FRACTION[self.dataset]
            if not self.url:
                self.url = DEFAULT_URL[self.dataset]
            if not self.data_dir:
                self.data_dir = DEFAULT_DATA_DIR[self.dataset]
        if self.views is not None:
            self.views = tuple(int(v) for v in self.views)  # JSON round trips give lists
        self.mirrors = tuple(self.mirrors)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and what is allowed."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r} is unknown; allowed: {', '.join(DATASETS)}")
        if len(self.views) != 2:
            raise ValueError(f"views={self.views} must name exactly two view indices (m0, m1)")
        n_views = DATASET_VIEWS[self.dataset]
        for v in self.views:
            if not 0 <= v < n_views:
                raise ValueError(f"views={self.views}: each view index must be in 0..{n_views - 1} for "
                                 f"dataset={self.dataset!r} (views=None takes its default, "
                                 f"{DEFAULT_VIEWS[self.dataset]})")
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

    # Fields that only matter to some datasets: left out of the others' identity.
    DATASET_ONLY = {"embedded_per_class": ("embedded",), "embedded_test_per_class": ("embedded",),
                    "embedded_seed": ("embedded",), "color_match": DIGIT_DATASETS,
                    "color_noise_var": DIGIT_DATASETS, "color_seed": DIGIT_DATASETS}

    def identity(self) -> dict:
        """The settings that define a run's data: every field that changes its result (see NOT_IDENTITY and
        DATASET_ONLY)."""
        return {k: v for k, v in to_dict(self).items() if k not in self.NOT_IDENTITY
                and self.dataset in self.DATASET_ONLY.get(k, (self.dataset,))}

    @classmethod
    def paper(cls, **overrides: Any) -> "DataConfig":
        """ModelNet40 front/rear views at 224 px, batch 8 (SPEC Sec. 1 and 6)."""
        return cls(**overrides)

    @classmethod
    def for_dataset(cls, name: str, **overrides: Any) -> "DataConfig":
        """The paper's settings for dataset `name`: renders at batch 8 (SPEC Sec. 6), digits at batch 128 (Sec. 10).

        Args:
            name: one of DATASETS.
            overrides: further fields.
        Returns:
            The config; views, image size and validation share are the dataset's defaults unless overridden.
        """
        if name not in DATASETS:
            raise ValueError(f"dataset={name!r} is unknown; allowed: {', '.join(DATASETS)}")
        base: dict = dict(dataset=name)
        if name in DIGIT_DATASETS:
            base.update(batch_size=128, eval_batch_size=512)
        return cls(**{**base, **overrides})

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


# `TrainConfig.quick()`: the embedded dataset's few-minute CPU protocol
QUICK_TRAIN = dict(lr=0.05, momentum=0.9, max_epochs=8, plateau_patience=2)


@dataclass
class TrainConfig:
    """Optimisation, balancing and bookkeeping of one training run (SPEC Sec. 4-6)."""

    algorithm: str = "vanilla"  # one of ALGORITHMS: the Table-1 rows (SPEC Sec. 5 and 9)
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
    warmup_epochs: int = 1  # epochs of regular steps before guided/random balancing starts (at least 1 for them)
    epsilon: float = 0.01  # guided: imbalance tolerance on |d_speed|
    window: int = 5  # guided: re-balancing steps W taken once |d_speed| > epsilon
    rubi_bias: str = "m0"  # rubi: the bias modality whose branch feeds the bias-only classifier ("m0" or "m1")
    ogm_alpha: float = 0.1  # ogm_ge: alpha in k = 1 - tanh(alpha * rho) (theirs: 0.1-0.8; 0.1 damps near-ties little)
    ogm_start_epoch: int = 0  # ogm_ge: epochs trained before the modulation (and its GE noise) starts
    ogm_end_epoch: Optional[int] = None  # ogm_ge: modulation (and noise) ends after this many epochs (None: never)
    gblend_period: int = 3  # gblend: n, the epochs between two re-estimations of the blending weights
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
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r} is unknown; allowed: {', '.join(ALGORITHMS)}")
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
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be 0 or more")
        if self.algorithm in REBALANCING and self.warmup_epochs < 1:
            raise ValueError(f"warmup_epochs={self.warmup_epochs}: {self.algorithm} needs at least 1 warm-up epoch of "
                             "regular steps (its re-balancing steps use the running means of regular steps)")
        if not (self.l1 >= 0 and math.isfinite(self.l1)):
            raise ValueError(f"l1={self.l1} must be a finite number >= 0 (the L1 penalty strength lambda)")
        if self.rubi_bias not in ("m0", "m1"):
            raise ValueError(f"rubi_bias={self.rubi_bias!r} is unknown; allowed: 'm0', 'm1'")
        # the balancers' settings (SPEC Sec. 12)
        if not (self.ogm_alpha >= 0 and math.isfinite(self.ogm_alpha)):
            raise ValueError(f"ogm_alpha={self.ogm_alpha} must be a finite number >= 0 (0 modulates nothing: GE noise "
                             "only)")
        if self.ogm_start_epoch < 0:
            raise ValueError(f"ogm_start_epoch={self.ogm_start_epoch} must be 0 or more")
        if self.ogm_end_epoch is not None and self.ogm_end_epoch <= self.ogm_start_epoch:
            raise ValueError(f"ogm_end_epoch={self.ogm_end_epoch} must be greater than ogm_start_epoch="
                             f"{self.ogm_start_epoch} (the modulation runs in epochs start..end-1), or None for no end")
        if self.gblend_period < 1:
            raise ValueError(f"gblend_period={self.gblend_period} must be at least 1 (epochs between re-estimations)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
        if not (self.epsilon >= 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon={self.epsilon} must be a finite number >= 0 (the imbalance tolerance)")
        if self.window < 1:
            raise ValueError(f"window={self.window} must be at least 1 (re-balancing steps per window)")
        if self.ckpt_every_steps is not None and self.ckpt_every_steps < 1:
            raise ValueError(f"ckpt_every_steps={self.ckpt_every_steps} must be at least 1, or None")
        if not self.run_name or any(c in self.run_name for c in "/\\") or self.run_name in (".", ".."):
            raise ValueError(f"run_name={self.run_name!r} must be a non-empty folder name without slashes")

    # Fields that do not change a run's result: its name and folders, progress bars, extra checkpoints and test
    # evaluation, and the budgets (a run stopped by max_epochs or max_steps may be continued with a larger one).
    NOT_IDENTITY = ("run_name", "log_dir", "ckpt_dir", "progress", "ckpt_every_steps", "eval_test", "max_epochs",
                    "max_steps")

    # Fields that only matter to some algorithms: they are left out of the others' identity, so that changing
    # guided's epsilon, say, does not make the vanilla runs new runs.
    ALGORITHM_ONLY = {"epsilon": ("guided",), "window": ("guided",), "warmup_epochs": REBALANCING,
                      "rubi_bias": ("rubi",), "ogm_alpha": ("ogm_ge",), "ogm_start_epoch": ("ogm_ge",),
                      "ogm_end_epoch": ("ogm_ge",), "gblend_period": ("gblend",)}

    def identity(self) -> dict:
        """The settings that define a training run: every field that changes its result (see NOT_IDENTITY and
        ALGORITHM_ONLY)."""
        return {k: v for k, v in to_dict(self).items() if k not in self.NOT_IDENTITY
                and self.algorithm in self.ALGORITHM_ONLY.get(k, (self.algorithm,))}

    @classmethod
    def paper(cls, **overrides: Any) -> "TrainConfig":
        """SPEC Sec. 6: SGD lr 0.1, plateau schedule, 300 epochs, guided eps=0.01, W=5."""
        return cls(**overrides)

    @classmethod
    def quick(cls, **overrides: Any) -> "TrainConfig":
        """A few-minute CPU run on the embedded dataset."""
        return cls(**{**QUICK_TRAIN, **overrides})

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> "TrainConfig":
        """The protocol of a dataset: the paper's for ModelNet40 (SPEC Sec. 6) and the colored digits (SPEC Sec. 10:
        SGD momentum 0.9, lr 0.01, epsilon 0.1, W 5), `quick()`'s for the embedded dataset.

        Args:
            dataset: a DataConfig.dataset value.
            overrides: fields to change.
        """
        digits = dict(lr=0.01, momentum=0.9, epsilon=0.1, window=5)
        presets = {"modelnet40": {}, "colored_mnist": digits, "colored_digits": digits,
                   "embedded": QUICK_TRAIN}
        if dataset not in presets:
            raise ValueError(f"dataset={dataset!r} is unknown; allowed: {', '.join(presets)}")
        return cls(**{**presets[dataset], **overrides})

    @classmethod
    def smoke(cls, **overrides: Any) -> "TrainConfig":
        """Seconds-long run for tests."""
        base = dict(lr=0.05, max_epochs=2, progress=False, eval_test=False)
        return cls(**{**base, **overrides})


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def save_json(obj: Any, path: Path) -> None:
    """Write `obj` (a dataclass or dict) as JSON atomically: temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
