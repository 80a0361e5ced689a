"""One table end to end (paper Table 1, Figs. 2-3; SPEC Sec. 6-10), for the notebook (a step per cell) and for
`python -m greedymm run` (`run_table`, all steps): the data and its figures, every row and seed trained and measured,
the learning curves and d_speed, the summary beside the paper's column, d_util, and LOG_DIR/results_<DATASET>.json.
"""
from __future__ import annotations

import dataclasses
import datetime
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure

from ..config import TrainConfig
from ..data.cache import open_split
from ..data.loader import build_loaders, prepare_data
from ..data.registry import get_dataset
from ..io import save_figure, save_json
from ..methods.base import get_method, methods
from ..models.zoo import model_factory
from ..plots import (pick_examples, plot_d_speed, plot_d_util, plot_learning_curves, plot_pairs, plot_robustness,
                     plot_views)
from ..runtime import default_device, device_name
from ..training.logs import read_steps
from .params import ExperimentPlan
from .runs import Device, run_all
from .table import format_table, paper_column, summarize

Show = Callable[[Figure, str], None]  # show(figure, name), e.g. display it in a notebook


def report_line(run: dict) -> str:
    """One line about a run that trained (or failed), as the notebook prints it."""
    if run["status"] != "ok":
        return f"{run['run_name']}: FAILED: {run['error']}"
    return (f"{run['run_name']}: {run['steps']} steps ({run['steps_this_call']} now), stopped by {run['stop_reason']}; "
            f"best epoch {run['best_epoch']}: val acc {run['val_acc']:.3f}"
            + (f", test acc {run['test_acc']:.3f}" if "test_acc" in run else "")
            + (f", d_speed {run['d_speed']:+.3f}" if get_method(run["algorithm"]).multimodal else ""))


def tolerance_band(train: TrainConfig) -> Optional[float]:
    """The +-band of d_speed figures: the first registered method's `tolerance` setting (guided's epsilon)."""
    return next((train.option(m.tolerance) for m in methods().values() if m.tolerance), None)


