"""Checkpoints of a run (SPEC Sec. 6: the best validation epoch kept, an exact resume): what a checkpoint holds, its
atomic write, its loading, and the identity check that refuses to resume a run with other settings.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Union

import torch
from torch import nn

from ..config import to_dict

CHECKPOINT_FORMAT = 2


class RunSettingsError(ValueError):
    """A run was resumed with settings that differ from those it was trained with."""


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict:
    """Load a checkpoint written by `train` (tensors and plain containers only: weights_only=True).

    Args:
        path: a last.pt or best.pt.
        map_location: device for the tensors.
    Returns:
        The checkpoint dict (keys: model, optimizer, scheduler, cls, algorithm (the method's state), epoch,
            step, history, identity, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt.get('format')}, this version reads {CHECKPOINT_FORMAT}: "
                         "train the run again (resume=False) or use the greedymm version that wrote it")
    return ckpt


def model_signature(model: nn.Module) -> str:
    """A short digest of a model's architecture: its module types and parameter/buffer names and shapes."""
    parts = [f"{name}:{type(m).__name__}" for name, m in model.named_modules()]
    parts += [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _flatten(d: dict, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts as one dict with dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def json_normal(obj: Any) -> Any:
    """The object as JSON would give it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(obj))


def describe_changes(saved: dict, current: dict) -> List[str]:
    """The settings that differ between two identity dicts, as "key: old -> new" lines (dotted keys)."""
    a, b = _flatten(json_normal(saved)), _flatten(json_normal(current))
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]




def check_identity(saved: dict, current: dict, where: Union[str, Path]) -> None:
    """Refuse a checkpoint made with other run-defining settings, naming them and the ways out.

    Args:
        saved: the checkpoint's identity.
        current: this run's.
        where: the checkpoint, for the message.
    """
    changes = describe_changes(saved, current)
    if changes:
        raise RunSettingsError(
            f"{where} was made with other settings than this run's:\n  " + "\n  ".join(changes) + "\n"
            "A run's settings cannot change when it resumes. Either restore those settings to continue it, use "
            "another run_name (greedymm.experiment and the notebook name runs by their settings, so a changed "
            "setting is a new run), or pass resume=False to start this run over (its logs and checkpoints are "
            "overwritten).")


def trainer_state(trainer: Any) -> dict:
    """Everything a Trainer needs to continue its run exactly (see `restore_trainer`)."""
    cls = trainer.cls
    return {
        "format": CHECKPOINT_FORMAT,
        "model": trainer.model.state_dict(),
        "extra": trainer.extra.state_dict() if trainer.extra is not None else None,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "cls": cls.tracker.state_dict() if cls is not None else None,
        "algorithm": trainer.method.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "epoch": trainer.epoch, "batch": trainer.batch, "step": trainer.step,
        "epoch_acc": json_normal(trainer.epoch_acc),
        "last_speeds": list(cls.last_speeds) if cls is not None else [float("nan")] * 3,
        "history": trainer.history, "best": trainer.best, "full_acc_count": trainer.full_acc_count,
        "log_offsets": trainer.logs.offsets(), "segments": trainer.segments,
        "identity": trainer.identity, "config": to_dict(trainer.cfg),
    }


def restore_trainer(trainer: Any, ckpt: dict, where: Union[str, Path]) -> None:
    """Restore a `trainer_state`, refusing one made with other run-defining settings (see `check_identity`)."""
    check_identity(ckpt["identity"], trainer.identity, where)
    trainer.model.load_state_dict(ckpt["model"])
    if trainer.extra is not None:
        trainer.extra.load_state_dict(ckpt["extra"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    if trainer.scaler is not None and ckpt["scaler"] is not None:
        trainer.scaler.load_state_dict(ckpt["scaler"])
    if trainer.cls is not None:
        trainer.cls.tracker.load_state_dict(ckpt["cls"])
        trainer.cls.last_speeds = list(ckpt["last_speeds"])
    trainer.method.load_state_dict(ckpt["algorithm"])
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
    trainer.epoch, trainer.batch, trainer.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
    trainer.epoch_acc = ckpt["epoch_acc"]
    trainer.history, trainer.best, trainer.full_acc_count = ckpt["history"], ckpt["best"], ckpt["full_acc_count"]
    trainer.segments = list(ckpt["segments"])
