"""Training of the two-branch model with vanilla, random or guided balancing (paper Sec. 4-5, Algorithm 1;
SPEC Sec. 4-6): CLS logged every step, evaluation in fused mode, atomic checkpoints and exact resume.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .balance import CLS_GROUPS, CLSTracker, make_schedule
from .config import TrainConfig, save_json, to_dict
from .mmtm import FusionMode
from .model import TwoBranchNet

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Settings that define a run: resuming with other values would silently mix two experiments.
_RUN_DEFINING = ("algorithm", "seed", "epsilon", "window", "warmup_epochs", "momentum", "weight_decay")
Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Callback = Callable[[str, dict], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


@dataclass
class RunResult:
    """What a finished (or stopped) run leaves behind."""

    history: List[dict]  # one record per completed epoch (as in epochs.jsonl)
    steps: int  # optimizer steps taken in total
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


def amp_dtype(device: torch.device, enabled: bool = True) -> Optional[torch.dtype]:
    """The mixed-precision dtype: bf16 on CUDA where supported, else fp16; None (fp32) on CPU or if disabled."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def evaluate(model: TwoBranchNet, loader: Iterable[Batch], device: Optional[torch.device] = None,
             mode: Union[str, FusionMode] = FusionMode.FUSED,
             autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Accuracy of the fused prediction and of each branch, and the mean loss, in evaluation mode.

    Args:
        model: the two-branch model.
        loader: iterable of (x0, x1, y) batches.
        device: where to run; the model's device if None.
        mode: fusion mode (fused for validation/test; cut for the conditional utilization rate).
        autocast_dtype: mixed-precision dtype on CUDA, or None for fp32.
    Returns:
        dict with acc (fused), acc0, acc1, loss (mean of CE(y0)+CE(y1)) and n (samples).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, correct fused / y0 / y1
    n = 0
    for x0, x1, y in loader:
        x0, x1, y = _to_device(x0, x1, y, device, model)
        with _autocast(device, autocast_dtype):
            y0_hat, y1_hat = model(x0, x1, mode)
        y0_hat, y1_hat = y0_hat.float(), y1_hat.float()
        loss = F.cross_entropy(y0_hat, y, reduction="sum") + F.cross_entropy(y1_hat, y, reduction="sum")
        totals += torch.stack([loss, *_corrects(y0_hat, y1_hat, y)]).double()
        n += y.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got an empty loader")
    loss_sum, c, c0, c1 = totals.tolist()  # the one host synchronisation
    return {"acc": c / n, "acc0": c0 / n, "acc1": c1 / n, "loss": loss_sum / n, "n": n}


