"""The settings of paper_studies.ipynb (its papermill `parameters` cell; SPEC Sec. 11): type checks with
`greedymm.notebook.check_parameters`, then the chosen studies (the paper's grids unless overridden) and executor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

from ..notebook import check_parameters
from .executors import EXECUTORS, Executor, make_executor
from .grid import Study
from .presets import greedy_learner, regularization, sensitivity

# name: (kind, may be None); see greedymm.notebook.check_parameters.
STUDY_PARAMETERS: Dict[str, Tuple[str, bool]] = {
    "DATASET": ("str", False), "DATA_DIR": ("str", True), "IMAGE_SIZE": ("int", True), "BATCH_SIZE": ("int", True),
    "MAX_EPOCHS": ("int", True), "EMBEDDED_PER_CLASS": ("int", True), "EMBEDDED_TEST_PER_CLASS": ("int", True),
    "MODEL": ("str", False),
    "GREEDY": ("bool", False), "GREEDY_LRS": ("list[float]", True), "GREEDY_SEEDS": ("list[int]", True),
    "GREEDY_PAIRS": ("list[str]", False),
    "REGULARIZATION": ("bool", False), "REG_L1S": ("list[float]", True), "REG_LR": ("float", True),
    "REG_SEEDS": ("list[int]", False), "TAU": ("float", False),
    "SENSITIVITY": ("bool", False), "SENS_EPSILONS": ("list[float]", True), "SENS_WINDOWS": ("list[int]", True),
    "SENS_ALPHAS": ("list[float]", True), "SENS_PERIODS": ("list[int]", True), "SENS_SEEDS": ("list[int]", False),
    "EXECUTOR": ("str", False), "WORKERS": ("int", True), "THREADS": ("int", True), "RUNS_PER_GPU": ("int", False),
    "RAY_ADDRESS": ("str", True), "RAY_CPUS_PER_RUN": ("float", False), "RAY_GPUS_PER_RUN": ("float", True),
    "LOG_DIR": ("str", False), "CKPT_DIR": ("str", False),
}


@dataclass
class StudyPlan:
    """What the studies notebook runs."""

    studies: Dict[str, Study]  # "greedy_learner", "regularization", "sensitivity": those switched on
    executor: Executor  # where the runs execute
    log_dir: str  # root of the runs' logs; the studies' folders are log_dir/studies/<name>/
    ckpt_dir: str  # root of the runs' checkpoints
    data_dir: Optional[str] = None  # where the data lives (None: the dataset's default)


def plan_from_parameters(values: Mapping[str, Any]) -> StudyPlan:
    """Check the notebook's settings and turn them into studies and an executor.

    Args:
        values: the settings by name (the notebook's `globals()`); see STUDY_PARAMETERS. A grid left at None is
            the paper's (greedymm.study.presets).
    Returns:
        The StudyPlan.
    """
    check_parameters(values, STUDY_PARAMETERS)
    v = {k: values[k] for k in STUDY_PARAMETERS if k in values}
    if v.get("EXECUTOR", "local") not in EXECUTORS:
        raise ValueError(f"EXECUTOR={v['EXECUTOR']!r} is unknown; allowed: {', '.join(EXECUTORS)}")
    dataset = v["DATASET"]
    data: Dict[str, Any] = {k: v[p] for k, p in (("image_size", "IMAGE_SIZE"), ("batch_size", "BATCH_SIZE"))
                            if v.get(p) is not None}
    if dataset == "embedded":  # these define embedded runs only: elsewhere they would rename the runs for nothing
        data.update({k: v[p] for k, p in (("embedded_per_class", "EMBEDDED_PER_CLASS"),
                                          ("embedded_test_per_class", "EMBEDDED_TEST_PER_CLASS"))
                     if v.get(p) is not None})
    train: Dict[str, Any] = {"max_epochs": v["MAX_EPOCHS"]} if v.get("MAX_EPOCHS") is not None else {}
    shared = dict(data=data, train=train, tau=v.get("TAU", 1e-3), model=v.get("MODEL", ""))

    def given(seq: Any) -> Optional[tuple]:
        return tuple(seq) if seq is not None else None

    studies: Dict[str, Study] = {}
    if v.get("GREEDY", True):
        studies["greedy_learner"] = greedy_learner(dataset, lrs=given(v.get("GREEDY_LRS")),
                                                   seeds=given(v.get("GREEDY_SEEDS")),
                                                   pairs=tuple(v.get("GREEDY_PAIRS", ("distinct", "identical"))),
                                                   **shared)
    if v.get("REGULARIZATION", True):
        studies["regularization"] = regularization(dataset, l1s=given(v.get("REG_L1S")),
                                                   seeds=tuple(v.get("REG_SEEDS", (0, 1, 2))), lr=v.get("REG_LR"),
                                                   **shared)
    if v.get("SENSITIVITY", True):
        studies["sensitivity"] = sensitivity(dataset, epsilons=given(v.get("SENS_EPSILONS")),
                                             windows=given(v.get("SENS_WINDOWS")),
                                             alphas=given(v.get("SENS_ALPHAS")), periods=given(v.get("SENS_PERIODS")),
                                             seeds=tuple(v.get("SENS_SEEDS", (0, 1, 2))), **shared)
    name = v.get("EXECUTOR", "local")
    if name == "local":
        executor = make_executor("local", threads=v.get("THREADS"))
    elif name == "processes":
        executor = make_executor("processes", workers=v.get("WORKERS"), threads=v.get("THREADS"),
                                 runs_per_gpu=v.get("RUNS_PER_GPU", 1))
    else:
        executor = make_executor("ray", address=v.get("RAY_ADDRESS"), cpus_per_run=v.get("RAY_CPUS_PER_RUN", 1),
                                 gpus_per_run=v.get("RAY_GPUS_PER_RUN"), num_cpus=v.get("WORKERS"))
    return StudyPlan(studies, executor, v.get("LOG_DIR", "logging"), v.get("CKPT_DIR", "checkpoints"),
                     v.get("DATA_DIR"))
