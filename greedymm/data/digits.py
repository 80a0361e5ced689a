"""Colored-and-gray MNIST and the scikit-learn digits (SPEC Sec. 10; paper Sec. 6.1 after Kim et al. 2019), registered
as "colored_mnist" and "colored_digits": view 0 (m0) is the digit painted in one color, view 1 (m1) the same digit in
gray; the color is the class's in training, a random class's in validation and test.
"""
from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..config import DataConfig
from .cache import cache_is_current, split_indices, write_cache
from .download import DownloadError, download
from .registry import DatasetSpec, InputFormat, register_dataset

log = logging.getLogger(__name__)

DIGIT_DATASETS = ("colored_mnist", "colored_digits")  # view 0 colored digit (3 channels), view 1 gray digit (1)
DIGITS_VERSION = 1  # bump whenever a change alters the cached pixels, colors or splits: older caches are rebuilt
DIGIT_CLASSES = tuple(str(d) for d in range(10))
# The ten class colors (RGB, 0..1) of digits 0..9: red, green, blue, yellow, magenta, cyan, white (the seven bright
# corners of the color cube), rose, mint, lilac. A color multiplies the gray intensity, so none is dark; every two
# are at least 0.71 apart (the noise has std 0.17 per channel by default).
CLASS_COLORS = np.array([
    (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 1.0),
    (0.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (0.5, 1.0, 0.5), (0.5, 0.5, 1.0),
], dtype=np.float32)
VIEW_NAMES = ("colored", "gray")  # view 0 = m0, view 1 = m1
MNIST_SIZE = 28  # MNIST's images are 28 x 28; its digits fill a centred 20 x 20 box
MNIST_BOX = 20
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DIGITS_TEST_FRACTION = 0.2  # colored_digits: share of the 1,797 digits held out as the test split
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}  # each split's colors come from their own generator
_CHUNK = 8192  # digits painted at a time (bounds the float32 temporaries)


class DigitsError(ValueError):
    """An MNIST file that cannot be used; the message names the file and what to do."""


