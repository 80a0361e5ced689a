"""The training loop for every algorithm of the paper's Table 1 (paper Sec. 4-5, Algorithm 1; SPEC Sec. 4-6 and 9):
the CLS logged every step, evaluation in fused mode, atomic checkpoints, and an exact resume that refuses to mix runs.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .balance import CLS_GROUPS, Algorithm, CLSTracker, Outputs, make_schedule
from .config import TrainConfig, save_json, to_dict
from .mmtm import FusionMode
from .model import TwoBranchNet
from .regularization import l1_norm

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Callback = Callable[[str, dict], None]
ModelFactory = Callable[[int], nn.Module]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


class RunSettingsError(ValueError):
    """A run was resumed with settings that differ from those it was trained with."""


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves behind."""

    history: List[dict]  # one record per completed epoch (as in epochs.jsonl)
    steps: int  # optimizer steps taken in total (skipped fp16 steps included)
    stop_reason: str  # "full_train_acc", "max_epochs" or "max_steps"
    log_dir: Path  # logging/<run>/ with steps.jsonl, epochs.jsonl, config.json
    ckpt_dir: Path  # checkpoints/<run>/ with last.pt and best.pt
    best: Optional[dict] = None  # the history record of the best validation epoch
    resumed_from_step: int = 0  # 0 for a fresh run
    steps_this_call: int = 0  # steps taken by this call (0 when a finished run is resumed)

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"


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
        raise ValueError(f"precision={precision!r} is unknown; allowed: auto, fp32, bf16, fp16")
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def model_input(model: nn.Module, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The input of a uni-modal network: x0 or x1, by its `modality`."""
    return x1 if getattr(model, "modality", 0) == 1 else x0


def is_two_branch(model: nn.Module) -> bool:
    """True for a two-branch model with CLS groups (TwoBranchNet), False for a uni-modal network."""
    return hasattr(model, "cls_groups")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], device: Optional[torch.device] = None,
             mode: Union[str, FusionMode] = FusionMode.FUSED,
             autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Accuracies and mean losses in evaluation mode.

    Args:
        model: a two-branch model, or a uni-modal network (it reads x0 or x1 by its `modality`).
        loader: iterable of (x0, x1, y) batches.
        device: where to run; the model's device if None.
        mode: fusion mode (fused for validation/test; cut for the conditional utilization rate).
        autocast_dtype: mixed-precision dtype, or None for fp32.
    Returns:
        Two branches: acc (of (y0_hat + y1_hat) / 2), acc0, acc1, loss (CE(y0_hat) + CE(y1_hat)), loss0, loss1,
        loss_fused (CE of the fused logits) and n. A uni-modal network: acc, loss and n.
    """
    device = device or next(model.parameters()).device
    two = is_two_branch(model)
    was_training = model.training
    model.eval()
    totals = torch.zeros(6 if two else 2, dtype=torch.float64, device=device)
    n = 0
    for x0, x1, y in loader:
        x0, x1, y = _to_device(x0, x1, y, device, model)
        with _autocast(device, autocast_dtype):
            if two:
                y0_hat, y1_hat = model(x0, x1, mode)
            else:
                y_hat = model(model_input(model, x0, x1))
        if two:
            y0_hat, y1_hat = y0_hat.float(), y1_hat.float()
            fused = TwoBranchNet.predict(y0_hat, y1_hat)
            losses = [F.cross_entropy(out, y, reduction="sum") for out in (y0_hat, y1_hat, fused)]
            corrects = [_correct(out, y) for out in (fused, y0_hat, y1_hat)]
            totals += torch.stack(losses + corrects).double()
        else:
            y_hat = y_hat.float()
            totals += torch.stack([F.cross_entropy(y_hat, y, reduction="sum"), _correct(y_hat, y)]).double()
        n += y.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got an empty loader")
    t = [v / n for v in totals.tolist()]  # the one host synchronisation
    if not two:
        return {"acc": t[1], "loss": t[0], "n": n}
    return {"acc": t[3], "acc0": t[4], "acc1": t[5], "loss": t[0] + t[1], "loss0": t[0], "loss1": t[1],
            "loss_fused": t[2], "n": n}


def _correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct predictions as a 0-d tensor (no sync)."""
    return (logits.argmax(1) == y).sum()


def _corrects(out: Outputs, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Correct counts of a training forward pass: fused, y0_hat, y1_hat (two branches) or y_hat (one)."""
    if "y" in out:
        return {"correct": _correct(out["y"].detach(), y)}
    y0_hat, y1_hat = out["y0"].detach(), out["y1"].detach()
    return {"correct": _correct(TwoBranchNet.predict(y0_hat, y1_hat), y), "correct0": _correct(y0_hat, y),
            "correct1": _correct(y1_hat, y)}


def _to_device(x0: torch.Tensor, x1: torch.Tensor, y: torch.Tensor, device: torch.device,
               model: torch.nn.Module) -> Batch:
    channels_last = getattr(model, "_channels_last", False)

    def move(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        # channels_last exists for 4-D tensors only: vectors and sequences keep their layout
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    return move(x0), move(x1), y.to(device, non_blocking=True)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _atomic_save(obj: dict, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_link(src: Path, dest: Path) -> None:
    """Make `dest` a second name of the file `src` (a copy where hard links are not supported), atomically.

    `src` is later replaced by rename, which gives it a new file and leaves this one as it is.
    """
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict:
    """Load a checkpoint written by `train` (tensors and plain containers only: weights_only=True).

    Args:
        path: a last.pt or best.pt.
        map_location: device for the tensors.
    Returns:
        The checkpoint dict (keys: model, optimizer, scheduler, cls, algorithm, epoch, step, history, identity, ...).
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
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _json_normal(obj: Any) -> Any:
    """The object as JSON would give it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(obj))


def describe_changes(saved: dict, current: dict) -> List[str]:
    """The settings that differ between two identity dicts, as "key: old -> new" lines (dotted keys)."""
    a, b = _flatten(_json_normal(saved)), _flatten(_json_normal(current))
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "(absent)") != b.get(k, "(absent)")]


