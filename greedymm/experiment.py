"""The paper's ModelNet40 experiment end to end (paper Sec. 5.2, Table 1; SPEC Sec. 6-8): one resumable run
per algorithm and seed, the conditional utilization rate of its best checkpoint, and the summary table.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .config import DataConfig, TrainConfig, save_json, to_dict
from .data import build_loaders
from .model import TwoBranchNet, mmtm_resnet18
from .train import Callback, amp_dtype, default_device, load_checkpoint, train
from .utilization import conditional_utilization

# SPEC Sec. 8: the paper's ModelNet40 (front/rear) test accuracy in %, mean +- std over 3 runs, and d_util.
PAPER_MODELNET40 = {
    "vanilla": {"acc": (90.09, 0.58), "d_util": -0.1},
    "random": {"acc": (91.36, 0.10), "d_util": 0.0},
    "guided": {"acc": (91.37, 0.28), "d_util": 0.0},
}
SUMMARY_KEYS = ("acc", "acc0", "acc1", "u_m1_m0", "u_m0_m1", "d_util", "d_speed")


def run_name(data_cfg: DataConfig, algorithm: str, seed: int) -> str:
    """The folder name of a run under logging/ and checkpoints/, e.g. "modelnet40_v0-6_guided_s0"."""
    return f"{data_cfg.dataset}_{data_cfg.image_size}px_v{data_cfg.views[0]}-{data_cfg.views[1]}_{algorithm}_s{seed}"


def train_run(data_cfg: DataConfig, train_cfg: TrainConfig, algorithm: str, seed: int,
              device: Optional[Union[str, torch.device]] = None, resume: bool = True,
              model_fn: Optional[Callable[[int], TwoBranchNet]] = None, callback: Optional[Callback] = None,
              progress: bool = True) -> dict:
    """Train one algorithm with one seed, or resume it (a finished run is not retrained).

    Args:
        data_cfg: the data settings.
        train_cfg: the training settings; `algorithm`, `seed` and `run_name` are set here.
        algorithm: "vanilla", "random" or "guided".
        seed: seeds the weights, the data order and flips, and the random schedule.
        device: CUDA if available when None.
        resume: continue from the run's last checkpoint when there is one.
        model_fn: num_classes -> model; the paper's two-branch ResNet18 with MMTM when None.
        callback: passed to `train`.
        progress: tqdm bars.
    Returns:
        dict with algorithm, seed, run_name, steps, steps_this_call, stop_reason, best_epoch, d_speed and the
        test accuracies at the best epoch, history, log_dir and best_path.
    """
    name = run_name(data_cfg, algorithm, seed)
    cfg = dataclasses.replace(train_cfg, algorithm=algorithm, seed=seed, run_name=name, progress=progress)
    device = torch.device(device) if device is not None else default_device()
    loaders = build_loaders(data_cfg, device, seed, progress=progress)
    torch.manual_seed(seed)
    model = (model_fn or mmtm_resnet18)(len(loaders.classes))
    result = train(model, loaders.train, cfg, loaders.val, loaders.test, device=device, resume=resume,
                   callback=callback, extra_config={"data": to_dict(data_cfg), "classes": loaders.classes})
    best = result.best
    return {"algorithm": algorithm, "seed": seed, "run_name": name, "steps": result.steps,
            "steps_this_call": result.steps_this_call, "stop_reason": result.stop_reason,
            "best_epoch": best["epoch"], "d_speed": best["d_speed"],
            **{k: best[k] for k in ("val_acc", "test_acc", "test_acc0", "test_acc1") if k in best},
            "history": result.history, "log_dir": str(result.log_dir), "best_path": str(result.best_path),
            "amp": cfg.amp}


def utilization_of_run(run: dict, data_cfg: DataConfig, device: Optional[Union[str, torch.device]] = None,
                       model_fn: Optional[Callable[[int], TwoBranchNet]] = None, progress: bool = True) -> dict:
    """Cut the fusion of a run's best checkpoint: its CUR and d_util on the test set (SPEC Sec. 7).

    Args:
        run: the output of `train_run`.
        data_cfg: the data settings of the run.
        device: CUDA if available when None.
        model_fn: as in `train_run`.
        progress: tqdm bars while preparing the data.
    Returns:
        `run` without its history, plus acc, acc0, acc1, acc0_cut, acc1_cut, u_m1_m0, u_m0_m1 and d_util;
        also written to logging/<run>/cur.json.
    """
    device = torch.device(device) if device is not None else default_device()
    loaders = build_loaders(data_cfg, device, run["seed"], progress=progress)
    model = (model_fn or mmtm_resnet18)(len(loaders.classes)).to(device)
    model.load_state_dict(load_checkpoint(run["best_path"], map_location=device)["model"])
    cur = conditional_utilization(model, loaders.train_eval, loaders.test, device,
                                  amp_dtype(device, run.get("amp", True)))
    out = {**{k: v for k, v in run.items() if k != "history"}, **cur}
    save_json(out, Path(run["log_dir"]) / "cur.json")
    return out


def summarize(runs: Sequence[dict], keys: Sequence[str] = SUMMARY_KEYS) -> Dict[str, Dict[str, tuple]]:
    """Mean and standard deviation over seeds, per algorithm.

    Args:
        runs: outputs of `run_one`.
        keys: the figures to aggregate.
    Returns:
        {algorithm: {key: (mean, std, n)}} (std 0 for a single seed), algorithms in first-seen order.
    """
    by_alg: Dict[str, List[dict]] = {}
    for r in runs:
        by_alg.setdefault(r["algorithm"], []).append(r)
    table = {}
    for alg, rs in by_alg.items():
        table[alg] = {}
        for k in keys:
            vals = np.array([r[k] for r in rs], dtype=float)
            table[alg][k] = (float(np.nanmean(vals)), float(np.nanstd(vals)) if len(vals) > 1 else 0.0, len(vals))
    return table


def format_table(table: Mapping[str, Mapping[str, tuple]], paper: Optional[Mapping[str, dict]] = None) -> str:
    """A Markdown table of `summarize`'s output (accuracies in %), with the paper's columns if given.

    Args:
        table: from `summarize`.
        paper: e.g. PAPER_MODELNET40, to add the paper's accuracy and d_util beside ours.
    Returns:
        Markdown text.
    """
    def pm(mean: float, std: float, scale: float = 1.0, digits: int = 3) -> str:
        return "n/a" if math.isnan(mean) else f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"

    # the escaped bar keeps u(m1|m0) from splitting a Markdown table cell
    head = ["algorithm", "seeds", "acc %", "acc y0 %", "acc y1 %", "u(m1\\|m0)", "u(m0\\|m1)", "d_util", "d_speed"]
    if paper:
        head += ["paper acc %", "paper d_util"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for alg, row in table.items():
        cells = [alg, str(row["acc"][2])]
        cells += [pm(*row[k][:2], scale=100, digits=2) for k in ("acc", "acc0", "acc1")]
        cells += [pm(*row[k][:2]) for k in ("u_m1_m0", "u_m0_m1", "d_util", "d_speed")]
        if paper:
            ref = paper.get(alg)
            cells += [f"{ref['acc'][0]:.2f} ± {ref['acc'][1]:.2f}" if ref else "", f"≈ {ref['d_util']:+.1f}" if ref else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_steps(log_dir: Union[str, Path]) -> List[dict]:
    """The per-step records (steps.jsonl) of a run."""
    with open(Path(log_dir) / "steps.jsonl") as f:
        return [json.loads(line) for line in f]