def _corrects(y0_hat: torch.Tensor, y1_hat: torch.Tensor, y: torch.Tensor) -> List[torch.Tensor]:
    """Correct counts of the fused prediction, y0_hat and y1_hat, as 0-d tensors (no sync)."""
    fused = TwoBranchNet.predict(y0_hat, y1_hat)
    return [(out.argmax(1) == y).sum() for out in (fused, y0_hat, y1_hat)]


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


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict:
    """Load a checkpoint written by `train` (tensors and plain containers only: weights_only=True).

    Args:
        path: a last.pt or best.pt.
        map_location: device for the tensors.
    Returns:
        The checkpoint dict (keys: model, optimizer, scheduler, cls, schedule, epoch, step, history, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt.get('format')}, this version reads {CHECKPOINT_FORMAT}")
    return ckpt


class Trainer:
    """One training run; `fit()` trains (or continues a stopped run) until a stop rule fires.

    Args:
        model: the two-branch model (moved to `device`).
        train_loader: iterable of (x0, x1, y) training batches; if it has `set_epoch(epoch, start_batch)` the
            trainer uses it for a deterministic order and exact mid-epoch resume, else it re-iterates it each
            epoch and skips the batches already done after a resume.
        cfg: the TrainConfig.
        val_loader: validation batches (chooses the best checkpoint); None keeps the last epoch as best.
        test_loader: test batches, evaluated every epoch when cfg.eval_test.
        device: CUDA if available when None.
        callback: called as callback(event, record) with event "step" or "epoch".
        extra_config: more settings to store in config.json (e.g. the DataConfig).
    """

    def __init__(self, model: TwoBranchNet, train_loader: Iterable[Batch], cfg: TrainConfig,
                 val_loader: Optional[Iterable[Batch]] = None, test_loader: Optional[Iterable[Batch]] = None,
                 device: Optional[Union[str, torch.device]] = None, callback: Optional[Callback] = None,
                 extra_config: Optional[dict] = None) -> None:
        cfg.validate()
        self.cfg, self.callback, self.extra_config = cfg, callback, extra_config or {}
        self.train_loader, self.val_loader, self.test_loader = train_loader, val_loader, test_loader
        self.device = torch.device(device) if device is not None else default_device()
        cuda = self.device.type == "cuda"
        self.model = model.to(self.device)
        if cuda and cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.model._channels_last = True
        self.amp_dtype = amp_dtype(self.device, cfg.amp)
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
            threshold=cfg.plateau_threshold, threshold_mode="rel", min_lr=cfg.min_lr)
        self.cls = CLSTracker(self.model.cls_groups())
        self.schedule = make_schedule(cfg.algorithm, cfg.epsilon, cfg.window, cfg.warmup_epochs, cfg.seed)
        self.log_dir = Path(cfg.log_dir) / cfg.run_name
        self.ckpt_dir = Path(cfg.ckpt_dir) / cfg.run_name
        # Position and bookkeeping; all of it goes into the checkpoint.
        self.epoch = 0  # current epoch (0-based)
        self.batch = 0  # batches of the current epoch already done
        self.step = 0  # optimizer steps taken
        self.history: List[dict] = []
        self.best: Optional[dict] = None
        self.full_acc_count = 0  # epochs that ended with 100% training accuracy
        self.last_speeds = [math.nan] * 3  # s(m1|m0), s(m0|m1), d_speed after the last step
        self.epoch_acc = self._new_epoch_acc()
        self.stop_reason: Optional[str] = None
        self._logs: Dict[str, object] = {}  # open steps.jsonl / epochs.jsonl while fit() runs
        self._clock = 0.0  # perf_counter at the last _tick of the epoch's training time

    # ----------------------------------------------------------------------------------------- checkpoints
    @staticmethod
    def _new_epoch_acc() -> dict:
        """Per-epoch running sums of the training statistics (host floats from the per-step sync)."""
        return {"loss": 0.0, "correct": 0.0, "correct0": 0.0, "correct1": 0.0, "n": 0,
                "rebalance_m0": 0, "rebalance_m1": 0, "time": 0.0}

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly (see `load_state_dict`)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "cls": self.cls.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "epoch": self.epoch, "batch": self.batch, "step": self.step,
            "epoch_acc": dict(self.epoch_acc), "last_speeds": list(self.last_speeds),
            "history": self.history, "best": self.best, "full_acc_count": self.full_acc_count,
            "log_offsets": self._log_offsets(),
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, ckpt: dict) -> None:
        """Restore a `state_dict()`, checking that it belongs to the same kind of run."""
        saved = ckpt["config"]
        changed = [k for k in _RUN_DEFINING if saved.get(k) != getattr(self.cfg, k)]
        if changed:
            raise ValueError(f"the checkpoint in {self.ckpt_dir} was made with other settings for {changed} "
                             f"({[saved.get(k) for k in changed]}); resume with the same settings, use another "
                             "run_name, or pass resume=False to start over")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.cls.load_state_dict(ckpt["cls"])
        self.schedule.load_state_dict(ckpt["schedule"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
        self.epoch, self.batch, self.step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        self.epoch_acc, self.last_speeds = dict(ckpt["epoch_acc"]), list(ckpt["last_speeds"])
        self.history, self.best, self.full_acc_count = ckpt["history"], ckpt["best"], ckpt["full_acc_count"]
        self._log_truncate = ckpt["log_offsets"]

    def _log_offsets(self) -> Dict[str, int]:
        for f in self._logs.values():
            f.flush()
        return {name: f.tell() for name, f in self._logs.items()}

    def save(self, name: str) -> Path:
        """Write checkpoints/<run>/<name>.pt atomically."""
        path = self.ckpt_dir / f"{name}.pt"
        _atomic_save(self.state_dict(), path)
        return path

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
        self._log_truncate = {"steps": 0, "epochs": 0}
        last = self.ckpt_dir / "last.pt"
        resumed_from = 0
        if resume and last.exists():
            self.load_state_dict(load_checkpoint(last))  # on the CPU: each piece moves itself to its device
            resumed_from = self.step
            log.info("resuming %s from epoch %d, batch %d (step %d)", self.cfg.run_name, self.epoch,
                     self.batch, self.step)
        save_json({"train": to_dict(self.cfg), **self.extra_config}, self.log_dir / "config.json")
        # Logs are cut back to the checkpoint's position: lines written after it are replayed identically.
        self._logs = {}
        for name in ("steps", "epochs"):
            path = self.log_dir / f"{name}.jsonl"
            f = open(path, "r+" if path.exists() else "w")
            f.truncate(self._log_truncate[name])
            f.seek(self._log_truncate[name])
            self._logs[name] = f
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
        try:
            for x0, x1, y in self._batches():
                record = self._train_step(x0, x1, y)
                bar.update(1)
                if self.step % 10 == 0 or self.batch == 1:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", d_speed=f"{record['d_speed']:+.3f}",
                                    mode=record["mode"], refresh=False)
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    self._tick()
                    self.save("last")  # stop mid-epoch at the exact position: a larger budget continues here
                    self.stop_reason = "max_steps"
                    return
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
        mode = self.schedule.next_mode(self.epoch)
        x0, x1, y = _to_device(x0, x1, y, self.device, self.model)
        with _autocast(self.device, self.amp_dtype):
            y0_hat, y1_hat = self.model(x0, x1, mode)
        y0_hat, y1_hat = y0_hat.float(), y1_hat.float()
        loss0, loss1 = F.cross_entropy(y0_hat, y), F.cross_entropy(y1_hat, y)
        loss = loss0 + loss1  # SPEC Sec. 2: the sum of the two modality-specific losses
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # mu must see the true gradients
        else:
            loss.backward()
        mu = self.cls.compute_mu()  # after backward, before the step: (4,)
        speeds = self.cls.update(mu, regular=mode is FusionMode.FUSED)  # (3,)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        stats = torch.cat([torch.stack([loss.detach(), loss0.detach(), loss1.detach()]).double(),
                           torch.stack(_corrects(y0_hat.detach(), y1_hat.detach(), y)).double(), mu, speeds])
        values = stats.tolist()  # the one host synchronisation of the step
        l, l0, l1, c, c0, c1 = values[:6]
        n = y.shape[0]
        self.step += 1
        self.batch += 1
        if not math.isfinite(l):
            raise NonFiniteLossError(
                f"the training loss is {l} at step {self.step} (epoch {self.epoch + 1}, batch {self.batch}, mode "
                f"{mode.value}); the run stopped. The last good checkpoint {self.ckpt_dir / 'last.pt'} is kept: "
                "lower the learning rate and resume, or start over with resume=False")
        self.last_speeds = values[10:13]
        self.schedule.observe(mode, self.last_speeds[2])
        acc = self.epoch_acc
        acc["loss"] += l * n
        acc["correct"] += c
        acc["correct0"] += c0
        acc["correct1"] += c1
        acc["n"] += n
        if mode is not FusionMode.FUSED:
            acc[mode.value] += 1
        record = {"step": self.step, "epoch": self.epoch + 1, "mode": mode.value, "loss": l, "loss0": l0,
                  "loss1": l1, "acc": c / n, "acc0": c0 / n, "acc1": c1 / n,
                  **{f"mu_{g}": v for g, v in zip(CLS_GROUPS, values[6:10])},
                  "s_m1_m0": values[10], "s_m0_m1": values[11], "d_speed": values[12], "lr": lr}
        self._logs["steps"].write(json.dumps(record) + "\n")
        if self.callback:
            self.callback("step", record)
        return record

    def _end_epoch(self) -> None:
        cfg, acc = self.cfg, self.epoch_acc
        n = acc["n"]
        train_loss = acc["loss"] / n
        record = {"epoch": self.epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                  "train_loss": train_loss, "train_acc": acc["correct"] / n, "train_acc0": acc["correct0"] / n,
                  "train_acc1": acc["correct1"] / n,
                  "rebalance_m0": acc["rebalance_m0"], "rebalance_m1": acc["rebalance_m1"],
                  "s_m1_m0": self.last_speeds[0], "s_m0_m1": self.last_speeds[1], "d_speed": self.last_speeds[2]}
        # Evaluation always runs in fused mode, whatever the schedule was doing when the epoch ended.
        for split, loader in (("val", self.val_loader), ("test", self.test_loader if cfg.eval_test else None)):
            if loader is not None:
                res = evaluate(self.model, loader, self.device, FusionMode.FUSED, self.amp_dtype)
                record.update({f"{split}_{k}": res[k] for k in ("acc", "acc0", "acc1", "loss")})
        self.scheduler.step(train_loss)  # plateau of the training loss (SPEC Sec. 6)
        if acc["correct"] == n:
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
            self.save("best")
        self.save("last")
        if self.callback:
            self.callback("epoch", record)


def train(model: TwoBranchNet, train_loader: Iterable[Batch], cfg: TrainConfig,
          val_loader: Optional[Iterable[Batch]] = None, test_loader: Optional[Iterable[Batch]] = None,
          device: Optional[Union[str, torch.device]] = None, resume: bool = True,
          callback: Optional[Callback] = None, extra_config: Optional[dict] = None) -> RunResult:
    """Train `model` with `cfg.algorithm`, logging the CLS every step; one call also resumes a stopped run.

    Args:
        model: a TwoBranchNet (e.g. `mmtm_resnet18()`).
        train_loader: (x0, x1, y) batches of D_train (a `TwoViewLoader` or any iterable).
        cfg: TrainConfig (`TrainConfig.paper()` for SPEC Sec. 6).
        val_loader: validation batches; picks the best checkpoint.
        test_loader: test batches, evaluated each epoch if cfg.eval_test.
        device: CUDA if available when None.
        resume: continue from checkpoints/<run>/last.pt when present.
        callback: callback(event, record) for "step" and "epoch" events.
        extra_config: more settings to record in config.json.
    Returns:
        RunResult.
    """
    return Trainer(model, train_loader, cfg, val_loader, test_loader, device, callback, extra_config).fit(resume)
