"""One run end to end (paper Sec. 6.4; SPEC Sec. 6-9 and 11): a `Run` builds its loaders and its seeded model once,
trains (or resumes) under the name its settings give it, measures the conditional utilization rate of its best
checkpoint on the test set and, for the studies, its sparsity; a failure becomes a record instead of an exception.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..config import DataConfig, TrainConfig, run_name, to_dict
from ..data.loader import Loaders, build_loaders
from ..data.registry import get_dataset
from ..io import save_json
from ..measures.contribution import NAN_MEASURES, modality_measures
from ..measures.cur import conditional_utilization
from ..measures.evaluate import evaluate, is_two_branch
from ..measures.sparsity import sparsity
from ..methods.base import make_method
from ..models.fusions import as_fusion
from ..models.zoo import ModelFn, build_two_branch
from ..runtime import amp_dtype, default_device, set_channels_last
from ..training.checkpoint import load_checkpoint
from ..training.trainer import EventCallback, train

log = logging.getLogger(__name__)

Device = Optional[Union[str, torch.device]]


def error_fields(err: BaseException) -> dict:
    """status "failed", the error as "<type>: <message>" and its traceback (8 frames)."""
    return {"status": "failed", "error": f"{type(err).__name__}: {err}",
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=8))}


def failure(err: BaseException, algorithm: str, seed: int, name: Optional[str]) -> dict:
    """The record of a run that failed with `err` (logged with its traceback)."""
    log.error("run %s (%s, seed %d) failed", name, algorithm, seed, exc_info=err)
    return {"algorithm": algorithm, "seed": seed, "run_name": name, **error_fields(err)}


def guarded(fn: Callable[[], dict], algorithm: str, seed: int, name: Optional[str]) -> dict:
    """fn()'s record with status "ok", or a "failed" record naming the error: one failure never stops the others."""
    try:
        return {**fn(), "status": "ok"}
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded: the other runs go on
        return failure(err, algorithm, seed, name)


