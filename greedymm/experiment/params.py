"""The notebooks' settings (their papermill `parameters` cells; SPEC Sec. 6-11), shared with the command: kinds and
defaults (the methods' own from their settings dataclasses and sweeps), type checks with clear errors, the plans
they make (the dataset's presets wherever a setting is None), and the notebooks' set-up.
"""
from __future__ import annotations

import logging
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .. import __version__
from ..config import DataConfig, TrainConfig
from ..methods.base import methods
from ..models.fusions import fusion_names
from ..models.zoo import model_factory
from ..runtime import default_device
from ..study.executors import EXECUTORS, Executor, make_executor
from ..study.grid import Study
from ..study.presets import greedy_learner, regularization, sensitivity
from .table import unimodal_rows

# name: (kind, may be None, default). Kinds: str, bool, int, float (an int is fine), list[int], list[float], list[str].
# greedy_multimodal.ipynb's parameters; the methods' own (EPSILON, WINDOW, ...) follow UNIMODAL (`method_parameters`).
TABLE_PARAMETERS: Dict[str, Tuple[str, bool, Any]] = {
    "DATASET": ("str", False, "modelnet40"), "DATA_DIR": ("str", False, ""), "DATA_URL": ("str", False, ""),
    "make_npy_files": ("bool", False, False), "VIEWS": ("list[int]", True, None), "IMAGE_SIZE": ("int", True, None),
    "BATCH_SIZE": ("int", True, None), "LR": ("float", True, None), "MOMENTUM": ("float", True, None),
    "MAX_EPOCHS": ("int", True, None), "ALGORITHMS": ("list[str]", False, None), "UNIMODAL": ("bool", False, True),
    "SEEDS": ("list[int]", False, [0, 1, 2]), "LOG_DIR": ("str", False, "logging"),
    "CKPT_DIR": ("str", False, "checkpoints"), "RESUME": ("bool", False, True), "EVAL_TEST": ("bool", False, True),
    "NUM_WORKERS": ("int", False, 2), "EMBEDDED_PER_CLASS": ("int", False, 120),
    "EMBEDDED_TEST_PER_CLASS": ("int", False, 40), "PRECISION": ("str", False, "auto"),
    "PROGRESS": ("bool", False, True), "MODEL": ("str", False, ""), "FUSION": ("str", False, "mmtm"),
}
# paper_studies.ipynb's parameters; the sweeps' grids (SENS_EPSILONS, ...) follow SENSITIVITY (`sweep_parameters`).
STUDY_PARAMETERS: Dict[str, Tuple[str, bool, Any]] = {
    "DATASET": ("str", False, "modelnet40"), "DATA_DIR": ("str", True, None), "IMAGE_SIZE": ("int", True, None),
    "BATCH_SIZE": ("int", True, None), "MAX_EPOCHS": ("int", True, None), "EMBEDDED_PER_CLASS": ("int", True, None),
    "EMBEDDED_TEST_PER_CLASS": ("int", True, None), "MODEL": ("str", False, ""),
    "GREEDY": ("bool", False, True), "GREEDY_LRS": ("list[float]", True, None),
    "GREEDY_SEEDS": ("list[int]", True, None), "GREEDY_PAIRS": ("list[str]", False, ["distinct", "identical"]),
    "GREEDY_FUSIONS": ("list[str]", False, ["mmtm"]),
    "REGULARIZATION": ("bool", False, True), "REG_L1S": ("list[float]", True, None), "REG_LR": ("float", True, None),
    "REG_SEEDS": ("list[int]", False, [0, 1, 2]), "REG_IMAGE_SIZE": ("int", True, None),
    "REG_EMBEDDED_PER_CLASS": ("int", True, None), "REG_MAX_EPOCHS": ("int", True, None),
    "TAU": ("float", False, 0.001),
    "SENSITIVITY": ("bool", False, True), "SENS_SEEDS": ("list[int]", False, [0, 1, 2]),
    "EXECUTOR": ("str", False, "local"), "WORKERS": ("int", True, None), "THREADS": ("int", True, None),
    "RUNS_PER_GPU": ("int", False, 1), "RAY_ADDRESS": ("str", True, None), "RAY_CPUS_PER_RUN": ("float", False, 1),
    "RAY_GPUS_PER_RUN": ("float", True, None), "LOG_DIR": ("str", False, "logging"),
    "CKPT_DIR": ("str", False, "checkpoints"),
}
_EXAMPLES = {"list[int]": "[0, 1, 2]", "list[float]": "[0.001, 0.01, 0.1]", "list[str]": '["vanilla", "guided"]',
             "int": "8", "float": "0.1", "bool": "true", "str": "embedded"}
