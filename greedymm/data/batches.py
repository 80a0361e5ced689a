"""Two-view batches from a cache's images (SPEC Sec. 1, 10, 11): the chosen views as m0 and m1, a random horizontal
flip drawn independently per view (the same flip for identical views), normalised on the device that trains, in an
order that is a pure function of (seed, epoch), so that a run resumes mid-epoch exactly.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader

from .cache import START_METHOD
from .modelnet import IMAGENET_MEAN, IMAGENET_STD

OUTPUTS = ("float", "uint8")
_ORDER_KEY, _FLIP_KEY = 0, 1  # high word of the Philox key: the order and flip streams never coincide


def _philox(seed: int, stream: int, epoch: int, batch: int) -> np.random.Generator:
    """A counter-based generator whose draws depend on (seed, stream, epoch, batch) alone, whoever draws them."""
    return np.random.Generator(np.random.Philox(key=seed + (stream << 64), counter=(batch << 128) + (epoch << 192)))


class _BatchSource:
    """Makes batch b of epoch e, for the key (e, b): a pure function of the key, so that persistent loader workers
    need no news of a new epoch. Picklable (a memmap travels as its file name)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, views: Tuple[int, int],
                 batch_size: int, shuffle: bool, augment: bool, seed: int, finish: bool, output: str,
                 channels: Tuple[int, int], mean: Tuple[float, ...], std: Tuple[float, ...]) -> None:
        self.mapped = None
        if isinstance(images, np.memmap) and images.filename is not None and images.flags.c_contiguous \
                and images.offset + images.nbytes == Path(images.filename).stat().st_size:
            self.mapped = (images.filename, images.offset, images.shape)
        self.images = images.view(np.ndarray)  # plain ndarray: fancy indexing skips the memmap subclass
        self.labels, self.indices = labels, indices
        self.views = np.asarray(views, dtype=np.int64)[:, None]  # (2, 1) broadcasts against (1, B)
        self.same_view = views[0] == views[1]  # identical modalities: one image, one flip (SPEC Sec. 11)
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, seed
        self.finish, self.output, self.channels, self.mean, self.std = finish, output, channels, mean, std
        self._order: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_order"] = (-1, None)
        if self.mapped is not None:
            state["images"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.images is None:
            filename, offset, shape = self.mapped
            self.images = np.memmap(filename, np.uint8, "r", offset, shape).view(np.ndarray)

    def order(self, epoch: int) -> np.ndarray:
        """The object indices of epoch `epoch` in the order they are batched (the last epoch's is kept)."""
        if not self.shuffle:
            return self.indices
        if self._order[0] != epoch:
            self._order = (epoch, self.indices[_philox(self.seed, _ORDER_KEY, epoch, 0).permutation(len(self.indices))])
        return self._order[1]

    def __getitem__(self, key: Tuple[int, int]) -> tuple:
        """(x0, x1, y) when `finish`, else (x (2, B, C, H, W) uint8, flips (2, B) bool or None, y)."""
        epoch, b = key
        idx = self.order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]  # (B,)
        if (idx[1:] >= idx[:-1]).all():
            x = self.images[idx[None, :], self.views]  # (2, B, C, H, W)
        else:  # read in file order for locality, then restore the batch order
            sort = np.argsort(idx)
            x = self.images[idx[sort][None, :], self.views][:, np.argsort(sort)]
        y = torch.from_numpy(self.labels[idx])
        if not self.augment:
            flips = None
        else:
            flips = _philox(self.seed, _FLIP_KEY, epoch, b).random((2, len(idx))) < 0.5  # (view, sample)
            if self.same_view:
                flips[1] = flips[0]
        if not self.finish:
            return torch.from_numpy(x), None if flips is None else torch.from_numpy(flips), y
        if flips is not None and flips.any():
            v, s = np.nonzero(flips)
            x[v, s] = x[v, s, ..., ::-1]  # horizontal flip of the chosen views, in uint8 before the float pass
        return finish_batch(torch.from_numpy(x), None, self.output, self.channels, self.mean, self.std) + (y,)