class Run:
    """One training run, named by its settings: `train` (or resume), `utilization` of its best checkpoint, `sparsity`.

    Args:
        data: the data settings.
        train: the training settings; its algorithm and seed are the run's (the seed seeds the weights, the data order
            and flips, and the method's own streams).
        model_fn: num_classes -> two-branch model; the dataset's default model (its spec's `default_model`) when None.
        model_name: a name for `model_fn` that goes into the run name (so two custom models are two runs).
        device: CUDA if available when None.
        progress: tqdm bars.
        measures: `utilization` of the best checkpoint also records the modality measures (Shapley, probes,
            robustness curves: `modality_measures`); the studies, which need the CUR only, leave them out.
    """

    def __init__(self, data: DataConfig, train: TrainConfig, model_fn: Optional[ModelFn] = None,
                 model_name: str = "", device: Device = None, progress: bool = True, measures: bool = True) -> None:
        self.data, self.model_fn, self.model_name, self.progress = data, model_fn, model_name, progress
        self.measures = measures
        self.name = run_name(data, train, model_name)
        self.cfg = dataclasses.replace(train, run_name=self.name, progress=progress)
        self.device = torch.device(device) if device is not None else default_device()
        self.method = make_method(train.algorithm, train.options, train.seed)
        self._loaders: Optional[Loaders] = None
        self._model: Optional[nn.Module] = None

    @property
    def algorithm(self) -> str:
        return self.cfg.algorithm

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def loaders(self) -> Loaders:
        """The run's loaders (data prepared and loaders built on first use)."""
        if self._loaders is None:
            self._loaders = build_loaders(self.data, self.device, self.seed, progress=self.progress)
        return self._loaders

    @property
    def model(self) -> nn.Module:
        """The network the method trains, built on first use from the run's seed: the two-branch model
        (`model_fn`'s or the dataset's) with the run's fusion (`TrainConfig.fusion`: a TwoBranchNet's branches
        become a late-fusion net's encoders) or, for the uni-modal rows, its uni-modal counterpart."""
        if self._model is None:
            loaders = self.loaders
            torch.manual_seed(self.seed)
            k, channels = len(loaders.classes), tuple(loaders.channels)
            two = self.model_fn(k) if self.model_fn is not None else build_two_branch(
                get_dataset(self.data.dataset).default_model, k, channels)
            self._model = self.method.build_model(as_fusion(two, self.cfg.fusion))
        return self._model

    def train(self, resume: bool = True, callback: Optional[EventCallback] = None) -> dict:
        """Train the run, or resume it (a finished run is not retrained).

        Args:
            resume: continue from the run's last checkpoint when there is one.
            callback: passed to `train` (step and epoch records).
        Returns:
            dict with algorithm, seed, fusion, run_name, steps, steps_this_call, stop_reason, best_epoch, d_speed
            (at the best epoch; NaN for uni-modal runs), val_acc and the test accuracies at the best epoch, history,
            log_dir, best_path, precision and model_name.
        """
        loaders, cfg = self.loaders, self.cfg
        result = train(self.model, loaders.train, cfg, loaders.val, loaders.test, device=self.device, resume=resume,
                       callback=callback, extra_config={"data": to_dict(self.data), "classes": loaders.classes},
                       identity={"data": self.data.identity(), "model_name": self.model_name}, method=self.method)
        best = result.best
        return {"algorithm": self.algorithm, "seed": self.seed, "fusion": cfg.fusion, "run_name": self.name,
                "steps": result.steps,
                "steps_this_call": result.steps_this_call, "stop_reason": result.stop_reason,
                "best_epoch": best["epoch"], "d_speed": best.get("d_speed", math.nan),
                **{k: best[k] for k in ("val_acc", "test_acc", "test_acc0", "test_acc1") if k in best},
                "history": result.history, "log_dir": str(result.log_dir), "best_path": str(result.best_path),
                "precision": cfg.precision, "model_name": self.model_name}

    def utilization(self, record: dict, checkpoint: str = "best") -> dict:
        """Evaluate a checkpoint (the best, as the paper does) on the test set: for two-branch runs, cut the fusion for
        the CUR and d_util (SPEC Sec. 7); for uni-modal runs, the test accuracy (no CUR applies).

        Args:
            record: the output of `train`.
            checkpoint: "best" (best.pt) or "last" (last.pt, e.g. for the regularization study, SPEC Sec. 11).
        Returns:
            `record` without its history, plus acc, acc0, acc1, acc0_cut, acc1_cut, u_m1_m0, u_m0_m1 and d_util (NaN
            where they do not apply or are undefined, with d_util_undefined saying why), and the modality measures
            (SPEC Sec. 13: shapley0, shapley1, probe0, probe1, robust0, robust1, ...; `modality_measures`); also
            written to
            logging/<run>/cur.json (cur_last.json for the last checkpoint).
        """
        if checkpoint not in ("best", "last"):
            raise ValueError(f"checkpoint={checkpoint!r} is unknown; allowed: 'best', 'last'")
        path = Path(record["best_path"])
        model, loaders, device = self.model, self.loaders, self.device
        set_channels_last(model, False)  # evaluated as a freshly built model would be
        model.load_state_dict(load_checkpoint(path if checkpoint == "best" else path.with_name("last.pt"),
                                              map_location=device)["model"])
        dtype = amp_dtype(device, record.get("precision", "auto"))
        nan = math.nan
        if is_two_branch(model):
            cur = conditional_utilization(model, loaders.train_eval, loaders.test, device, dtype)
            if self.measures and checkpoint == "best":
                cur.update(modality_measures(model, loaders.train_eval, loaders.test, device, dtype, seed=self.seed))
        else:
            res = evaluate(model, loaders.test, device, autocast_dtype=dtype)
            cur = {"acc": res["acc"], "acc0": nan, "acc1": nan, "acc0_cut": nan, "acc1_cut": nan, "u_m1_m0": nan,
                   "u_m0_m1": nan, "d_util": nan, "fusion_spread": nan, "chance": nan, "d_util_undefined": "",
                   **NAN_MEASURES}
        out = {**{k: v for k, v in record.items() if k != "history"}, **cur}
        save_json(out, Path(record["log_dir"]) / ("cur.json" if checkpoint == "best" else "cur_last.json"))
        return out

    def measure(self, resume: bool = True, callback: Optional[Callable[[dict], None]] = None) -> Tuple[dict, dict]:
        """Train (or resume) the run, then measure its best checkpoint; a failure in either is recorded.

        Args:
            resume: as in `train`.
            callback: called with the training record (or its failure) as soon as training ends.
        Returns:
            (the training record with status, its history included; the `utilization` record with status, or the
            failure: a training failure is both).
        """
        trained = guarded(lambda: self.train(resume), self.algorithm, self.seed, self.name)
        if callback:
            callback(trained)
        if trained["status"] != "ok":
            return trained, trained
        return trained, guarded(lambda: self.utilization(trained), self.algorithm, self.seed, self.name)

    def sparsity(self, best_path: Union[str, Path], tau: float) -> float:
        """rho of the best checkpoint: the fraction of its parameters with |theta| < tau (paper Sec. 6.3)."""
        model = self.model
        model.load_state_dict(load_checkpoint(best_path, map_location=self.device)["model"])
        return sparsity(model, tau)


def run_all(data: DataConfig, train: TrainConfig, algorithms: Sequence[str], seeds: Sequence[int],
            device: Device = None, resume: bool = True, model_fn: Optional[ModelFn] = None, model_name: str = "",
            progress: bool = True, callback: Optional[Callable[[dict], None]] = None) -> Tuple[List[dict], List[dict]]:
    """`Run.measure` for every algorithm and seed, one run at a time; failures are recorded and the others go on.

    Args:
        data, train: the settings (train's algorithm and seed are set per run).
        algorithms, seeds: one run per algorithm and seed, algorithms in the given order, seeds within.
        device, resume, model_fn, model_name, progress: as in `Run`.
        callback: called with each run's training record as soon as it is done (e.g. to print a line).
    Returns:
        (training records with their histories, measured records): one of each per run, status "ok" or "failed".
    """
    trained, measured = [], []
    for algorithm in algorithms:
        for seed in seeds:
            try:
                run = Run(data, dataclasses.replace(train, algorithm=algorithm, seed=seed), model_fn, model_name,
                          device, progress)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # settings that make no run: recorded like any failure
                failed = failure(err, algorithm, seed, None)
                trained.append(failed)
                measured.append(failed)
                if callback:
                    callback(failed)
                continue
            t, m = run.measure(resume, callback)
            trained.append(t)
            measured.append(m)
    return trained, measured
