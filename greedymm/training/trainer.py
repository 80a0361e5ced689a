"""The training loop of every method (paper Sec. 4-5, Algorithm 1; SPEC Sec. 4-6): a method's steps with the CLS
logged every step (a built-in callback, `callbacks.py`), the L1 term (a loss term), fused evaluation each epoch, the
plateau schedule and the stop rules, atomic checkpoints and an exact resume that refuses to mix runs.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig, to_dict
from ..io import link, save_json, save_torch
from ..measures.evaluate import Outputs, corrects, evaluate
from ..methods.base import Method, StepContext, make_method
from ..models.mmtm import FusionMode
from ..runtime import Batch, amp_dtype, autocast, default_device, set_channels_last, to_device
from .callbacks import Callback, CLSCallback, EventCallback, EventCallbackAdapter, L1Term
from .checkpoint import load_checkpoint, model_signature, restore_trainer, trainer_state
from .logs import RunLogs

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


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


class Trainer:
    """One training run; `fit()` trains (or continues a stopped run) until a stop rule fires.

    Args:
        model: the two-branch model, or a uni-modal network for the uni-modal methods (moved to `device`).
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
        method: the training method; `make_method(cfg.algorithm, cfg.options, cfg.seed)` when None.
        callbacks: more Callback objects (after the CLS, before `callback`).
    """

    def __init__(self, model: nn.Module, train_loader: Iterable[Batch], cfg: TrainConfig,
                 val_loader: Optional[Iterable[Batch]] = None, test_loader: Optional[Iterable[Batch]] = None,
                 device: Optional[Union[str, torch.device]] = None, callback: Optional[EventCallback] = None,
                 extra_config: Optional[dict] = None, identity: Optional[dict] = None,
                 method: Optional[Method] = None, callbacks: Sequence[Callback] = ()) -> None:
        cfg.validate()
        self.cfg, self.extra_config = cfg, extra_config or {}
        self.train_loader, self.val_loader, self.test_loader = train_loader, val_loader, test_loader
        self.device = torch.device(device) if device is not None else default_device()
        self.method = method or make_method(cfg.algorithm, cfg.options, cfg.seed)
        self.steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
        self.identity = {"train": cfg.identity(), **(identity or {}), "model": model_signature(model),
                         "batches_per_epoch": self.steps_per_epoch}
        self.model = model.to(self.device)
        extra = self.method.setup(self.model)
        self.extra = extra.to(self.device) if extra is not None else None
        if self.device.type == "cuda" and cfg.channels_last:
            set_channels_last(self.model, True)
        self.amp_dtype = amp_dtype(self.device, cfg.precision)
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        params = list(self.model.parameters()) + (list(self.extra.parameters()) if self.extra is not None else [])
        self.params = params
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
            threshold=cfg.plateau_threshold, threshold_mode="rel", min_lr=cfg.min_lr)
        self.cls = CLSCallback(self.model) if self.method.multimodal else None
        self.callbacks: List[Callback] = ([self.cls] if self.cls is not None else []) + list(callbacks)
        if callback is not None:
            self.callbacks.append(EventCallbackAdapter(callback))
        self.loss_terms = [L1Term(cfg.l1)] if cfg.l1 > 0 else []
        self.log_dir = Path(cfg.log_dir) / cfg.run_name
        self.ckpt_dir = Path(cfg.ckpt_dir) / cfg.run_name
        self.logs = RunLogs(self.log_dir)
        # Position and bookkeeping; all of it goes into the checkpoint.
        self.epoch = 0  # current epoch (0-based)
        self.batch = 0  # batches of the current epoch already done
        self.step = 0  # optimizer steps taken (skipped fp16 steps included)
        self.history: List[dict] = []
        self.best: Optional[dict] = None
        self.full_acc_count = 0  # epochs that ended with 100% training accuracy
        self.epoch_acc = self._new_epoch_acc()
        self.segments: List[dict] = []  # where and in which precision each stretch of the run trained
        self.stop_reason: Optional[str] = None
        self.skipped = torch.zeros(())  # 0-d, 1 when the current step's fp16 gradients overflowed (no host sync)
        self._clock = 0.0  # perf_counter at the last _tick of the epoch's training time

    # ----------------------------------------------------------------------------------------- checkpoints
    @staticmethod
    def _new_epoch_acc() -> dict:
        """Per-epoch running sums of the training statistics (host floats from the per-step sync)."""
        return {"sums": {}, "n": 0, "rebalance_m0": 0, "rebalance_m1": 0, "skipped": 0, "time": 0.0}

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly (see `greedymm.training.checkpoint`)."""
        return trainer_state(self)

    def load_state_dict(self, ckpt: dict) -> None:
        """Restore a `state_dict()`, refusing one made with other run-defining settings."""
        restore_trainer(self, ckpt, self.ckpt_dir / "last.pt")

    def save(self, name: str) -> Path:
        """Write checkpoints/<run>/<name>.pt atomically."""
        return save_torch(self.state_dict(), self.ckpt_dir / f"{name}.pt")

    # ------------------------------------------------------------------------------------------- training
    def fit(self, resume: bool = True) -> RunResult:
        """Train until 100% training accuracy in `full_acc_epochs` epochs (or epochs of `full_acc_steps` steps in
        all), `max_epochs` or `max_steps`.

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
        self._record_segment()
        save_json({"train": to_dict(self.cfg), "identity": self.identity, "segments": self.segments,
                   **self.extra_config}, self.log_dir / "config.json")
        self.logs.open(offsets, self.history, self.step)
        try:
            start_step = self.step
            while self.stop_reason is None:
                self.stop_reason = self._stop_reason_before_epoch()
                if self.stop_reason is None:
                    self._train_epoch()  # sets stop_reason itself when the step budget ends mid-epoch
            return RunResult(self.history, self.step, self.stop_reason, self.log_dir, self.ckpt_dir, self.best,
                             resumed_from, self.step - start_step)
        finally:
            self.logs.close()

    def _record_segment(self) -> None:
        """Note where and in which precision the run trains from this step (a warning when that changed)."""
        segment = {"from_step": self.step, "device": str(self.device),
                   "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32"}
        if not self.segments or {k: v for k, v in self.segments[-1].items() if k != "from_step"} != \
                {k: v for k, v in segment.items() if k != "from_step"}:
            if self.segments:
                log.warning("%s continues on %s in %s (it trained on %s in %s until step %d)", self.cfg.run_name,
                            segment["device"], segment["amp_dtype"], self.segments[-1]["device"],
                            self.segments[-1]["amp_dtype"], self.step)
            self.segments.append(segment)

    def _stop_reason_before_epoch(self) -> Optional[str]:
        # Derived from the state alone, so a finished run that is resumed stops at once, and one resumed
        # with a larger budget continues.
        if self.cfg.full_acc_steps is not None:  # counted in steps: the same training whatever the epoch's length
            if full_acc_steps(self.history) >= self.cfg.full_acc_steps:
                return "full_train_acc"
        elif self.full_acc_count >= self.cfg.full_acc_epochs:
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
        total = self.steps_per_epoch
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

    def _context(self, mode: FusionMode = FusionMode.FUSED) -> StepContext:
        return StepContext(self.epoch, self.step + 1, self.batch, mode, self.steps_per_epoch)

    def _train_step(self, x0: torch.Tensor, x1: torch.Tensor, y: torch.Tensor) -> dict:
        ctx = self._context()
        ctx.mode = self.method.next_mode(ctx)
        x0, x1, y = to_device(x0, x1, y, self.device, self.model)
        with autocast(self.device, self.amp_dtype):
            out = self.method.forward(self.model, x0, x1, ctx)
        loss, terms = self._loss(out, y, ctx)
        stats = self._backward(out, y, loss, terms, ctx)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        names = list(stats)
        stacked = torch.stack([stats[k].double().to(loss.device) for k in names])
        values = dict(zip(names, stacked.tolist()))  # the one host synchronisation of the step
        self.step += 1
        self.batch += 1
        if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(
                f"the training loss is {values['loss']} at step {self.step} (epoch {self.epoch + 1}, batch "
                f"{self.batch}, mode {ctx.mode.value}); the run stopped. Its last good checkpoint "
                f"{self.ckpt_dir / 'last.pt'} is kept, but resuming it would replay the same steps. Train with a lower "
                "learning rate (or precision='fp32'): that is a new run, since the learning rate defines a run — "
                "greedymm.experiment and the notebook name it by its settings; with `train`, pass a new run_name or "
                "resume=False.")
        values["skipped"] = bool(values["skipped"])
        self.method.observe(ctx, values)
        record = self._step_record(values, terms, ctx, lr, y.shape[0])
        self.logs.write("steps", record)
        for callback in self.callbacks:
            callback.on_step_end(self, ctx, record)
        return record

    def _loss(self, out: Outputs, y: torch.Tensor, ctx: StepContext) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The method's loss plus the loss terms (L1), and the named terms to log."""
        loss, terms = self.method.loss(out, y, ctx)
        for term in self.loss_terms:  # paper Sec. 6.3: loss + lambda * sum |theta| over all parameters
            weighted, terms[term.name] = term(self.model)
            loss = loss + weighted
        return loss, terms

    def _backward(self, out: Outputs, y: torch.Tensor, loss: torch.Tensor, terms: Dict[str, torch.Tensor],
                  ctx: StepContext) -> Dict[str, torch.Tensor]:
        """Backward (scaled for fp16, then unscaled), the callbacks' and the method's hooks; the step's 0-d stats."""
        self.optimizer.zero_grad(set_to_none=True)
        self.method.backward(self.scaler.scale(loss) if self.scaler is not None else loss, terms, ctx)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # mu and the method's hooks must see the true gradients
            self.skipped = _found_inf(self.scaler, self.optimizer)  # 0-d: the scaler will skip this step
        else:
            self.skipped = torch.zeros((), device=loss.device)
        stats: Dict[str, torch.Tensor] = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                                          **corrects(out, y)}
        for callback in self.callbacks:  # the CLS first: mu of the gradients before any edit
            stats.update(callback.on_after_backward(self, ctx))
        stats.update(self.method.after_backward(self.model, out, y, ctx))
        stats["skipped"] = self.skipped
        return stats

    def _step_record(self, values: Dict[str, Any], terms: Dict[str, torch.Tensor], ctx: StepContext, lr: float,
                     n: int) -> dict:
        """Add a step's host values to the epoch's sums; its record for steps.jsonl (counts as accuracies)."""
        acc = self.epoch_acc
        for k, v in values.items():
            if k.startswith("correct"):
                acc["sums"][k] = acc["sums"].get(k, 0.0) + v
            elif k.startswith("loss") or k in terms:
                acc["sums"][k] = acc["sums"].get(k, 0.0) + v * n
        acc["n"] += n
        acc["skipped"] += values["skipped"]
        if ctx.mode is not FusionMode.FUSED:
            acc[ctx.mode.value] += 1
        record = {"step": self.step, "epoch": self.epoch + 1, "mode": ctx.mode.value}
        for k, v in values.items():
            record[k.replace("correct", "acc")] = v / n if k.startswith("correct") else v
        record["lr"] = lr
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
        for callback in self.callbacks:
            callback.on_train_epoch_end(self, record)
        # Evaluation always runs in fused mode, whatever the method was doing when the epoch ended.
        for split, loader in (("val", self.val_loader), ("test", self.test_loader if cfg.eval_test else None)):
            if loader is not None:
                res = evaluate(self.model, loader, self.device, FusionMode.FUSED, self.amp_dtype)
                record.update({f"{split}_{k}": v for k, v in res.items() if k not in ("n", "classes")})
        record.update(self.method.end_epoch(record, StepContext(self.epoch, self.step, self.batch, FusionMode.FUSED,
                                                                self.steps_per_epoch)))
        self.scheduler.step(record["train_loss"])  # plateau of the training loss (SPEC Sec. 6)
        if sums["correct"] == n:
            self.full_acc_count += 1
        self.epoch += 1
        self.batch = 0
        record["time"] = acc["time"]
        self.epoch_acc = self._new_epoch_acc()
        self.history.append(record)
        self.logs.write("epochs", record)
        improved = self.val_loader is None or self.best is None or record["val_acc"] > self.best["val_acc"]
        if improved:
            self.best = record
        last = self.save("last")
        if improved:  # the same state: link it rather than serialise it twice
            link(last, self.ckpt_dir / "best.pt")
        for callback in self.callbacks:
            callback.on_epoch_end(self, record)


