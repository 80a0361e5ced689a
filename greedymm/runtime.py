"""Where and in which precision a run computes (SPEC Sec. 4 and 6: mixed precision, gradients unscaled before mu):
the device, the autocast dtype, moving batches (channels_last images on CUDA), and a device's name.
"""
from __future__ import annotations

import platform
from typing import Optional, Tuple

import torch
from torch import nn

from .config import PRECISIONS

Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype of a run, or None for fp32.

    "auto" picks bf16 only on CUDA GPUs of compute capability 8.0 or more (Ampere on), where bf16 convolutions
    run natively; older GPUs (Colab's T4 is 7.5) get fp16 with loss scaling. `torch.cuda.is_bf16_supported()` is
    not used: by default it counts emulation and says True on a T4. On the CPU "auto" is fp32.

    Args:
        device: where the run trains.
        precision: "auto", "fp32", "bf16" or "fp16" (the last two are honoured on the CPU too, for tests).
    Returns:
        torch.bfloat16, torch.float16 or None.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"precision={precision!r} is unknown; allowed: {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """torch.autocast on `device` in `dtype`; disabled (fp32) for None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def set_channels_last(model: nn.Module, enabled: bool) -> None:
    """Give `model` (and the image batches `to_device` moves for it) the channels_last memory format, or undo it."""
    model.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
    model._channels_last = enabled


def to_device(x0: torch.Tensor, x1: torch.Tensor, y: torch.Tensor, device: torch.device, model: nn.Module) -> Batch:
    """Move a batch to `device`, images (4-D) in channels_last when the model is (see `set_channels_last`)."""
    channels_last = getattr(model, "_channels_last", False)

    def move(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        # channels_last exists for 4-D tensors only: vectors and sequences keep their layout
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    return move(x0), move(x1), y.to(device, non_blocking=True)


def device_name(device: torch.device) -> str:
    """The device as people name it: "cpu (<processor>)" or "cuda:0 (NVIDIA H100 ...)"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
