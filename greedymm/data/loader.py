"""Two-view batches from the .npy cache (SPEC Sec. 1): m0 = view 0 (front), m1 = view 6 (rear), a fixed seeded
20% validation split, ImageNet normalisation and a random horizontal flip drawn independently per view.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import DataConfig
from .cache import build_cache, cache_is_current, open_split, read_manifest
from .modelnet import MODELNET40_CLASSES

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUTS = ("float", "uint8")
_ORDER_KEY, _FLIP_KEY = 0, 1  # high word of the Philox key: the order and flip streams never coincide


def cache_dir_for(cfg: DataConfig) -> Path:
    """The cache folder of a data config: `{data_dir}/npy_{size}px` or `{data_dir}/embedded_npy_{size}px`."""
    prefix = "embedded_npy" if cfg.dataset == "embedded" else "npy"
    return Path(cfg.data_dir) / f"{prefix}_{cfg.image_size}px"


def prepare_data(cfg: DataConfig, progress: bool = True) -> Path:
    """Download and cache the data as needed; `cfg.make_npy_files` forces the cache to be rebuilt.

    A complete ModelNet40 cache whose source renders were deleted afterwards is used as it is.

    Args:
        cfg: the data config.
        progress: show tqdm bars.
    Returns:
        The cache folder (see `cache_dir_for`).
    """
    cache_dir = cache_dir_for(cfg)
    if cfg.dataset == "embedded":
        from . import embedded  # imported here: only this dataset needs it

        return embedded.build_embedded_cache(cfg, cache_dir, force=cfg.make_npy_files, progress=progress)
    if not cfg.make_npy_files:
        manifest = read_manifest(cache_dir) or {}
        root = manifest.get("source", {}).get("root")
        expected = {"classes": list(MODELNET40_CLASSES), "image_size": cfg.image_size, "source": {"kind": "png_tree"}}
        if root and not Path(root).exists() and cache_is_current(cache_dir, expected):
            log.info("using the cache in %s (its source renders %s are gone)", cache_dir, root)
            return cache_dir
    from .modelnet import ensure_modelnet  # imported here: the embedded dataset never downloads

    image_root = ensure_modelnet(cfg, progress=progress)
    return build_cache(image_root, cache_dir, MODELNET40_CLASSES, image_size=cfg.image_size,
                       force=cfg.make_npy_files, workers=cfg.cache_workers, progress=progress)


def split_indices(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """The fixed seeded validation split of the n training objects (SPEC Sec. 1).

    Args:
        n: number of training objects (at least 2).
        val_fraction: share held out for validation, in (0, 1); rounded, at least 1 and at most n - 1 objects.
        seed: seed of the shuffle.
    Returns:
        (train, val): sorted int64 index arrays, disjoint, together 0..n-1; train is D_train.
    """
    if n < 2:
        raise ValueError(f"n={n}: at least 2 training objects are needed to hold out a validation split")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def _philox(seed: int, stream: int, epoch: int, batch: int) -> np.random.Generator:
    """A counter-based generator whose draws depend on (seed, stream, epoch, batch) alone, whoever draws them."""
    return np.random.Generator(np.random.Philox(key=seed + (stream << 64), counter=(batch << 128) + (epoch << 192)))


class _BatchSource:
    """Makes batch b of the current epoch; picklable (a memmap travels as its file name) for loader workers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, views: Tuple[int, int], batch_size: int,
                 augment: bool, seed: int, finish: bool, output: str) -> None:
        self.mapped = None
        if isinstance(images, np.memmap) and images.filename is not None and images.flags.c_contiguous \
                and images.offset + images.nbytes == Path(images.filename).stat().st_size:
            self.mapped = (images.filename, images.offset, images.shape)
        self.images = images.view(np.ndarray)  # plain ndarray: fancy indexing skips the memmap subclass
        self.labels = labels
        self.views = np.asarray(views, dtype=np.int64)[:, None]  # (2, 1) broadcasts against (1, B)
        self.batch_size, self.augment, self.seed, self.finish, self.output = batch_size, augment, seed, finish, output
        self.order = np.zeros(0, dtype=np.int64)
        self.epoch = 0
        self.n_batches = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.mapped is not None:
            state["images"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.images is None:
            filename, offset, shape = self.mapped
            self.images = np.memmap(filename, np.uint8, "r", offset, shape).view(np.ndarray)

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, b: int) -> tuple:
        """(x0, x1, y) when `finish`, else (x (2, B, C, H, W) uint8, flips (2, B) bool or None, y)."""
        idx = self.order[b * self.batch_size:(b + 1) * self.batch_size]  # (B,)
        if (idx[1:] >= idx[:-1]).all():
            x = self.images[idx[None, :], self.views]  # (2, B, C, H, W)
        else:  # read in file order for locality, then restore the batch order
            sort = np.argsort(idx)
            x = self.images[idx[sort][None, :], self.views][:, np.argsort(sort)]
        y = torch.from_numpy(self.labels[idx])
        if not self.augment:
            flips = None
        else:
            flips = _philox(self.seed, _FLIP_KEY, self.epoch, b).random((2, len(idx))) < 0.5  # (view, sample)
        if not self.finish:
            return torch.from_numpy(x), None if flips is None else torch.from_numpy(flips), y
        if flips is not None and flips.any():
            v, s = np.nonzero(flips)
            x[v, s] = x[v, s, ..., ::-1]  # horizontal flip of the chosen views, in uint8 before the float pass
        return finish_batch(torch.from_numpy(x), None, self.output) + (y,)