class Experiment:
    """The steps of one table, in order: `prepare`, `train`, `curves`, `summary`, `finish`.

    Args:
        plan: the settings (`experiment_plan`).
        device: CUDA if available when None.
        show: called with each figure after it is saved to LOG_DIR/figures/<DATASET>_<name>.png.
    """

    def __init__(self, plan: ExperimentPlan, device: Device = None, show: Optional[Show] = None) -> None:
        self.plan, self.data, self.show = plan, plan.data, show
        self.device = device if device is not None else default_device()
        self.fig_dir = Path(plan.train.log_dir) / "figures"
        self.figures: List[str] = []  # the saved figures, in order
        self.runs: List[dict] = []  # training records (with histories), one per row and seed
        self.runs_cur: List[dict] = []  # measured records (CUR of the best checkpoint)
        self.table: dict = {}
        self.results_path: Optional[Path] = None
        self.classes: List[str] = []  # the class names (after `prepare`)
        self.channels: Tuple[int, int] = (3, 3)  # input channels of m0 and m1 (after `prepare`)
        self.start = time.perf_counter()  # the table's wall time runs from here to `finish`

    def figure(self, fig: Figure, name: str) -> None:
        """Save a figure beside the logs and show it."""
        path = save_figure(fig, self.fig_dir / f"{self.data.dataset}_{name}.png")
        self.figures.append(str(path))
        if self.show is not None:
            self.show(fig, name)

    def prepare(self) -> List[str]:
        """Download and cache the data, and draw its modalities (digit pairs, or the renders' views).

        Returns:
            Lines describing the cache and the splits.
        """
        cache_dir = prepare_data(self.data, progress=self.plan.progress)
        self.data = dataclasses.replace(self.data, make_npy_files=False)  # built now: the runs reuse the cache
        loaders = build_loaders(self.data, "cpu", seed=0, progress=False)
        classes, channels = self.classes, self.channels = loaders.classes, loaders.channels
        lines = [f"cache {cache_dir}: {len(classes)} classes; inputs m0 {channels[0]} channels, m1 {channels[1]} "
                 "channels", f"D_train {loaders.sizes['train']}, validation {loaders.sizes['val']}, test "
                 f"{loaders.sizes['test']} objects"]
        train_split, test_split = open_split(cache_dir, "train"), open_split(cache_dir, "test")
        if get_dataset(self.data.dataset).preview == "pairs":  # the digits: (colored, gray) pairs
            for name, split in (("training", train_split), ("test", test_split)):
                idx = np.arange(min(20, len(split.labels)))
                self.figure(plot_pairs(split.images[idx, 0], split.images[idx, 1], split.labels[idx], classes,
                                       title=f"{name} pairs: colored (m0) above gray (m1)"), f"pairs_{name}")
        else:  # the renders: 12 views of an object of each of the first classes present
            pick = pick_examples(train_split.labels, 4)
            self.figure(plot_views(train_split.images[pick], [train_split.names[i] for i in pick],
                                   [classes[train_split.labels[i]] for i in pick], views=self.data.views), "views")
        return lines

    def train(self, report: Optional[Callable[[dict], None]] = None) -> List[dict]:
        """Train (or resume) every row and seed and measure its best checkpoint, one run at a time.

        Args:
            report: called with each training record as soon as it is done.
        Returns:
            The training records (failed runs included).
        """
        plan = self.plan
        self.runs, self.runs_cur = run_all(self.data, plan.train, plan.algorithms, plan.seeds, self.device,
                                           plan.resume, model_factory(plan.model), plan.model,
                                           progress=plan.progress, callback=report)
        return self.runs

    def curves(self) -> None:
        """Learning curves of the first seed's runs and, for the two-branch rows, d_speed over their steps."""
        first_seed = {r["algorithm"]: r for r in self.runs if r["seed"] == self.plan.seeds[0] and r["status"] == "ok"}
        self.figure(plot_learning_curves({alg: r["history"] for alg, r in first_seed.items()}), "learning_curves")
        two_branch = {alg: read_steps(r["log_dir"]) for alg, r in first_seed.items()
                      if get_method(alg).multimodal}
        if two_branch:
            self.figure(plot_d_speed(two_branch, epsilon=tolerance_band(self.plan.train)), "d_speed")

    def summary(self) -> Tuple[str, List[str]]:
        """The Table-1 summary of the measured runs.

        Returns:
            (the Markdown table beside the paper's column, one line per failed run).
        """
        self.table = summarize(self.runs_cur)
        failures = [f"failed: {r['algorithm']} seed {r['seed']}: {r['error']}" for r in self.runs_cur
                    if r["status"] != "ok"]
        return format_table(self.table, paper_column(self.data.dataset)), failures

    def finish(self) -> Path:
        """Draw d_util and the robustness curves per two-branch row and write LOG_DIR/results_<DATASET>.json (with
        the run's fusion).

        Returns:
            The results file.
        """
        plan, dataset = self.plan, self.data.dataset
        paper = paper_column(dataset)
        d_utils = {alg: [r["d_util"] for r in self.runs_cur if r["algorithm"] == alg and r["status"] == "ok"]
                   for alg in plan.algorithms if get_method(alg).multimodal}
        if d_utils:
            self.figure(plot_d_util(d_utils, {k: v["d_util"] for k, v in (paper or {}).items() if "d_util" in v}
                                    or None), "d_util")
        robust = {alg: [r for r in self.runs_cur if r["algorithm"] == alg and r["status"] == "ok" and "robust0" in r]
                  for alg in plan.algorithms}
        robust = {alg: rs for alg, rs in robust.items() if rs}
        if robust:  # the modality measures' robustness curves (SPEC Sec. 13)
            self.figure(plot_robustness(robust), "robustness")
        results = {"dataset": dataset, "fusion": plan.train.fusion, "views": list(self.data.views),
                   "device": str(self.device),
                   "seeds": plan.seeds, "rows": plan.algorithms, "runs": self.runs_cur, "summary": self.table,
                   "figures": self.figures,
                   "steps_this_call": sum(r.get("steps_this_call", 0) for r in self.runs if r["status"] == "ok"),
                   "settings": {"data": self.data.identity(), "model": plan.model,
                                "train": {k: v for k, v in plan.train.identity().items() if k not in ("algorithm",
                                                                                                       "seed")},
                                "options": plan.train.options, "max_epochs": plan.train.max_epochs},
                   "device_name": device_name(torch.device(self.device)), "torch": torch.__version__,
                   "date": datetime.date.today().isoformat(), "wall_s": round(time.perf_counter() - self.start, 1)}
        self.results_path = save_json(results, Path(plan.train.log_dir, f"results_{dataset}.json"))
        return self.results_path


def run_table(plan: ExperimentPlan, device: Device = None, show: Optional[Show] = None,
              report: Optional[Callable[[dict], None]] = None) -> Tuple[Experiment, str, List[str]]:
    """Every step of one table, as the notebook takes them.

    Args:
        plan: the settings.
        device: CUDA if available when None.
        show: called with each figure (after it is saved).
        report: called with each training record.
    Returns:
        (the Experiment, its Markdown table, one line per failed run); the results file is `results_path`.
    """
    exp = Experiment(plan, device, show)
    exp.prepare()
    exp.train(report)
    exp.curves()
    text, failures = exp.summary()
    exp.finish()
    return exp, text, failures