_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}


def _kind_of(tp: Any) -> str:
    """The parameter kind of a settings field's type (Optional[X] is X's)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return _KINDS[args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp]


def method_parameters() -> Dict[str, Tuple[str, str]]:
    """The notebook parameters that the methods' settings declare: NAME -> (setting, kind), e.g. EPSILON ->
    ("epsilon", "float"); each is None by default (the dataset's preset)."""
    out: Dict[str, Tuple[str, str]] = {}
    for method in methods().values():
        hints = typing.get_type_hints(method.Settings)
        for f in fields(method.Settings):
            if f.metadata.get("param"):
                out.setdefault(f.metadata["param"], (f.name, _kind_of(hints[f.name])))
    return out


def sweep_parameters() -> Dict[str, Tuple[str, str]]:
    """The studies notebook's parameters that replace the methods' sweep grids: NAME -> (setting, list kind)."""
    out: Dict[str, Tuple[str, str]] = {}
    for method in methods().values():
        hints = typing.get_type_hints(method.Settings)
        for sweep in method.sweeps:
            if sweep.param:
                out.setdefault(sweep.param, (sweep.setting, f"list[{_kind_of(hints[sweep.setting])}]"))
    return out


def _insert_after(spec: Dict[str, tuple], after: str, extra: Dict[str, tuple]) -> Dict[str, tuple]:
    items = list(spec.items())
    i = [k for k, _ in items].index(after) + 1
    return dict(items[:i] + list(extra.items()) + items[i:])


def parameter_spec(studies: bool = False) -> Dict[str, Tuple[str, bool]]:
    """A notebook's parameters as name -> (kind, may be None), in its cell's order.

    Args:
        studies: paper_studies.ipynb's; else greedy_multimodal.ipynb's.
    """
    if studies:
        extra = {name: (kind, True, None) for name, (_, kind) in sweep_parameters().items()}
        spec = _insert_after(STUDY_PARAMETERS, "SENSITIVITY", extra)
    else:
        extra = {name: (kind, True, None) for name, (_, kind) in method_parameters().items()}
        spec = _insert_after(TABLE_PARAMETERS, "UNIMODAL", extra)
    return {name: (kind, optional) for name, (kind, optional, _) in spec.items()}


def parameter_defaults(studies: bool = False) -> Dict[str, Any]:
    """The defaults of a notebook's parameters (its cell's values; the command's defaults)."""
    if studies:
        spec = {**STUDY_PARAMETERS, **{n: (k, True, None) for n, (_, k) in sweep_parameters().items()}}
    else:
        paper_two_branch = [name for name, m in methods().items() if m.paper_row and m.multimodal]
        spec = {**TABLE_PARAMETERS, "ALGORITHMS": ("list[str]", False, paper_two_branch),
                **{n: (k, True, None) for n, (_, k) in method_parameters().items()}}
    return {name: spec[name][2] for name in parameter_spec(studies)}


def _is(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    elem = kind[5:-1]  # list[...]
    return isinstance(value, (list, tuple)) and all(_is(elem, v) for v in value)


def check_parameters(values: Mapping[str, Any], spec: Optional[Mapping[str, Tuple[str, bool]]] = None) -> None:
    """Raise TypeError for the first setting of the wrong type, saying what it got, what is expected and how to
    pass it with papermill.

    Args:
        values: the settings by name (e.g. the notebook's `globals()`); names not in `spec` are ignored.
        spec: name -> (kind, may be None); the main notebook's (`parameter_spec()`) when None.
    """
    for name, (kind, optional) in (spec if spec is not None else parameter_spec()).items():
        if name not in values:
            continue
        value = values[name]
        if (value is None and optional) or (value is not None and _is(kind, value)):
            continue
        example = _EXAMPLES[kind]
        hint = ""
        if kind.startswith("list") and isinstance(value, str):
            hint = (f" papermill's -p passes text, not lists: pass YAML instead, e.g. `-y '{name}: {example}'` or a "
                    f"parameters file with `{name}: {example}` and `-f params.yaml`.")
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}; it must be a {kind}"
                        f"{' or None' if optional else ''}, e.g. {name} = {example}.{hint}")