def _found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """0-d tensor, 1 when the unscaled gradients hold inf/NaN (the scaler will skip the step); no host sync."""
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
    found = list(state.get("found_inf_per_device", {}).values())
    if found:
        return torch.stack([f.float() for f in found]).sum().clamp(max=1)
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return (~torch.isfinite(torch.stack(torch._foreach_norm(grads)))).any().float()


def train(model: nn.Module, train_loader: Iterable[Batch], cfg: TrainConfig,
          val_loader: Optional[Iterable[Batch]] = None, test_loader: Optional[Iterable[Batch]] = None,
          device: Optional[Union[str, torch.device]] = None, resume: bool = True,
          callback: Optional[EventCallback] = None, extra_config: Optional[dict] = None,
          identity: Optional[dict] = None, method: Optional[Method] = None,
          callbacks: Sequence[Callback] = ()) -> RunResult:
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
        method: a Method instance instead of `cfg.algorithm`'s (e.g. one with hooks of your own).
        callbacks: more Callback objects.
    Returns:
        RunResult.
    """
    return Trainer(model, train_loader, cfg, val_loader, test_loader, device, callback, extra_config, identity,
                   method, callbacks).fit(resume)


def full_acc_steps(history: Sequence[dict]) -> int:
    """The steps of the epochs that ended at 100% training accuracy (SPEC Sec. 10: the stop rule counted in steps).

    Args:
        history: the epoch records (each with its cumulative `step` and `train_acc`).
    Returns:
        The sum of those epochs' steps.
    """
    total, previous = 0, 0
    for record in history:
        if record["train_acc"] == 1.0:
            total += record["step"] - previous
        previous = record["step"]
    return total