def _found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """0-d tensor, 1 when the unscaled gradients hold inf/NaN (the scaler will skip the step); no host sync."""
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    found = list(state.get("found_inf_per_device", {}).values())
    if found:
        return torch.stack([f.float() for f in found]).sum().clamp(max=1)
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).any().float()


def make_algorithm(cfg: TrainConfig) -> Algorithm:
    """The Algorithm of `cfg.algorithm` (see `greedymm.config.ALGORITHMS`).

    Args:
        cfg: the training settings (algorithm, its own settings, seed).
    Returns:
        An Algorithm for the Trainer.
    """
    if cfg.algorithm in ("vanilla", "guided", "random"):
        return Algorithm(make_schedule(cfg.algorithm, cfg.epsilon, cfg.window, cfg.warmup_epochs, cfg.seed))
    if cfg.algorithm in ("ogm_ge", "gblend"):
        from . import balancers  # the related work's balancers (SPEC Sec. 12)

        if cfg.algorithm == "ogm_ge":
            return balancers.OGMGE(cfg.ogm_alpha, cfg.ogm_start_epoch, cfg.ogm_end_epoch, seed=cfg.seed)
        return balancers.GradientBlending(cfg.gblend_period)
    from . import baselines  # imported here: the paper's own algorithms need none of it

    if cfg.algorithm in ("unimodal_m0", "unimodal_m1"):
        return baselines.UniModal(int(cfg.algorithm[-1]))
    if cfg.algorithm == "rubi":
        return baselines.RUBi(bias=int(cfg.rubi_bias[-1]))
    raise ValueError(f"algorithm={cfg.algorithm!r} has no implementation")


