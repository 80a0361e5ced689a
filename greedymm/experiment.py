"""The paper's Table 1 end to end (paper Sec. 6.4, Table 1; SPEC Sec. 6-9): one resumable run per algorithm and
seed, named by its settings, the conditional utilization rate of its best checkpoint, failures recorded instead of
raised, and the six-row summary table beside the paper's numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .config import ALGORITHMS, PAPER_ROWS, DataConfig, TrainConfig, save_json, to_dict
from .data import build_loaders
from .model import TwoBranchNet, UniModalNet, mmtm_resnet18
from .train import (Callback, amp_dtype, default_device, evaluate, is_two_branch, load_checkpoint, model_signature,
                    train)
from .utilization import conditional_utilization

log = logging.getLogger(__name__)

# SPEC Sec. 8: the paper's test accuracy in %, mean +- std over 3 runs, and the approximate d_util, per dataset.
# "unimodal" is Table 1's "uni-modal (best)" row: the better of the m0 and m1 networks.
PAPER_TABLE1 = {
    "modelnet40": {
        "unimodal": {"acc": (89.34, 0.39)},
        "vanilla": {"acc": (90.09, 0.58), "d_util": -0.1},
        "rubi": {"acc": (90.45, 0.58)},
        "random": {"acc": (91.36, 0.10), "d_util": 0.0},
        "guided": {"acc": (91.37, 0.28), "d_util": 0.0},
    },
    "colored_mnist": {
        "unimodal": {"acc": (99.14, 0.11)},
        "vanilla": {"acc": (45.26, 0.46)},
        "rubi": {"acc": (44.79, 0.62)},
        "random": {"acc": (74.07, 2.75)},
        "guided": {"acc": (91.01, 1.20)},
    },
}
PAPER_MODELNET40 = PAPER_TABLE1["modelnet40"]
# Which paper column a dataset is compared with (the embedded dataset has none).
PAPER_COLUMN = {"modelnet40": "modelnet40", "colored_mnist": "colored_mnist", "colored_digits": "colored_mnist"}
SUMMARY_KEYS = ("acc", "acc0", "acc1", "u_m1_m0", "u_m0_m1", "d_util", "d_speed")
UNIMODAL_ROWS = ("unimodal_m0", "unimodal_m1")


def paper_column(dataset: str) -> Optional[Dict[str, dict]]:
    """The paper's Table-1 column to show beside a dataset's results, or None (e.g. the embedded dataset)."""
    key = PAPER_COLUMN.get(dataset)
    return PAPER_TABLE1[key] if key else None


def settings_digest(data_cfg: DataConfig, train_cfg: TrainConfig, model: str = "") -> str:
    """8 hex digits of every setting that defines a run except its algorithm and seed (see `run_name`)."""
    identity = {"train": {k: v for k, v in train_cfg.identity().items() if k not in ("algorithm", "seed")},
                "data": data_cfg.identity(), "model": model}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def run_name(data_cfg: DataConfig, train_cfg: TrainConfig, algorithm: str, seed: int, model: str = "") -> str:
    """The folder name of a run under logging/ and checkpoints/: "{dataset}_{algorithm}_s{seed}_{digest}".

    The digest covers every other setting that changes the run's result (training, data and the model's name),
    so changing the learning rate, the batch size or the dataset's size makes a new run, not a resumed one.

    Args:
        data_cfg, train_cfg: the settings (train_cfg's own algorithm and seed are ignored).
        algorithm, seed: the run's.
        model: a name for a custom model factory ("" for the dataset's default model).
    Returns:
        e.g. "modelnet40_guided_s0_3f2a9c1b".
    """
    cfg = dataclasses.replace(train_cfg, algorithm=algorithm, seed=seed)
    return f"{data_cfg.dataset}_{algorithm}_s{seed}_{settings_digest(data_cfg, cfg, model)}"


def default_two_branch(dataset: str, num_classes: int, channels: Tuple[int, int] = (3, 3)) -> TwoBranchNet:
    """The paper's two-branch model for a dataset: ResNet18 branches for the renders (SPEC Sec. 2), four-layer conv
    branches for the digits (SPEC Sec. 10).

    Args:
        dataset: a DataConfig.dataset value.
        num_classes: K.
        channels: input channels of m0 and m1.
    Returns:
        A TwoBranchNet with randomly initialised weights (seed torch first).
    """
    if dataset in ("colored_mnist", "colored_digits"):
        from .model import mmtm_digits

        return mmtm_digits(num_classes, channels=channels)
    if channels[0] != channels[1]:
        raise ValueError(f"the ResNet18 model takes the same input channels for both views, got {channels}")
    return mmtm_resnet18(num_classes, in_channels=channels[0])


def build_model(algorithm: str, two_branch: nn.Module) -> nn.Module:
    """The network an algorithm trains: the two-branch model, or its uni-modal counterpart (SPEC Sec. 9).

    Args:
        algorithm: one of ALGORITHMS.
        two_branch: a freshly built (seeded) two-branch model.
    Returns:
        `two_branch` itself, or `UniModalNet.from_two_branch(two_branch, k)` for "unimodal_m{k}".
    """
    if algorithm in UNIMODAL_ROWS:
        return UniModalNet.from_two_branch(two_branch, int(algorithm[-1]))
    return two_branch


ModelFn = Callable[[int], TwoBranchNet]


def make_model(data_cfg: DataConfig, algorithm: str, seed: int, num_classes: int, channels: Tuple[int, int],
               model_fn: Optional[ModelFn] = None) -> nn.Module:
    """The seeded network of a run: the two-branch model (`model_fn`'s or the dataset's default) or, for the
    uni-modal rows, its uni-modal counterpart.

    Args:
        data_cfg: the run's data settings (the dataset picks the default model).
        algorithm: the run's algorithm.
        seed: seeds the weights.
        num_classes: K.
        channels: input channels of m0 and m1 (`Loaders.channels`).
        model_fn: num_classes -> two-branch model, or None for the dataset's default.
    Returns:
        The network, with freshly initialised weights.
    """
    torch.manual_seed(seed)
    two = model_fn(num_classes) if model_fn is not None else default_two_branch(data_cfg.dataset, num_classes,
                                                                                 channels)
    return build_model(algorithm, two)


def train_run(data_cfg: DataConfig, train_cfg: TrainConfig, algorithm: str, seed: int,
              device: Optional[Union[str, torch.device]] = None, resume: bool = True,
              model_fn: Optional[ModelFn] = None, model_name: str = "", callback: Optional[Callback] = None,
              progress: bool = True) -> dict:
    """Train one algorithm with one seed, or resume it (a finished run is not retrained).

    Args:
        data_cfg: the data settings.
        train_cfg: the training settings; `algorithm`, `seed` and `run_name` are set here.
        algorithm: one of ALGORITHMS.
        seed: seeds the weights, the data order and flips, and the random schedule.
        device: CUDA if available when None.
        resume: continue from the run's last checkpoint when there is one.
        model_fn: num_classes -> two-branch model; the dataset's default (`default_two_branch`) when None.
        model_name: a name for `model_fn` that goes into the run name (so two custom models are two runs).
        callback: passed to `train`.
        progress: tqdm bars.
    Returns:
        dict with algorithm, seed, run_name, steps, steps_this_call, stop_reason, best_epoch, d_speed (at the best
        epoch; NaN for uni-modal runs), val_acc and the test accuracies at the best epoch, history, log_dir,
        best_path and precision.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is unknown; allowed: {', '.join(ALGORITHMS)}")
    name = run_name(data_cfg, train_cfg, algorithm, seed, model_name)
    cfg = dataclasses.replace(train_cfg, algorithm=algorithm, seed=seed, run_name=name, progress=progress)
    device = torch.device(device) if device is not None else default_device()
    loaders = build_loaders(data_cfg, device, seed, progress=progress)
    channels = tuple(loaders.channels)
    model = make_model(data_cfg, algorithm, seed, len(loaders.classes), channels, model_fn)
    result = train(model, loaders.train, cfg, loaders.val, loaders.test, device=device, resume=resume,
                   callback=callback, extra_config={"data": to_dict(data_cfg), "classes": loaders.classes},
                   identity={"data": data_cfg.identity(), "model_name": model_name})
    best = result.best
    return {"algorithm": algorithm, "seed": seed, "run_name": name, "steps": result.steps,
            "steps_this_call": result.steps_this_call, "stop_reason": result.stop_reason,
            "best_epoch": best["epoch"], "d_speed": best.get("d_speed", math.nan),
            **{k: best[k] for k in ("val_acc", "test_acc", "test_acc0", "test_acc1") if k in best},
            "history": result.history, "log_dir": str(result.log_dir), "best_path": str(result.best_path),
            "precision": cfg.precision, "model_name": model_name}


def utilization_of_run(run: dict, data_cfg: DataConfig, device: Optional[Union[str, torch.device]] = None,
                       model_fn: Optional[ModelFn] = None, progress: bool = True) -> dict:
    """Evaluate a run's best checkpoint on the test set: for two-branch runs, cut the fusion for its CUR and d_util
    (SPEC Sec. 7); for uni-modal runs, its test accuracy (no CUR applies).

    Args:
        run: the output of `train_run`.
        data_cfg: the data settings of the run.
        device: CUDA if available when None.
        model_fn: as in `train_run`.
        progress: tqdm bars while preparing the data.
    Returns:
        `run` without its history, plus acc, acc0, acc1, acc0_cut, acc1_cut, u_m1_m0, u_m0_m1 and d_util (NaN
        where they do not apply); also written to logging/<run>/cur.json.
    """
    device = torch.device(device) if device is not None else default_device()
    loaders = build_loaders(data_cfg, device, run["seed"], progress=progress)
    channels = tuple(loaders.channels)
    model = make_model(data_cfg, run["algorithm"], run["seed"], len(loaders.classes), channels, model_fn)
    model = model.to(device)
    model.load_state_dict(load_checkpoint(run["best_path"], map_location=device)["model"])
    dtype = amp_dtype(device, run.get("precision", "auto"))
    nan = math.nan
    if is_two_branch(model):
        cur = conditional_utilization(model, loaders.train_eval, loaders.test, device, dtype)
    else:
        res = evaluate(model, loaders.test, device, autocast_dtype=dtype)
        cur = {"acc": res["acc"], "acc0": nan, "acc1": nan, "acc0_cut": nan, "acc1_cut": nan, "u_m1_m0": nan,
               "u_m0_m1": nan, "d_util": nan}
    out = {**{k: v for k, v in run.items() if k != "history"}, **cur}
    save_json(out, Path(run["log_dir"]) / "cur.json")
    return out


def _guarded(fn: Callable[[], dict], algorithm: str, seed: int, name: Optional[str]) -> dict:
    """fn()'s record with status "ok", or a "failed" record naming the error: one failure never stops the others."""
    try:
        return {**fn(), "status": "ok"}
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded: the other runs go on
        log.exception("run %s (%s, seed %d) failed", name, algorithm, seed)
        return {"algorithm": algorithm, "seed": seed, "run_name": name, "status": "failed",
                "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}


def train_runs(data_cfg: DataConfig, train_cfg: TrainConfig, algorithms: Sequence[str], seeds: Sequence[int],
               device: Optional[Union[str, torch.device]] = None, resume: bool = True,
               model_fn: Optional[ModelFn] = None, model_name: str = "", progress: bool = True,
               callback: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """`train_run` for every algorithm and seed; a run that fails is recorded (status "failed", its error) and the
    others go on.

    Args:
        data_cfg, train_cfg, device, resume, model_fn, model_name, progress: as in `train_run`.
        algorithms: the rows to train, e.g. ALGORITHMS.
        seeds: one run per algorithm and seed.
        callback: called with each run's record as soon as it is done (e.g. to print a line).
    Returns:
        The records, algorithms in the given order, seeds within.
    """
    runs = []
    for algorithm in algorithms:
        for seed in seeds:
            name = None
            try:
                name = run_name(data_cfg, train_cfg, algorithm, seed, model_name)
            except Exception:  # reported by the guarded call below
                pass
            run = _guarded(lambda: train_run(data_cfg, train_cfg, algorithm, seed, device, resume, model_fn,
                                             model_name, progress=progress), algorithm, seed, name)
            runs.append(run)
            if callback:
                callback(run)
    return runs


def utilization_of_runs(runs: Sequence[dict], data_cfg: DataConfig,
                        device: Optional[Union[str, torch.device]] = None,
                        model_fn: Optional[ModelFn] = None) -> List[dict]:
    """`utilization_of_run` for every run that trained; failed runs pass through, and a failure here is recorded.

    Returns:
        One record per run (histories dropped), status "ok" or "failed".
    """
    out = []
    for run in runs:
        if run.get("status", "ok") != "ok":
            out.append(run)
        else:
            out.append(_guarded(lambda: utilization_of_run(run, data_cfg, device, model_fn, progress=False),
                                run["algorithm"], run["seed"], run.get("run_name")))
    return out


def run_one(data_cfg: DataConfig, train_cfg: TrainConfig, algorithm: str, seed: int,
            device: Optional[Union[str, torch.device]] = None, resume: bool = True,
            model_fn: Optional[ModelFn] = None, model_name: str = "", progress: bool = True) -> dict:
    """Train a run and measure its CUR; a failure (a non-finite loss, any exception) is returned, not raised.

    Args:
        data_cfg, train_cfg, algorithm, seed, device, resume, model_fn, model_name, progress: as in `train_run`.
    Returns:
        The `utilization_of_run` record with status "ok" and the run's history under "history", or
        {"algorithm", "seed", "run_name", "status": "failed", "error": "<type>: <message>", "traceback"}.
    """
    run = train_runs(data_cfg, train_cfg, [algorithm], [seed], device, resume, model_fn, model_name, progress)[0]
    out = utilization_of_runs([run], data_cfg, device, model_fn)[0]
    return {**out, "history": run["history"]} if out["status"] == "ok" else out


def table_order(algorithms: Sequence[str]) -> List[str]:
    """Algorithms in the paper's Table-1 order (ALGORITHMS), others after them in their given order."""
    known = [a for a in ALGORITHMS if a in algorithms]
    return known + [a for a in dict.fromkeys(algorithms) if a not in ALGORITHMS]


def summarize(runs: Sequence[dict], keys: Sequence[str] = SUMMARY_KEYS) -> Dict[str, dict]:
    """Mean and standard deviation over seeds, per algorithm, counting only valid values.

    Args:
        runs: outputs of `run_one` (failed runs included) or `utilization_of_run`.
        keys: the figures to aggregate.
    Returns:
        {algorithm: {"runs": n, "failed": [seeds], key: (mean, std, n_valid)}} in Table-1 order; a figure that is
        NaN in a run (failed, or not applicable) is left out of that figure's mean and count; std is 0 for one
        value, and (nan, nan, 0) means no valid value.
    """
    by_alg: Dict[str, List[dict]] = {}
    for r in runs:
        by_alg.setdefault(r["algorithm"], []).append(r)
    table: Dict[str, dict] = {}
    for alg in table_order(list(by_alg)):
        rs = by_alg[alg]
        ok = [r for r in rs if r.get("status", "ok") == "ok"]
        row: Dict[str, object] = {"runs": len(rs), "failed": [r["seed"] for r in rs if r not in ok]}
        for k in keys:
            vals = np.array([r.get(k, math.nan) for r in ok], dtype=float)
            vals = vals[np.isfinite(vals)]
            if len(vals) == 0:
                row[k] = (math.nan, math.nan, 0)
            else:
                row[k] = (float(vals.mean()), float(vals.std()) if len(vals) > 1 else 0.0, int(len(vals)))
        table[alg] = row
    return table


def best_unimodal(table: Mapping[str, dict]) -> Optional[str]:
    """The uni-modal row with the higher mean test accuracy (Table 1's "uni-modal (best)"), or None."""
    rows = [(table[a]["acc"][0], a) for a in UNIMODAL_ROWS if a in table and table[a]["acc"][2] > 0]
    return max(rows)[1] if rows else None


def format_table(table: Mapping[str, dict], paper: Optional[Mapping[str, dict]] = None) -> str:
    """A Markdown table of `summarize`'s output (accuracies in %), rows in the paper's order, with the paper's column.

    Args:
        table: from `summarize`.
        paper: a column of PAPER_TABLE1 (e.g. `paper_column("modelnet40")`) to show beside ours.
    Returns:
        Markdown text: mean ± std over valid seeds (the mean alone for one seed). "seeds" counts the runs whose
        figures are averaged, and names failed seeds; the better uni-modal row is marked "(best)" and carries the
        paper's uni-modal (best) figure.
    """
    def pm(cell: tuple, scale: float = 1.0, digits: int = 3) -> str:
        mean, std, n = cell
        if n < 2:  # one seed has no spread to report; "± 0.00" would read as seeds that agree
            return "n/a" if n == 0 else f"{mean * scale:.{digits}f}"
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"

    best = best_unimodal(table)
    # the escaped bar keeps u(m1|m0) from splitting a Markdown table cell
    head = ["algorithm", "seeds", "acc %", "acc ŷ0 %", "acc ŷ1 %", "u(m1\\|m0)", "u(m0\\|m1)", "d_util", "d_speed"]
    if paper:
        head += ["paper acc %", "paper d_util"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for alg, row in table.items():
        failed = row.get("failed", [])
        seeds = str(row["acc"][2]) if not failed else f"{row['acc'][2]} of {row['runs']} (failed: " \
            f"{', '.join(f's{s}' for s in failed)})"
        name = f"{alg} (best)" if alg == best else alg
        cells = [name, seeds] + [pm(row[k], scale=100, digits=2) for k in ("acc", "acc0", "acc1")]
        cells += [pm(row[k]) for k in ("u_m1_m0", "u_m0_m1", "d_util", "d_speed")]
        if paper:
            ref = paper.get("unimodal" if alg == best else alg, {}) if alg not in UNIMODAL_ROWS or alg == best else {}
            acc = f"{ref['acc'][0]:.2f} ± {ref['acc'][1]:.2f}" if "acc" in ref else ""
            if alg not in PAPER_ROWS:
                acc = "(not in the paper)"
            cells += [acc, f"≈ {ref['d_util']:+.1f}" if "d_util" in ref else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_steps(log_dir: Union[str, Path]) -> List[dict]:
    """The per-step records (steps.jsonl) of a run; gap records of a lost log are skipped."""
    with open(Path(log_dir) / "steps.jsonl") as f:
        return [r for r in map(json.loads, f) if "step" in r]


def read_epochs(log_dir: Union[str, Path]) -> List[dict]:
    """The per-epoch records (epochs.jsonl) of a run."""
    with open(Path(log_dir) / "epochs.jsonl") as f:
        return [json.loads(line) for line in f]