@dataclass
class ExperimentPlan:
    """What the notebook (and `python -m greedymm run`) runs: the settings of every run and the Table-1 rows."""

    data: DataConfig  # the data settings, the dataset's preset filled in
    train: TrainConfig  # the training settings, the dataset's preset filled in (algorithm and seed set per run)
    algorithms: List[str] = field(default_factory=list)  # the rows, in table order
    seeds: List[int] = field(default_factory=list)  # one run per row and seed
    resume: bool = True  # continue runs from their last checkpoint
    progress: bool = True  # tqdm bars
    model: str = ""  # "" = the dataset's model; or "module:function", a function num_classes -> two-branch model


def experiment_plan(values: Mapping[str, Any]) -> ExperimentPlan:
    """Check the notebook's settings and turn them into configs, filling None with the dataset's presets.

    Args:
        values: the notebook's settings by name (its `globals()`); see `parameter_spec()`.
    Returns:
        The ExperimentPlan.
    """
    check_parameters(values)
    v = dict(values)
    allowed = list(methods())
    unknown = [a for a in v["ALGORITHMS"] if a not in allowed]
    if unknown:
        raise ValueError(f"ALGORITHMS has {unknown}; allowed: {', '.join(allowed)} (the uni-modal rows are also "
                         "switched on by UNIMODAL = True)")
    if not v["SEEDS"]:
        raise ValueError("SEEDS is empty: give at least one seed, e.g. SEEDS = [0]")
    chosen = set(v["ALGORITHMS"]) | (set(unimodal_rows()) if v.get("UNIMODAL") else set())
    if not chosen:
        raise ValueError("nothing to train: ALGORITHMS is empty and UNIMODAL is False")

    def given(**kw: Any) -> Dict[str, Any]:
        return {k: val for k, val in kw.items() if val is not None}

    data = DataConfig.for_dataset(
        v["DATASET"], data_dir=v["DATA_DIR"], url=v.get("DATA_URL", ""), make_npy_files=v["make_npy_files"],
        num_workers=v["NUM_WORKERS"], embedded_per_class=v["EMBEDDED_PER_CLASS"],
        embedded_test_per_class=v["EMBEDDED_TEST_PER_CLASS"],
        **given(views=tuple(v["VIEWS"]) if v.get("VIEWS") is not None else None, image_size=v.get("IMAGE_SIZE"),
                batch_size=v.get("BATCH_SIZE")))
    options = {setting: v[name] for name, (setting, _) in method_parameters().items() if v.get(name) is not None}
    train = TrainConfig.for_dataset(
        v["DATASET"], log_dir=v["LOG_DIR"], ckpt_dir=v["CKPT_DIR"], precision=v.get("PRECISION", "auto"),
        eval_test=v.get("EVAL_TEST", True), options=options, fusion=v.get("FUSION", "mmtm"),
        **given(lr=v.get("LR"), momentum=v.get("MOMENTUM"), max_epochs=v.get("MAX_EPOCHS")))
    model = v.get("MODEL", "")
    model_factory(model)  # a bad name fails here, with the names allowed, not in the first run
    return ExperimentPlan(data, train, [a for a in allowed if a in chosen], [int(s) for s in v["SEEDS"]],
                          v.get("RESUME", True), v.get("PROGRESS", True), model)


@dataclass
class StudyPlan:
    """What the studies notebook (and `python -m greedymm study`) runs."""

    studies: Dict[str, Study]  # "greedy_learner" (+ "greedy_learner_<fusion>"), "regularization", "sensitivity"
    executor: Executor  # where the runs execute
    log_dir: str  # root of the runs' logs; the studies' folders are log_dir/studies/<name>/
    ckpt_dir: str  # root of the runs' checkpoints
    data_dir: Optional[str] = None  # where the data lives (None: the dataset's default)


