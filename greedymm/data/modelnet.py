"""ModelNet40 as the MVCNN 12-view shaded renders (SPEC Sec. 1): the class list, finding the class folders
whatever the archive's top folder is called, getting the renders (placed by hand, unpacked, or downloaded), their
cache, and the dataset's spec (front and rear views, ImageNet-normalised, flipped in training; ResNet18 branches).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence

from ..config import DataConfig
from .cache import cache_is_current, read_manifest
from .download import ARCHIVE_SUFFIXES, DownloadError, download, safe_extract
from .png_tree import build_cache
from .registry import DatasetSpec, InputFormat, register_dataset

log = logging.getLogger(__name__)

MODELNET_URL = "http://supermoe.cs.umass.edu/shape_recog/shaded_images.tar.gz"
ARCHIVE_NAME = "shaded_images.tar.gz"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The renders' input: gray renders repeated to 3 channels, ImageNet-normalised, flipped at random in training.
RENDERS = InputFormat(None, IMAGENET_MEAN, IMAGENET_STD, flip=True)
# The 40 ModelNet40 classes; a label is the index in this list (SPEC Sec. 1).
MODELNET40_CLASSES = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone",
    "cup", "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard",
    "lamp", "laptop", "mantel", "monitor", "night_stand", "person", "piano", "plant", "radio",
    "range_hood", "sink", "sofa", "stairs", "stool", "table", "tent", "toilet", "tv_stand", "vase",
    "wardrobe", "xbox",
)


def _is_class_dir(path: Path, wanted: set) -> bool:
    return path.name in wanted and ((path / "train").is_dir() or (path / "test").is_dir())


def find_class_root(root: Path, classes: Sequence[str] = MODELNET40_CLASSES, max_depth: int = 3) -> Optional[Path]:
    """The folder under `root` (or `root` itself) whose children are class folders with train/ or test/ inside.

    Where several folders qualify, the one with the most class folders wins, then the shallowest, then the first
    by name. Hidden folders (unfinished extractions) are skipped.

    Args:
        root: where to look.
        classes: the class names to recognise.
        max_depth: how many folder levels below `root` to search.
    Returns:
        The folder, or None if there is none.
    """
    root, wanted = Path(root), set(classes)
    best, best_key = None, None
    level: List[Path] = [root] if root.is_dir() else []
    for depth in range(max_depth + 1):
        deeper = []
        for folder in sorted(level):
            try:
                subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:  # unreadable: cannot hold the renders we could use
                continue
            hits = sum(_is_class_dir(p, wanted) for p in subdirs)
            if hits:
                key = (-hits, depth, str(folder))
                if best_key is None or key < best_key:
                    best, best_key = folder, key
                continue  # the class folders themselves hold no further class roots
            deeper.extend(subdirs)
        level = deeper
    if best is not None and -best_key[0] < len(wanted):
        log.warning("%s holds only %d of the %d class folders", best, -best_key[0], len(wanted))
    return best


def _pick_archive(data_dir: Path) -> Optional[Path]:
    """An archive the user placed in `data_dir`: the expected name first, else the first by name."""
    archives = sorted(p for p in data_dir.iterdir() if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
    preferred = [p for p in archives if p.name == ARCHIVE_NAME]
    return (preferred or archives or [None])[0]


def _stem(archive: Path) -> str:
    return next(archive.name[: -len(s)] for s in ARCHIVE_SUFFIXES if archive.name.endswith(s))


def ensure_modelnet(cfg: DataConfig, progress: bool = True, retries: int = 5, backoff: float = 1.0,
                    timeout: float = 30) -> Path:
    """The folder holding the ModelNet40 class folders, found under `cfg.data_dir`, unpacked, or downloaded.

    In order: an unpacked folder anywhere under `data_dir` (a few levels deep, any name); an archive
    (*.tar.gz, *.tgz, *.tar) placed in `data_dir`, unpacked beside it; else a download of
    `[cfg.url, *cfg.mirrors]` to `{data_dir}/shaded_images.tar.gz`, checked against `cfg.sha256`, then unpacked.

    Args:
        cfg: data settings (`data_dir`, `url`, `mirrors`, `sha256`).
        progress: tqdm bars.
        retries, backoff, timeout: per-URL tries, first back-off and request timeout in seconds (see `download`).
    Returns:
        The class root, e.g. `ModelNet/shaded_images/modelnet40_images_new_12x`.
    Raises:
        DownloadError: every URL failed; the message says how to provide the data by hand.
    """
    data_dir = Path(cfg.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    root = find_class_root(data_dir)
    if root is not None:
        log.info("using the renders in %s", root)
        return root
    archive = _pick_archive(data_dir)
    if archive is not None:
        log.info("unpacking %s, found in %s", archive.name, data_dir)
    else:
        urls = [cfg.url, *cfg.mirrors]
        log.info("no renders or archive in %s: downloading %s", data_dir, ", ".join(urls))
        try:
            archive = download(urls, data_dir / ARCHIVE_NAME, sha256=cfg.sha256, timeout=timeout, retries=retries,
                               backoff=backoff, progress=progress)
        except DownloadError as e:
            raise DownloadError(
                f"{e}\nThe public link has been reported dead at times. Alternatives:\n"
                f"  1. download {ARCHIVE_NAME} by other means and place it in {data_dir}/ (it is unpacked for you);\n"
                f"  2. place the unpacked folder (the one holding airplane/, bathtub/, ...) in {data_dir}/;\n"
                f"  3. pass other URLs: DataConfig(url=..., mirrors=(...)).") from None
    unpacked = safe_extract(archive, data_dir / _stem(archive), progress=progress)
    root = find_class_root(unpacked)
    if root is None:
        raise FileNotFoundError(f"{archive} holds no ModelNet40 class folders (airplane/, bathtub/, ... with train/ "
                                f"and test/ inside); its contents are in {unpacked}")
    log.info("using the renders in %s", root)
    return root


def build_modelnet_cache(cfg: DataConfig, cache_dir: Path, force: bool = False, progress: bool = True) -> Path:
    """The ModelNet40 cache: reused when current; a complete cache whose source renders were deleted afterwards is
    used as it is; else the renders are found, unpacked or downloaded (`ensure_modelnet`) and cached.

    Args:
        cfg: the data config (data_dir, url, mirrors, sha256, image_size, cache_workers).
        cache_dir: the cache folder.
        force: rebuild even if a current cache exists.
        progress: tqdm bars.
    Returns:
        cache_dir.
    """
    if not force:
        manifest = read_manifest(cache_dir) or {}
        root = manifest.get("source", {}).get("root")
        expected = {"classes": list(MODELNET40_CLASSES), "image_size": cfg.image_size, "source": {"kind": "png_tree"}}
        if root and not Path(root).exists() and cache_is_current(cache_dir, expected):
            log.info("using the cache in %s (its source renders %s are gone)", cache_dir, root)
            return cache_dir
    image_root = ensure_modelnet(cfg, progress=progress)
    return build_cache(image_root, cache_dir, MODELNET40_CLASSES, image_size=cfg.image_size,
                       force=force, workers=cfg.cache_workers, progress=progress)


# SPEC Sec. 1 and 6: views 0 (front) and 6 (rear) at 224 px, 20% of the training objects held out, batch 8, the
# paper's protocol (TrainConfig's defaults).
register_dataset(DatasetSpec(
    name="modelnet40", num_views=12, default_views=(0, 6), image_size=224, val_fraction=0.2, input_format=RENDERS,
    cache_builder="greedymm.data.modelnet:build_modelnet_cache", default_model="resnet18", family="renders",
    identical_view=0, url=MODELNET_URL, data_dir="ModelNet", cache_prefix="npy", paper_column="modelnet40",
    order=0))