class Trainer:
    """One training run; `fit()` trains (or continues a stopped run) until a stop rule fires.

    Args:
        model: the two-branch model, or a uni-modal network for the uni-modal algorithms (moved to `device`).
        train_loader: iterable of (x0, x1, y) training batches; if it has `set_epoch(epoch, start_batch)` the
            trainer uses it for a deterministic order and exact mid-epoch resume, else it re-iterates it each
            epoch and skips the batches already done after a resume.
        cfg: the TrainConfig.
        val_loader: validation batches (chooses the best checkpoint); None keeps the last epoch as best.
        test_loader: test batches, evaluated every epoch when cfg.eval_test.
        device: CUDA if available when None.
        callback: called as callback(event, record) with event "step" or "epoch".
        extra_config: more settings to store in config.json (e.g. the class names).
        identity: more settings that define the run beside `cfg.identity()` (e.g. {"data": DataConfig.identity()}):
            recorded in config.json and the checkpoints; resuming with other values is refused.
        algorithm: the training algorithm; `make_algorithm(cfg)` when None (pass your own to plug one in).
    """

    def __init__(self, model: nn.Module, train_loader: Iterable[Batch], cfg: TrainConfig,
                 val_loader: Optional[Iterable[Batch]] = None, test_loader: Optional[Iterable[Batch]] = None,
                 device: Optional[Union[str, torch.device]] = None, callback: Optional[Callback] = None,
                 extra_config: Optional[dict] = None, identity: Optional[dict] = None,
                 algorithm: Optional[Algorithm] = None) -> None:
        cfg.validate()
        self.cfg, self.callback, self.extra_config = cfg, callback, extra_config or {}
        self.train_loader, self.val_loader, self.test_loader = train_loader, val_loader, test_loader
        self.device = torch.device(device) if device is not None else default_device()
        self.algorithm = algorithm or make_algorithm(cfg)
        self.identity = {"train": cfg.identity(), **(identity or {}), "model": model_signature(model),
                         "batches_per_epoch": len(train_loader) if hasattr(train_loader, "__len__") else None}
        self.model = model.to(self.device)
        extra = self.algorithm.setup(self.model)
        self.extra = extra.to(self.device) if extra is not None else None
        if self.device.type == "cuda" and cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.model._channels_last = True
        self.amp_dtype = amp_dtype(self.device, cfg.precision)
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        params = list(self.model.parameters()) + (list(self.extra.parameters()) if self.extra is not None else [])
        self.params = params
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
            threshold=cfg.plateau_threshold, threshold_mode="rel", min_lr=cfg.min_lr)
        self.cls = CLSTracker(self.model.cls_groups()) if self.algorithm.multimodal else None
        self.log_dir = Path(cfg.log_dir) / cfg.run_name
        self.ckpt_dir = Path(cfg.ckpt_dir) / cfg.run_name
        # Position and bookkeeping; all of it goes into the checkpoint.
        self.epoch = 0  # current epoch (0-based)
        self.batch = 0  # batches of the current epoch already done
        self.step = 0  # optimizer steps taken (skipped fp16 steps included)
        self.history: List[dict] = []
        self.best: Optional[dict] = None
        self.full_acc_count = 0  # epochs that ended with 100% training accuracy
        self.last_speeds = [math.nan] * 3  # s(m1|m0), s(m0|m1), d_speed after the last step
        self.epoch_acc = self._new_epoch_acc()
        self.segments: List[dict] = []  # where and in which precision each stretch of the run trained
        self.stop_reason: Optional[str] = None
        self._logs: Dict[str, Any] = {}  # open steps.jsonl / epochs.jsonl while fit() runs
        self._clock = 0.0  # perf_counter at the last _tick of the epoch's training time

    # ----------------------------------------------------------------------------------------- checkpoints
    @staticmethod
    def _new_epoch_acc() -> dict:
        """Per-epoch running sums of the training statistics (host floats from the per-step sync)."""
        return {"sums": {}, "n": 0, "rebalance_m0": 0, "rebalance_m1": 0, "skipped": 0, "time": 0.0}

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly (see `load_state_dict`)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "extra": self.extra.state_dict() if self.extra is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "cls": self.cls.state_dict() if self.cls is not None else None,
            "algorithm": self.algorithm.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "epoch": self.epoch, "batch": self.batch, "step": self.step,
            "epoch_acc": _json_normal(self.epoch_acc), "last_speeds": list(self.last_speeds),
            "history": self.history, "best": self.best, "full_acc_count": self.full_acc_count,
            "log_offsets": self._log_offsets(), "segments": self.segments,
            "identity": self.identity, "config": to_dict(self.cfg),
        }

    def check_identity(self, ckpt: dict, where: Union[str, Path]) -> None:
        """Refuse a checkpoint made with other run-defining settings, naming them and the ways out."""
        changes = describe_changes(ckpt["identity"], self.identity)
        if changes:
            raise RunSettingsError(
                f"{where} was made with other settings than this run's:\n  " + "\n  ".join(changes) + "\n"
                "A run's settings cannot change when it resumes. Either restore those settings to continue it, use "
                "another run_name (greedymm.experiment and the notebook name runs by their settings, so a changed "
                "setting is a new run), or pass resume=False to start this run over (its logs and checkpoints are "
                "overwritten).")

    def load_state_dict(self, ckpt: dict) -> None:
        """Restore a `state_dict()`, refusing one made with other run-defining settings (see `check_identity`)."""
        self.check_identity(ckpt, self.ckpt_dir / "last.pt")
        self.model.load_state_dict(ckpt["model"])
        if self.extra is not None:
            self.extra.load_state_dict(ckpt["extra"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.cls is not None:
            self.cls.load_state_dict(ckpt["cls"])
        self.algorithm.load_state_dict(ckpt["algorithm"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
        self.epoch, self.batch, self.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        self.epoch_acc, self.last_speeds = ckpt["epoch_acc"], list(ckpt["last_speeds"])
        self.history, self.best, self.full_acc_count = ckpt["history"], ckpt["best"], ckpt["full_acc_count"]
        self.segments = list(ckpt["segments"])

    def _log_offsets(self) -> Dict[str, int]:
        for f in self._logs.values():
            f.flush()
        return {name: f.tell() for name, f in self._logs.items()}

    def save(self, name: str) -> Path:
        """Write checkpoints/<run>/<name>.pt atomically."""
        path = self.ckpt_dir / f"{name}.pt"
        _atomic_save(self.state_dict(), path)
        return path

    # ------------------------------------------------------------------------------------------------ logs
    def _open_logs(self, offsets: Dict[str, int]) -> None:
        """Open steps.jsonl and epochs.jsonl at the checkpoint's position.

        Lines written after the checkpoint are cut off (they are replayed identically). A log shorter than the
        checkpoint's position (its folder was lost, e.g. only the checkpoints were kept on Drive) is never padded:
        epochs.jsonl is rewritten from the checkpoint's history, and steps.jsonl keeps the step records it still
        has, followed by one {"gap": [first, last]} record for the steps it lost.
        """
        self._logs = {}
        for name in ("steps", "epochs"):
            path = self.log_dir / f"{name}.jsonl"
            want = offsets.get(name, 0)
            size = path.stat().st_size if path.exists() else 0
            if size >= want:
                f = open(path, "r+" if path.exists() else "w")
                f.truncate(want)
                f.seek(want)
            elif name == "epochs":
                log.warning("%s is shorter than the checkpoint knows: rewriting it from the checkpoint's history", path)
                f = open(path, "w")
                f.writelines(json.dumps(record) + "\n" for record in self.history)
            else:
                kept = _complete_step_records(path, self.step)
                first = kept[-1]["step"] + 1 if kept else 1
                log.warning("%s lacks steps %d..%d that the checkpoint has trained (its log folder was lost?); "
                            "continuing the log after a gap record", path, first, self.step)
                f = open(path, "w")
                f.writelines(json.dumps(record) + "\n" for record in kept)
                f.write(json.dumps({"gap": [first, self.step]}) + "\n")
            self._logs[name] = f

    # ------------------------------------------------------------------------------------------- training
    def fit(self, resume: bool = True) -> RunResult:
        """Train until 100% training accuracy in `full_acc_epochs` epochs, `max_epochs` or `max_steps`.

        Args:
            resume: continue from checkpoints/<run>/last.pt when it exists (a finished run returns at once);
                False starts over and overwrites that run's logs and checkpoints.
        Returns:
            RunResult with the history, the best epoch and the paths.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        last = self.ckpt_dir / "last.pt"
        offsets = {"steps": 0, "epochs": 0}
        resumed_from = 0
        if resume and last.exists():
            ckpt = load_checkpoint(last)  # on the CPU: each piece moves itself to its device
            self.load_state_dict(ckpt)
            offsets = ckpt["log_offsets"]
            resumed_from = self.step
            log.info("resuming %s from epoch %d, batch %d (step %d)", self.cfg.run_name, self.epoch,
                     self.batch, self.step)
        else:  # a fresh start must not leave the previous run's best.pt behind
            for name in ("last.pt", "best.pt"):
                (self.ckpt_dir / name).unlink(missing_ok=True)
        segment = {"from_step": self.step, "device": str(self.device),
                   "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32"}
        if not self.segments or {k: v for k, v in self.segments[-1].items() if k != "from_step"} != \
                {k: v for k, v in segment.items() if k != "from_step"}:
            if self.segments:
                log.warning("%s continues on %s in %s (it trained on %s in %s until step %d)", self.cfg.run_name,
                            segment["device"], segment["amp_dtype"], self.segments[-1]["device"],
                            self.segments[-1]["amp_dtype"], self.step)
            self.segments.append(segment)
        save_json({"train": to_dict(self.cfg), "identity": self.identity, "segments": self.segments,
                   **self.extra_config}, self.log_dir / "config.json")
        self._open_logs(offsets)
        try:
            start_step = self.step
            while self.stop_reason is None:
                self.stop_reason = self._stop_reason_before_epoch()
                if self.stop_reason is None:
                    self._train_epoch()  # sets stop_reason itself when the step budget ends mid-epoch
            return RunResult(self.history, self.step, self.stop_reason, self.log_dir, self.ckpt_dir, self.best,
                             resumed_from, self.step - start_step)
        finally:
            for f in self._logs.values():
                f.close()

    def _stop_reason_before_epoch(self) -> Optional[str]:
        # Derived from the state alone, so a finished run that is resumed stops at once, and one resumed
        # with a larger budget continues.
        if self.full_acc_count >= self.cfg.full_acc_epochs:
            return "full_train_acc"
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            return "max_steps"
        if self.epoch >= self.cfg.max_epochs:
            return "max_epochs"
        return None

    def _batches(self) -> Iterable[Batch]:
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch, self.batch)
            return loader
        return itertools.islice(loader, self.batch, None)

    def _train_epoch(self) -> None:
        cfg = self.cfg
        total = len(self.train_loader) if hasattr(self.train_loader, "__len__") else None
        bar = tqdm(total=total, initial=self.batch, desc=f"{cfg.run_name} epoch {self.epoch + 1}",
                   disable=not cfg.progress, leave=False, dynamic_ncols=True)
        self._clock = time.perf_counter()
        self.model.train()
        if self.extra is not None:
            self.extra.train()
        try:
            for x0, x1, y in self._batches():
                record = self._train_step(x0, x1, y)
                bar.update(1)
                if self.step % 10 == 0 or self.batch == 1:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", mode=record["mode"], refresh=False)
                budget_spent = cfg.max_steps is not None and self.step >= cfg.max_steps
                if budget_spent and (total is None or self.batch < total):
                    self._tick()
                    self.save("last")  # stop mid-epoch at the exact position: a larger budget continues here
                    self.stop_reason = "max_steps"
                    return
                if budget_spent:
                    break  # the budget ends with the epoch: evaluate it like any other
                if cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0:
                    self._tick()
                    self.save("last")
        finally:
            bar.close()
        self._tick()
        if self.epoch_acc["n"] == 0:
            raise ValueError(f"the training loader yielded no batches in epoch {self.epoch}")
        self._end_epoch()

    def _tick(self) -> None:
        """Add the time since the last tick to the epoch's training time (kept in checkpoints)."""
        now = time.perf_counter()
        self.epoch_acc["time"] += now - self._clock
        self._clock = now

    def _train_step(self, x0: torch.Tensor, x1: torch.Tensor, y: torch.Tensor) -> dict:
        mode = self.algorithm.next_mode(self.epoch)
        x0, x1, y = _to_device(x0, x1, y, self.device, self.model)
        with _autocast(self.device, self.amp_dtype):
            out = self.algorithm.forward(self.model, x0, x1, mode)
        loss, terms = self.algorithm.loss(out, y)
        if self.cfg.l1 > 0:  # paper Sec. 6.3: loss + lambda * sum |theta| over all parameters
            terms["l1"] = l1_norm(self.model.parameters())
            loss = loss + self.cfg.l1 * terms["l1"]
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # mu and the algorithm's hooks must see the true gradients
            skipped = _found_inf(self.scaler, self.optimizer)  # 0-d: the scaler will skip this step
        else:
            loss.backward()
            skipped = torch.zeros((), device=loss.device)
        stats: Dict[str, torch.Tensor] = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                                          **_corrects(out, y)}
        if self.cls is not None:
            mu = self.cls.compute_mu()  # after backward, before any gradient edit and the step: (4,)
            speeds = self.cls.update(mu, regular=mode is FusionMode.FUSED,
                                     skipped=skipped if self.scaler is not None else None)  # (3,)
            stats.update({f"mu_{g}": v for g, v in zip(CLS_GROUPS, mu)})
            stats.update({"s_m1_m0": speeds[0], "s_m0_m1": speeds[1], "d_speed": speeds[2]})
        stats.update(self.algorithm.after_backward(self.model, out, y))
        stats["skipped"] = skipped
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        names = list(stats)
        stacked = torch.stack([stats[k].double().to(loss.device) for k in names])
        values = dict(zip(names, stacked.tolist()))  # the one host synchronisation of the step
        n = y.shape[0]
        self.step += 1
        self.batch += 1
        if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(
                f"the training loss is {values['loss']} at step {self.step} (epoch {self.epoch + 1}, batch "
                f"{self.batch}, mode {mode.value}); the run stopped. Its last good checkpoint "
                f"{self.ckpt_dir / 'last.pt'} is kept, but resuming it would replay the same steps. Train with a lower "
                "learning rate (or precision='fp32'): that is a new run, since the learning rate defines a run — "
                "greedymm.experiment and the notebook name it by its settings; with `train`, pass a new run_name or "
                "resume=False.")
        values["skipped"] = bool(values["skipped"])
        if "d_speed" in values:
            self.last_speeds = [values["s_m1_m0"], values["s_m0_m1"], values["d_speed"]]
        self.algorithm.observe(mode, values)
        acc = self.epoch_acc
        for k, v in values.items():
            if k.startswith("correct"):
                acc["sums"][k] = acc["sums"].get(k, 0.0) + v
            elif k.startswith("loss") or k in terms:
                acc["sums"][k] = acc["sums"].get(k, 0.0) + v * n
        acc["n"] += n
        acc["skipped"] += values["skipped"]
        if mode is not FusionMode.FUSED:
            acc[mode.value] += 1
        record = {"step": self.step, "epoch": self.epoch + 1, "mode": mode.value}
        for k, v in values.items():
            record[k.replace("correct", "acc")] = v / n if k.startswith("correct") else v
        record["lr"] = lr
        self._logs["steps"].write(json.dumps(record) + "\n")
        if self.callback:
            self.callback("step", record)
        return record

    def _end_epoch(self) -> None:
        cfg, acc = self.cfg, self.epoch_acc
        n, sums = acc["n"], acc["sums"]
        record: Dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step,
                                  "lr": self.optimizer.param_groups[0]["lr"]}
        for k, v in sums.items():  # train_loss, train_loss0, ..., train_acc, train_acc0, train_acc1
            record["train_" + k.replace("correct", "acc")] = v / n
        record.update({"rebalance_m0": acc["rebalance_m0"], "rebalance_m1": acc["rebalance_m1"],
                       "skipped_steps": acc["skipped"]})
        if self.cls is not None:
            record.update({"s_m1_m0": self.last_speeds[0], "s_m0_m1": self.last_speeds[1],
                           "d_speed": self.last_speeds[2]})
        # Evaluation always runs in fused mode, whatever the schedule was doing when the epoch ended.
        for split, loader in (("val", self.val_loader), ("test", self.test_loader if cfg.eval_test else None)):
            if loader is not None:
                res = evaluate(self.model, loader, self.device, FusionMode.FUSED, self.amp_dtype)
                record.update({f"{split}_{k}": v for k, v in res.items() if k != "n"})
        record.update(self.algorithm.end_epoch(record))
        self.scheduler.step(record["train_loss"])  # plateau of the training loss (SPEC Sec. 6)
        if sums["correct"] == n:
            self.full_acc_count += 1
        self.epoch += 1
        self.batch = 0
        record["time"] = acc["time"]
        self.epoch_acc = self._new_epoch_acc()
        self.history.append(record)
        self._logs["epochs"].write(json.dumps(record) + "\n")
        improved = self.val_loader is None or self.best is None or record["val_acc"] > self.best["val_acc"]
        if improved:
            self.best = record
        last = self.save("last")
        if improved:  # the same state: link it rather than serialise it twice
            _atomic_link(last, self.ckpt_dir / "best.pt")
        if self.callback:
            self.callback("epoch", record)


def _complete_step_records(path: Path, up_to: int) -> List[dict]:
    """The step records 1, 2, ... of a step log that are complete and consecutive, up to step `up_to`."""
    kept: List[dict] = []
    if not path.exists():
        return kept
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if record.get("step") != len(kept) + 1 or record["step"] > up_to:
                break
            kept.append(record)
    return kept


def train(model: nn.Module, train_loader: Iterable[Batch], cfg: TrainConfig,
          val_loader: Optional[Iterable[Batch]] = None, test_loader: Optional[Iterable[Batch]] = None,
          device: Optional[Union[str, torch.device]] = None, resume: bool = True,
          callback: Optional[Callback] = None, extra_config: Optional[dict] = None,
          identity: Optional[dict] = None, algorithm: Optional[Algorithm] = None) -> RunResult:
    """Train `model` with `cfg.algorithm`, logging the CLS every step; one call also resumes a stopped run.

    Args:
        model: a TwoBranchNet (e.g. `mmtm_resnet18()`), or a UniModalNet for "unimodal_m0"/"unimodal_m1".
        train_loader: (x0, x1, y) batches of D_train (a `TwoViewLoader` or any iterable).
        cfg: TrainConfig (`TrainConfig.paper()` for SPEC Sec. 6).
        val_loader: validation batches; picks the best checkpoint.
        test_loader: test batches, evaluated each epoch if cfg.eval_test.
        device: CUDA if available when None.
        resume: continue from checkpoints/<run>/last.pt when present (refused if the run's settings changed).
        callback: callback(event, record) for "step" and "epoch" events.
        extra_config: more settings to record in config.json.
        identity: more run-defining settings (e.g. the data's), checked on resume.
        algorithm: a custom Algorithm instead of `cfg.algorithm`'s.
    Returns:
        RunResult.
    """
    return Trainer(model, train_loader, cfg, val_loader, test_loader, device, callback, extra_config, identity,
                   algorithm).fit(resume)