def study_plan(values: Mapping[str, Any]) -> StudyPlan:
    """Check the studies notebook's settings and turn them into studies and an executor.

    Args:
        values: the settings by name (the notebook's `globals()`); see `parameter_spec(studies=True)`. A grid left
            at None is the paper's (greedymm.study.presets).
    Returns:
        The StudyPlan.
    """
    spec = parameter_spec(studies=True)
    check_parameters(values, spec)
    v = {k: values[k] for k in spec if k in values}
    if v.get("EXECUTOR", "local") not in EXECUTORS:
        raise ValueError(f"EXECUTOR={v['EXECUTOR']!r} is unknown; allowed: {', '.join(EXECUTORS)}")
    dataset = v["DATASET"]
    data: Dict[str, Any] = {k: v[p] for k, p in (("image_size", "IMAGE_SIZE"), ("batch_size", "BATCH_SIZE"))
                            if v.get(p) is not None}
    # the dataset's own fields (embedded's): elsewhere they would rename the runs for nothing
    own = DataConfig.for_dataset(dataset).identity()
    data.update({k: v[p] for k, p in (("embedded_per_class", "EMBEDDED_PER_CLASS"),
                                      ("embedded_test_per_class", "EMBEDDED_TEST_PER_CLASS"))
                 if v.get(p) is not None and k in own})
    train: Dict[str, Any] = {"max_epochs": v["MAX_EPOCHS"]} if v.get("MAX_EPOCHS") is not None else {}
    shared = dict(data=data, train=train, tau=v.get("TAU", 1e-3), model=v.get("MODEL", ""))
    # the regularization study's own data size and budget (its optimizer, batch 8 without momentum, needs more)
    reg_data = {**data, **{k: v[p] for k, p in (("image_size", "REG_IMAGE_SIZE"),
                                                 ("embedded_per_class", "REG_EMBEDDED_PER_CLASS"))
                           if v.get(p) is not None and (k == "image_size" or k in own)}}
    reg_train = {**train, **({"max_epochs": v["REG_MAX_EPOCHS"]} if v.get("REG_MAX_EPOCHS") is not None else {})}

    def given(seq: Any) -> Optional[tuple]:
        return tuple(seq) if seq is not None else None

    studies: Dict[str, Study] = {}
    if v.get("GREEDY", True):
        fusions = list(v.get("GREEDY_FUSIONS", ["mmtm"]))
        unknown = [f for f in fusions if f not in fusion_names()]
        if unknown or not fusions:
            raise ValueError(f"GREEDY_FUSIONS={fusions!r}: give one or more of {', '.join(fusion_names())}")
        for fusion in dict.fromkeys(fusions):  # one study per fusion: its own figures (SPEC Sec. 13)
            key, name, extra = "greedy_learner", None, {}
            if fusion != "mmtm":  # the MMTM study keeps its name and runs
                key, name = f"greedy_learner_{fusion}", f"greedy_learner_{dataset}_{fusion}"
                extra = {"train": {**shared["train"], "fusion": fusion}}
            studies[key] = greedy_learner(dataset, lrs=given(v.get("GREEDY_LRS")), seeds=given(v.get("GREEDY_SEEDS")),
                                          pairs=tuple(v.get("GREEDY_PAIRS", ("distinct", "identical"))), name=name,
                                          **{**shared, **extra})
    if v.get("REGULARIZATION", True):
        studies["regularization"] = regularization(dataset, l1s=given(v.get("REG_L1S")),
                                                   seeds=tuple(v.get("REG_SEEDS", (0, 1, 2))), lr=v.get("REG_LR"),
                                                   **{**shared, "data": reg_data, "train": reg_train})
    if v.get("SENSITIVITY", True):
        sweeps = {setting: given(v.get(name)) for name, (setting, _) in sweep_parameters().items()}
        studies["sensitivity"] = sensitivity(dataset, sweeps=sweeps, seeds=tuple(v.get("SENS_SEEDS", (0, 1, 2))),
                                             **shared)
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


def notebook_setup(studies: bool = False) -> Tuple[torch.device, str]:
    """A notebook's set-up after `greedymm` is importable: logging to the notebook, and the version line to print.

    Args:
        studies: paper_studies.ipynb's (warnings only; its runs pick their devices); else greedy_multimodal.ipynb's
            (info; the device, cuDNN's autotuner on CUDA, torch seeded).
    Returns:
        (the device, the line to print).
    """
    logging.basicConfig(level=logging.WARNING if studies else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    device = default_device()
    if studies:
        return device, (f"greedymm {__version__}, torch {torch.__version__}, {torch.cuda.device_count()} GPU(s), "
                        f"{os.cpu_count()} CPU cores")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.manual_seed(0)
    return device, (f"greedymm {__version__}, torch {torch.__version__}, device {device}"
                    + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