def finish_batch(x: torch.Tensor, flips: Optional[torch.Tensor], output: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flip and normalise a gathered batch on its device (the GPU when training there).

    Args:
        x: (2, B, C, H, W) uint8, the two views of B objects.
        flips: (2, B) bool on x's device, True where the view is flipped horizontally; None for no flips.
        output: "float" for (B, 3, H, W) float32 ImageNet-normalised views, "uint8" for (B, C, H, W) raw ones.
    Returns:
        (x0, x1), each contiguous.
    """
    if flips is not None:  # no host sync: flip all, keep what is asked
        x = torch.where(flips[:, :, None, None, None], x.flip(-1), x)
    if output == "uint8":
        return x[0], x[1]
    scale, shift = _affine(x.device)
    two, b, _, h, w = x.shape
    out = torch.empty((two, b, 3, h, w), dtype=torch.float32, device=x.device)
    torch.mul(x, scale, out=out)  # uint8 -> float and (gray C = 1) -> 3 channels in one pass
    out.add_(shift)
    return out[0], out[1]


_AFFINE: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}


def _affine(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 - mean) / std as x * scale + shift, both (1, 1, 3, 1, 1), cached per device."""
    if device not in _AFFINE:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
        scale, shift = 1.0 / (255.0 * std), -mean / std
        _AFFINE[device] = tuple(t.float().view(1, 1, 3, 1, 1).to(device) for t in (scale, shift))
    return _AFFINE[device]


class TwoViewLoader:
    """Batches (x0, x1, y) of two views of the chosen objects, read straight from the memory-mapped cache.

    The sample order is a pure function of (seed, epoch), the flips of (seed, epoch, batch index), so
    `set_epoch(epoch, start_batch)` lets a resumed run see exactly the batches of one that never stopped.
    Each new iteration starts where `set_epoch` pointed (default epoch 0, batch 0), then moves on to the next epoch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: Optional[Sequence[int]] = None,
                 views: Tuple[int, int] = (0, 6), batch_size: int = 8, shuffle: bool = False, augment: bool = False,
                 seed: int = 0, device: Union[str, torch.device] = "cpu", output: str = "float",
                 num_workers: int = 0, drop_last: bool = False) -> None:
        """Args:
            images: (N, V, C, H, W) uint8 array, usually the cache's memmap; C is 1 (gray) or 3.
            labels: (N,) class indices.
            indices: the objects of this loader (indices into images); None for all.
            views: the view indices used as m0 and m1.
            batch_size: objects per batch.
            shuffle: reshuffle every epoch (else the order of `indices`).
            augment: random horizontal flip, p = 0.5, drawn independently per view and per sample.
            seed: seeds the order and the flips.
            device: where the batches are delivered; on CUDA, uint8 is shipped (pinned) and converted there.
            output: "float" (ImageNet-normalised float32, 3 channels) or "uint8" (raw, C channels).
            num_workers: loader worker processes (0 = load in this process).
            drop_last: drop the last, smaller batch.
        """
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 5 \
                or images.shape[2] not in (1, 3):
            raise ValueError(f"images must be a uint8 array (N, V, C, H, W) with C = 1 or 3; got "
                             f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
        n, n_views = images.shape[:2]
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels has shape {labels.shape}; expected ({n},), one per object")
        indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices)
        if indices.ndim != 1 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices must be a non-empty 1-D array of integers; got {indices.dtype} {indices.shape}")
        if indices.min() < 0 or indices.max() >= n:
            raise ValueError(f"indices must be in 0..{n - 1}; got values from {indices.min()} to {indices.max()}")
        views = tuple(int(v) for v in views)
        if len(views) != 2 or not all(0 <= v < n_views for v in views):
            raise ValueError(f"views={views} must be two view indices in 0..{n_views - 1}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is unknown; allowed: {', '.join(OUTPUTS)}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers={num_workers} must be 0 or more")
        self.indices = indices.astype(np.int64)
        self.views, self.batch_size, self.shuffle, self.augment = views, int(batch_size), bool(shuffle), bool(augment)
        self.seed = int(seed) % 2**64  # the low word of the Philox key
        self.device, self.output = torch.device(device), output
        self.num_workers, self.drop_last = int(num_workers), bool(drop_last)
        self._source = _BatchSource(images, labels, views, self.batch_size, self.augment, self.seed,
                                    finish=self.device.type == "cpu", output=output)
        self._epoch, self._start = 0, 0

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration yields."""
        return self._epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration yield epoch `epoch`'s batches from batch `start_batch` on.

        Args:
            epoch: epoch number (>= 0); with `seed` it fixes the order and the flips.
            start_batch: first batch to yield, in 0..len(self).
        """
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be 0 or more")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} must be in 0..{len(self)} (batches per epoch)")
        self._epoch, self._start = int(epoch), int(start_batch)

    def order(self, epoch: int) -> np.ndarray:
        """The object indices of epoch `epoch` in the order they are batched."""
        if not self.shuffle:
            return self.indices
        return self.indices[_philox(self.seed, _ORDER_KEY, epoch, 0).permutation(len(self.indices))]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._start
        self._epoch, self._start = epoch + 1, 0
        source = self._source
        source.order, source.epoch, source.n_batches = self.order(epoch), epoch, len(self)
        return self._iterate(range(start, len(self)))

    def _iterate(self, batches: range) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        source, on_cpu, pin = self._source, self.device.type == "cpu", self.device.type == "cuda"
        if self.num_workers == 0:
            items = (source[b] for b in batches)
        else:  # batches come whole from the workers, in order, so determinism is kept
            items = DataLoader(source, batch_size=None, sampler=batches, shuffle=False,
                               num_workers=self.num_workers, pin_memory=pin)
        for item in items:
            if on_cpu:
                yield item
                continue
            x, flips, y = item  # uint8 goes to the device: a quarter (gray: a twelfth) of the float bytes
            if pin and not x.is_pinned():
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            flips = None if flips is None else flips.to(self.device, non_blocking=True)
            yield finish_batch(x, flips, self.output) + (y,)


@dataclass
class Loaders:
    """The four loaders of a run (SPEC Sec. 1), the class names and the split sizes."""

    train: TwoViewLoader  # D_train, shuffled, flipped
    train_eval: TwoViewLoader  # D_train, fixed order, no augmentation (CUR squeeze means)
    val: TwoViewLoader  # the held-out 20% of the training objects
    test: TwoViewLoader
    classes: List[str]
    sizes: Dict[str, int]  # {"train": .., "val": .., "test": ..}
    cache_dir: Path


def build_loaders(cfg: DataConfig, device: Union[str, torch.device], seed: int, progress: bool = True) -> Loaders:
    """Prepare the data (download, cache) and build the train / train_eval / val / test loaders.

    Args:
        cfg: the data config (views, batch sizes, split, workers).
        device: where batches are delivered.
        seed: seeds the training order and flips (the validation split uses `cfg.split_seed`).
        progress: show tqdm bars while preparing the data.
    Returns:
        The loaders, class names and split sizes.
    """
    cache_dir = prepare_data(cfg, progress=progress)
    train, test = open_split(cache_dir, "train"), open_split(cache_dir, "test")
    train_idx, val_idx = split_indices(len(train.labels), cfg.val_fraction, cfg.split_seed)

    def loader(split, indices, batch_size, **kw) -> TwoViewLoader:
        return TwoViewLoader(split.images, split.labels, indices, views=cfg.views, batch_size=batch_size,
                             seed=seed, device=device, num_workers=cfg.num_workers, **kw)

    return Loaders(
        train=loader(train, train_idx, cfg.batch_size, shuffle=True, augment=True),
        train_eval=loader(train, train_idx, cfg.eval_batch_size),
        val=loader(train, val_idx, cfg.eval_batch_size),
        test=loader(test, None, cfg.eval_batch_size),
        classes=list(train.classes),
        sizes={"train": len(train_idx), "val": len(val_idx), "test": len(test.labels)},
        cache_dir=cache_dir,
    )