def paint(gray: np.ndarray, labels: np.ndarray, rng: np.random.Generator, match: float,
          noise_var: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint gray digits in one color each: colored = gray x color, per channel (SPEC Sec. 10).

    A digit takes its class color with probability `match`, else the color of a uniformly random class (its own
    with probability 1/10); then Gaussian noise of variance `noise_var` is added to each channel, clipped to 0..1.
    match = 1 is the training protocol, match = 0 the validation and test one.

    Args:
        gray: (N, H, W) uint8 gray digits.
        labels: (N,) class indices in 0..9.
        rng: the generator of the color classes and the noise (its state advances).
        match: share of digits painted in their class color, in [0, 1].
        noise_var: variance of the noise per channel, on the 0..1 scale.
    Returns:
        colored (N, 3, H, W) uint8 = round(gray * color), color (N, 3) float32 in [0, 1], color_class (N,) int64.
    """
    gray, labels = np.asarray(gray), np.asarray(labels, dtype=np.int64)
    if gray.dtype != np.uint8 or gray.ndim != 3 or labels.shape != gray.shape[:1]:
        raise ValueError(f"gray must be uint8 (N, H, W) with labels (N,); got {gray.dtype} {gray.shape}, "
                         f"labels {labels.shape}")
    if not 0.0 <= match <= 1.0 or not noise_var >= 0:
        raise ValueError(f"match={match} must be in [0, 1] and noise_var={noise_var} >= 0")
    n = len(labels)
    # All draws first, in a fixed order: the colors do not depend on how the painting is chunked.
    own = rng.random(n) < match
    color_class = np.where(own, labels, rng.integers(0, len(CLASS_COLORS), n)).astype(np.int64)
    noise = rng.normal(0.0, np.sqrt(noise_var), (n, 3)).astype(np.float32)
    color = np.clip(CLASS_COLORS[color_class] + noise, 0.0, 1.0)  # (N, 3)
    colored = np.empty((n, 3) + gray.shape[1:], np.uint8)
    for i in range(0, n, _CHUNK):
        g = gray[i:i + _CHUNK, None].astype(np.float32)  # (n, 1, H, W)
        colored[i:i + _CHUNK] = np.rint(g * color[i:i + _CHUNK, :, None, None])  # (n, 3, H, W), <= 255
    return colored, color, color_class


def digits_source(cfg: DataConfig) -> dict:
    """What a digit cache is built from, apart from MNIST's files; a cache recording other settings is rebuilt.

    Args:
        cfg: the data config (dataset, image_size, val_fraction, split_seed and the color_* fields count).
    Returns:
        {"kind", "version", "image_size", "val_fraction", "split_seed", "color_match", "color_noise_var",
        "color_seed"}.
    """
    return {"kind": cfg.dataset, "version": DIGITS_VERSION, "image_size": cfg.image_size,
            "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "color_match": cfg.color_match,
            "color_noise_var": cfg.color_noise_var, "color_seed": cfg.color_seed}


def _resize(gray: np.ndarray, size: int, box: int) -> np.ndarray:
    """(N, h, w) uint8 -> (N, size, size): each digit resized (bilinear) to box x box, centred on black."""
    if gray.shape[1:] == (box, box) and box == size:
        return gray
    out = np.zeros((len(gray), size, size), np.uint8)
    top = (size - box) // 2
    for i, g in enumerate(gray):
        out[i, top:top + box, top:top + box] = np.asarray(Image.fromarray(g).resize((box, box), Image.BILINEAR))
    return out


def load_sklearn_digits(image_size: int = MNIST_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 handwritten digits bundled with scikit-learn, laid out as MNIST's.

    Each digit (16 gray levels) is scaled to 0..255 and upsampled (bilinear) into a centred box of 20/28 of the
    image side, as MNIST fits its digits into a 20 x 20 box centred in 28 x 28.

    Args:
        image_size: side of the output images (28 = MNIST's).
    Returns:
        gray (1797, image_size, image_size) uint8, labels (1797,) int64.
    """
    try:
        from sklearn.datasets import load_digits  # imported here: only this dataset needs scikit-learn
    except ImportError:
        raise ImportError("dataset 'colored_digits' needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    gray = np.rint(np.asarray(digits.images, np.float64) * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    box = max(1, round(image_size * MNIST_BOX / MNIST_SIZE))
    return _resize(gray, image_size, box), np.asarray(digits.target, np.int64)


# ---------------------------------------------------------------------------------------------------------------
# MNIST's IDX files


def mnist_resources() -> Tuple[List[str], Dict[str, str]]:
    """torchvision's MNIST mirrors (base URLs) and the md5 of each gzipped file, so that both follow torchvision.

    Returns:
        (mirrors, {"train-images-idx3-ubyte.gz": md5, ...}).
    """
    from torchvision.datasets import MNIST  # imported here: torch is heavy and only a download needs it

    return list(MNIST.mirrors), {name: md5 for name, md5 in MNIST.resources}


def mnist_search_dirs(data_dir: Path) -> List[Path]:
    """Where MNIST's files are looked for: `data_dir` itself, then `data_dir/MNIST/raw` (torchvision's place)."""
    return [Path(data_dir), Path(data_dir) / "MNIST" / "raw"]


def find_mnist_file(data_dir: Path, name: str) -> Optional[Path]:
    """The IDX file `name` (uncompressed, else `name`.gz) in the first of `mnist_search_dirs` holding it, or None."""
    for folder in mnist_search_dirs(data_dir):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: Path, kind: str) -> np.ndarray:
    """Read an MNIST IDX file (gzipped or not), checking its magic number, shape and size.

    Args:
        path: the file.
        kind: "images" (uint8, (N, 28, 28)) or "labels" (uint8, (N,), values 0..9).
    Returns:
        The array, uint8.
    Raises:
        DigitsError: naming the file, what is wrong and what to do.
    """
    path = Path(path)
    ndim = {"images": 3, "labels": 1}[kind]
    fix = (f"delete {path} (it is downloaded again) or replace it with the original MNIST file "
           f"({path.name.removesuffix('.gz')} or its .gz)")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut gzip raises EOFError
        raise DigitsError(f"{path} cannot be read ({e}); {fix}") from None
    head = 4 + 4 * ndim
    if len(data) < head or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        magic = data[:4].hex() if len(data) >= 4 else f"{len(data)} bytes"
        raise DigitsError(f"{path} is not an IDX file of MNIST {kind}: magic number {magic}, expected "
                          f"0000080{ndim}; {fix}")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = head + int(np.prod(dims))
    if len(data) != expected:
        raise DigitsError(f"{path} holds {len(data)} bytes but its header announces {dims} ({expected} bytes): "
                          f"the file is truncated or corrupt; {fix}")
    if kind == "images" and dims[1:] != (MNIST_SIZE, MNIST_SIZE):
        raise DigitsError(f"{path} holds {dims[1]}x{dims[2]} images; MNIST's are {MNIST_SIZE}x{MNIST_SIZE}; {fix}")
    array = np.frombuffer(data, np.uint8, offset=head).reshape(dims)
    if kind == "labels" and dims[0] and array.max() > 9:
        raise DigitsError(f"{path} holds label {array.max()}; MNIST's labels are 0..9; {fix}")
    return array


def ensure_mnist(cfg: DataConfig, progress: bool = True, retries: int = 5, backoff: float = 1.0,
                 timeout: float = 30) -> Dict[str, Path]:
    """MNIST's four IDX files: found under `cfg.data_dir` (see `find_mnist_file`), else downloaded.

    A missing file is downloaded (gzipped, md5-checked against torchvision's list) to `{data_dir}/MNIST/raw/`
    from `cfg.url` (a base URL) or, when it is "", torchvision's mirrors, then from `cfg.mirrors`.

    Args:
        cfg: data settings (`data_dir`, `url`, `mirrors`).
        progress: tqdm bars.
        retries, backoff, timeout: see `download`.
    Returns:
        {file name without .gz: path}.
    Raises:
        DownloadError: every URL failed; the message says how to provide the files by hand.
    """
    data_dir = Path(cfg.data_dir)
    names = [name for pair in MNIST_FILES.values() for name in pair]
    found = {name: find_mnist_file(data_dir, name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        mirrors, md5 = mnist_resources()
        bases = [b if b.endswith("/") else b + "/" for b in ([cfg.url] if cfg.url else mirrors) + list(cfg.mirrors)]
        raw = mnist_search_dirs(data_dir)[1]
        for name in missing:
            log.info("%s not found under %s: downloading it", name, data_dir)
            try:
                found[name] = download([base + f"{name}.gz" for base in bases], raw / f"{name}.gz",
                                       md5=md5.get(f"{name}.gz"), timeout=timeout, retries=retries,
                                       backoff=backoff, progress=progress)
            except DownloadError as e:
                raise DownloadError(
                    f"{e}\nAlternatives: download MNIST's four files ({', '.join(names)}, gzipped or not) by other "
                    f"means and place them in {data_dir}/ or {raw}/; or pass another base URL: "
                    "DataConfig(url=..., mirrors=(...)); or use dataset='colored_digits' (offline).") from None
    return found


def _mnist_arrays(files: Dict[str, Path]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """{"train": (images (N, 28, 28), labels (N,)), "test": (...)} read from the IDX files."""
    out = {}
    for split, (images_name, labels_name) in MNIST_FILES.items():
        images, labels = read_idx(files[images_name], "images"), read_idx(files[labels_name], "labels")
        if len(images) != len(labels) or not len(images):
            raise DigitsError(f"{files[images_name]} holds {len(images)} images but {files[labels_name]} "
                              f"{len(labels)} labels; both must hold the same number (> 0) of {split} digits")
        out[split] = images, labels.astype(np.int64)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The data sets


Split = Tuple[np.ndarray, np.ndarray, List[str]]  # images, labels (N,), names


def _gray_splits(cfg: DataConfig, files: Optional[Dict[str, Path]]) -> Dict[str, Split]:
    """Gray digits (N, H, W), labels and names of the train / val / test splits (before painting)."""
    if cfg.dataset == "colored_digits":
        gray, labels = load_sklearn_digits(cfg.image_size)
        rest, test = split_indices(len(labels), DIGITS_TEST_FRACTION, cfg.split_seed)
        train, val = (rest[i] for i in split_indices(len(rest), cfg.val_fraction, cfg.split_seed))
        picks = {"train": train, "val": val, "test": test}
        return {s: (gray[i], labels[i], [f"digits_{k:04d}" for k in i]) for s, i in picks.items()}
    arrays = _mnist_arrays(files)
    box = cfg.image_size  # MNIST's digits are already boxed: the whole image is resized
    train, val = split_indices(len(arrays["train"][1]), cfg.val_fraction, cfg.split_seed)
    picks = {"train": ("train", train), "val": ("train", val),
             "test": ("test", np.arange(len(arrays["test"][1]), dtype=np.int64))}
    return {s: (_resize(arrays[src][0][i], cfg.image_size, box), arrays[src][1][i],
                [f"mnist_{src}_{k:05d}" for k in i]) for s, (src, i) in picks.items()}


def make_digit_splits(cfg: DataConfig, files: Optional[Dict[str, Path]] = None
                      ) -> Tuple[Dict[str, Split], Dict[str, Dict[str, np.ndarray]]]:
    """Build the three splits in memory: view 0 the painted digit, view 1 the gray digit (as 3 equal channels).

    Args:
        cfg: the data config (see `digits_source`).
        files: colored_mnist: MNIST's IDX files (see `ensure_mnist`); unused for colored_digits.
    Returns:
        (splits, extras): splits {"train", "val", "test": (images (N, 2, 3, H, W) uint8, labels (N,), names)},
        extras {split: {"color": (N, 3) float32, "color_class": (N,) int64}}: the painted color and the class it
        was drawn from.
    """
    if cfg.dataset not in DIGIT_DATASETS:
        raise ValueError(f"dataset={cfg.dataset!r} is not a digit dataset; allowed: {', '.join(DIGIT_DATASETS)}")
    splits, extras = {}, {}
    for split, (gray, labels, names) in _gray_splits(cfg, files).items():
        rng = np.random.default_rng([cfg.color_seed, _SPLIT_CODE[split]])
        match = cfg.color_match if split == "train" else 0.0  # validation and test: a random class's color
        colored, color, color_class = paint(gray, labels, rng, match, cfg.color_noise_var)
        images = np.empty((len(labels), 2, 3) + gray.shape[1:], np.uint8)
        images[:, 0] = colored
        images[:, 1] = gray[:, None]  # gray stored as 3 equal channels: one (N, V, C, H, W) array for both views
        splits[split] = images, labels, names
        extras[split] = {"color": color, "color_class": color_class}
    return splits, extras


def build_digits_cache(cfg: DataConfig, cache_dir: Path, force: bool = False, progress: bool = True) -> Path:
    """Reuse the digit cache in `cache_dir` if it is current, else build it there (colored_mnist: from MNIST's files,
    found or downloaded; colored_digits: from scikit-learn, offline).

    A colored_mnist cache records MNIST's file sizes; when the files are gone, a cache built with the same settings
    is used as it is.

    Args:
        cfg: the data config (see `digits_source` for what makes a cache current).
        cache_dir: the cache folder (written atomically, manifest last).
        force: build and rewrite even if a current cache exists.
        progress: tqdm bars while downloading.
    Returns:
        cache_dir.
    """
    cache_dir = Path(cache_dir)
    source = digits_source(cfg)
    expected = {"classes": list(DIGIT_CLASSES), "splits": ["train", "val", "test"], "source": source}
    files = None
    if cfg.dataset == "colored_mnist":
        names = [name for pair in MNIST_FILES.values() for name in pair]
        if not force and all(find_mnist_file(Path(cfg.data_dir), n) is None for n in names) \
                and cache_is_current(cache_dir, expected):
            log.info("using the cache in %s (MNIST's files are gone)", cache_dir)
            return cache_dir
        files = ensure_mnist(cfg, progress=progress)
        source = {**source, "files": {name: files[name].stat().st_size for name in names}}
        expected["source"] = source
    if not force and cache_is_current(cache_dir, expected):
        log.info("using the cache in %s", cache_dir)
        return cache_dir
    log.info("building the %s cache in %s", cfg.dataset, cache_dir)
    splits, extras = make_digit_splits(cfg, files)
    return write_cache(cache_dir, splits, DIGIT_CLASSES, source, extras)


# MNIST's gray-level mean and std (on 0..1), the usual MNIST normalisation, applied to every channel of both digit
# views: one affine map for all splits and both modalities, so colored = gray x color still holds after it.
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
DIGITS = InputFormat((3, 1), MNIST_MEAN, MNIST_STD, flip=False)  # a flipped digit is another glyph: no flip
# SPEC Sec. 10: colored and gray digits at MNIST's 28 px, four-layer conv branches, batch 128 (evaluation 512), SGD
# lr 0.01 with momentum 0.9, guided epsilon 0.1 and W 5. colored_mnist holds out 10,000 of MNIST's 60,000 training
# digits; colored_digits 25% of the 80% left after its 20% test split (60/20/20). Both face the paper's column.
# The stop rule "5 epochs at 100% training accuracy" (Sec. 6) counts MNIST's steps (5 x 391): the stand-in's
# 9-step epochs would otherwise end a run after ~200 steps while test accuracy still rises, before guided converges.
MNIST_STEPS_PER_EPOCH = 391  # 50,000 D_train digits at batch 128
FULL_ACC_STEPS = 5 * MNIST_STEPS_PER_EPOCH
# Epochs of the stand-in's preset: guided's test accuracy gains less than a point per 10 epochs by then (3 seeds).
DIGITS_MAX_EPOCHS = 150
for _order, _name, _val_fraction in ((2, "colored_mnist", 1 / 6), (3, "colored_digits", 0.25)):
    register_dataset(DatasetSpec(
        name=_name, num_views=2, default_views=(0, 1), image_size=MNIST_SIZE, val_fraction=_val_fraction,
        input_format=DIGITS, cache_builder="greedymm.data.digits:build_digits_cache", default_model="digits",
        family="digits", identical_view=1, data_preset=dict(batch_size=128, eval_batch_size=512),
        train_preset=dict(lr=0.01, momentum=0.9, full_acc_steps=FULL_ACC_STEPS, options=dict(epsilon=0.1, window=5),
                          **({"max_epochs": DIGITS_MAX_EPOCHS} if _name == "colored_digits" else {})),
        paper_column="colored_mnist",
        own_fields=("color_match", "color_noise_var", "color_seed"), preview="pairs", order=_order))