class _Keys:
    """The sampler of a persistent DataLoader: yields the (epoch, batch) keys of the current pass."""

    def __init__(self) -> None:
        self.epoch, self.batches = 0, range(0)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return ((self.epoch, b) for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def finish_batch(x: torch.Tensor, flips: Optional[torch.Tensor], output: str, channels: Tuple[int, int] = (3, 3),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flip and normalise a gathered batch on its device (the GPU when training there).

    Args:
        x: (2, B, C, H, W) uint8, the two views of B objects.
        flips: (2, B) bool on x's device, True where the view is flipped horizontally; None for no flips.
        output: "float" for float32 views normalised as (x / 255 - mean) / std, "uint8" for raw ones.
        channels: channels of x0 and x1: 3 repeats a gray (C = 1) view, 1 keeps the first of C = 3 channels (a
            gray view stored as 3 equal channels). "uint8" output only drops channels, never repeats them.
        mean, std: per channel (3 values) or for every channel (1 value).
    Returns:
        (x0, x1), each contiguous: (B, channels[k], H, W).
    """
    if flips is not None:  # no host sync: flip all, keep what is asked
        x = torch.where(flips[:, :, None, None, None], x.flip(-1), x)
    c = x.shape[2]
    if output == "uint8":
        return tuple(x[k, :, :1].contiguous() if channels[k] < c else x[k] for k in (0, 1))
    scale, shift = _affine(x.device, tuple(mean), tuple(std))  # (1, 1, 1 or 3, 1, 1)
    two, b, _, h, w = x.shape
    if channels[0] == channels[1]:  # both views in one pass
        k = channels[0]
        out = torch.empty((two, b, k, h, w), dtype=torch.float32, device=x.device)
        torch.mul(_with_channels(x, k), scale, out=out)  # uint8 -> float and C = 1 -> 3 in one pass
        out.add_(shift)
        return out[0], out[1]
    outs = []
    for v, k in enumerate(channels):
        out = torch.empty((1, b, k, h, w), dtype=torch.float32, device=x.device)
        torch.mul(_with_channels(x[v:v + 1], k), scale, out=out)
        outs.append(out.add_(shift)[0])
    return outs[0], outs[1]


def _with_channels(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (2 or 1, B, C, H, W) seen with k channels: the first k of C, or C = 1 repeated (a view, no copy)."""
    c = x.shape[2]
    if k < c:
        return x[:, :, :k]
    return x.expand(-1, -1, k, -1, -1) if k > c else x


_AFFINE: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def _affine(device: torch.device, mean: Tuple[float, ...], std: Tuple[float, ...]
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 - mean) / std as x * scale + shift, both (1, 1, len(mean), 1, 1), cached per device and values."""
    key = (device, mean, std)
    if key not in _AFFINE:
        m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        scale, shift = 1.0 / (255.0 * s), -m / s
        _AFFINE[key] = tuple(t.float().view(1, 1, -1, 1, 1).to(device) for t in (scale, shift))
    return _AFFINE[key]


class TwoViewLoader:
    """Batches (x0, x1, y) of two views of the chosen objects, read straight from the memory-mapped cache.

    The sample order is a pure function of (seed, epoch), the flips of (seed, epoch, batch index), so
    `set_epoch(epoch, start_batch)` lets a resumed run see exactly the batches of one that never stopped.
    Each new iteration starts where `set_epoch` pointed (default epoch 0, batch 0), then moves on to the next epoch.
    With `num_workers > 0` the worker processes start (forkserver on Linux, spawn elsewhere; never forked from a
    process running torch threads) on the first iteration and stay for the loader's life.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: Optional[Sequence[int]] = None,
                 views: Tuple[int, int] = (0, 6), batch_size: int = 8, shuffle: bool = False, augment: bool = False,
                 seed: int = 0, device: Union[str, torch.device] = "cpu", output: str = "float",
                 num_workers: int = 0, drop_last: bool = False, channels: Tuple[int, int] = (3, 3),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 start_method: str = START_METHOD) -> None:
        """Args:
            images: (N, V, C, H, W) uint8 array, usually the cache's memmap; C is 1 (gray) or 3.
            labels: (N,) class indices.
            indices: the objects of this loader (indices into images); None for all.
            views: the view indices used as m0 and m1; equal indices give identical modalities (the same image
                with the same flip).
            batch_size: objects per batch.
            shuffle: reshuffle every epoch (else the order of `indices`).
            augment: random horizontal flip, p = 0.5, drawn independently per view and per sample (shared when the
                two views are the same).
            seed: seeds the order and the flips.
            device: where the batches are delivered; on CUDA, uint8 is shipped (pinned) and converted there.
            output: "float" (normalised float32) or "uint8" (raw).
            num_workers: loader worker processes (0 = load in this process).
            drop_last: drop the last, smaller batch.
            channels: channels of x0 and x1 (1 or 3 each; see `finish_batch`); `InputFormat.channels` gives a
                dataset's.
            mean, std: the normalisation, per channel (3 values, 3-channel views only) or for all channels (1).
            start_method: how worker processes start: "forkserver" (the default on Linux) or "spawn" (elsewhere)
                avoid forking a process where torch runs threads; "fork" starts faster but can deadlock.
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
        if start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(f"start_method={start_method!r} is unknown here; allowed: "
                             f"{', '.join(multiprocessing.get_all_start_methods())}")
        channels = tuple(int(c) for c in channels)
        if len(channels) != 2 or not set(channels) <= {1, 3}:
            raise ValueError(f"channels={channels} must give 1 or 3 channels for each of x0 and x1")
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != len(std) or len(mean) not in (1, 3) or (len(mean) == 3 and 1 in channels) \
                or min(std) <= 0:
            raise ValueError(f"mean={mean} and std={std} must be 1 value (every channel) or 3 (one per channel, "
                             f"3-channel views only; channels={channels}), std > 0")
        self.indices = indices.astype(np.int64)
        self.views, self.batch_size, self.shuffle, self.augment = views, int(batch_size), bool(shuffle), bool(augment)
        self.seed = int(seed) % 2**64  # the low word of the Philox key
        self.device, self.output, self.channels = torch.device(device), output, channels
        self.num_workers, self.drop_last, self.start_method = int(num_workers), bool(drop_last), start_method
        self._source = _BatchSource(images, labels, self.indices, views, self.batch_size, self.shuffle, self.augment,
                                    self.seed, finish=self.device.type == "cpu", output=output, channels=channels,
                                    mean=mean, std=std)
        self._epoch, self._start = 0, 0
        self._keys: Optional[_Keys] = None
        self._workers: Optional[DataLoader] = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_keys"] = state["_workers"] = None  # worker processes do not travel
        return state

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
        return self._source.order(epoch)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._start
        self._epoch, self._start = epoch + 1, 0
        return self._iterate(epoch, range(start, len(self)))

    def _iterate(self, epoch: int, batches: range) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        source, on_cpu, pin = self._source, self.device.type == "cpu", self.device.type == "cuda"
        if self.num_workers == 0:
            items = (source[epoch, b] for b in batches)
        else:  # batches come whole from the workers, in order, so determinism is kept
            if self._workers is None:  # started once: the keys tell the workers the epoch
                self._keys = _Keys()
                self._workers = DataLoader(source, batch_size=None, sampler=self._keys, shuffle=False,
                                           num_workers=self.num_workers, pin_memory=pin, persistent_workers=True,
                                           multiprocessing_context=self.start_method)
            self._keys.epoch, self._keys.batches = epoch, batches
            items = iter(self._workers)
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
            yield finish_batch(x, flips, self.output, self.channels, source.mean, source.std) + (y,)
