"""The notebooks' settings (their papermill `parameters` cells; SPEC Sec. 6-10): type checks with clear errors,
and the paper's per-dataset presets filled in wherever a setting is left at None.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .config import ALGORITHMS, DataConfig, TrainConfig

# name: (kind, may be None). Kinds: str, bool, int, float (an int is fine), list[int], list[float], list[str].
PARAMETERS: Dict[str, Tuple[str, bool]] = {
    "DATASET": ("str", False), "DATA_DIR": ("str", False), "DATA_URL": ("str", False),
    "make_npy_files": ("bool", False), "VIEWS": ("list[int]", True), "IMAGE_SIZE": ("int", True),
    "BATCH_SIZE": ("int", True), "LR": ("float", True), "MOMENTUM": ("float", True), "MAX_EPOCHS": ("int", True),
    "ALGORITHMS": ("list[str]", False), "UNIMODAL": ("bool", False), "EPSILON": ("float", True),
    "WINDOW": ("int", True), "OGM_ALPHA": ("float", True), "GBLEND_PERIOD": ("int", True),
    "SEEDS": ("list[int]", False), "LOG_DIR": ("str", False), "CKPT_DIR": ("str", False),
    "RESUME": ("bool", False), "EVAL_TEST": ("bool", False), "NUM_WORKERS": ("int", False),
    "EMBEDDED_PER_CLASS": ("int", False),
    "EMBEDDED_TEST_PER_CLASS": ("int", False), "PRECISION": ("str", False), "PROGRESS": ("bool", False),
}
_EXAMPLES = {"list[int]": "[0, 1, 2]", "list[float]": "[0.001, 0.01, 0.1]", "list[str]": '["vanilla", "guided"]',
             "int": "8", "float": "0.1", "bool": "true", "str": "embedded"}


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


def check_parameters(values: Mapping[str, Any], spec: Mapping[str, Tuple[str, bool]] = PARAMETERS) -> None:
    """Raise TypeError for the first setting of the wrong type, saying what it got, what is expected and how to
    pass it with papermill.

    Args:
        values: the settings by name (e.g. the notebook's `globals()`); names not in `spec` are ignored.
        spec: name -> (kind, may be None).
    """
    for name, (kind, optional) in spec.items():
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
    """What the notebook runs: the settings of every run and the Table-1 rows."""

    data: DataConfig  # the data settings, the dataset's preset filled in
    train: TrainConfig  # the training settings, the dataset's preset filled in (algorithm and seed set per run)
    algorithms: List[str] = field(default_factory=list)  # the rows, in the paper's Table-1 order
    seeds: List[int] = field(default_factory=list)  # one run per row and seed


def plan_from_parameters(values: Mapping[str, Any]) -> ExperimentPlan:
    """Check the notebook's settings and turn them into configs, filling None with the dataset's presets.

    Args:
        values: the notebook's settings by name (its `globals()`); see PARAMETERS.
    Returns:
        The ExperimentPlan.
    """
    check_parameters(values)
    v = dict(values)
    unknown = [a for a in v["ALGORITHMS"] if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"ALGORITHMS has {unknown}; allowed: {', '.join(ALGORITHMS)} (the uni-modal rows are also "
                         "switched on by UNIMODAL = True)")
    if not v["SEEDS"]:
        raise ValueError("SEEDS is empty: give at least one seed, e.g. SEEDS = [0]")
    chosen = set(v["ALGORITHMS"]) | ({"unimodal_m0", "unimodal_m1"} if v.get("UNIMODAL") else set())
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
    train = TrainConfig.for_dataset(
        v["DATASET"], log_dir=v["LOG_DIR"], ckpt_dir=v["CKPT_DIR"], precision=v.get("PRECISION", "auto"),
        eval_test=v.get("EVAL_TEST", True),
        **given(lr=v.get("LR"), momentum=v.get("MOMENTUM"), max_epochs=v.get("MAX_EPOCHS"),
                epsilon=v.get("EPSILON"), window=v.get("WINDOW"), ogm_alpha=v.get("OGM_ALPHA"),
                gblend_period=v.get("GBLEND_PERIOD")))
    return ExperimentPlan(data, train, [a for a in ALGORITHMS if a in chosen], [int(s) for s in v["SEEDS"]])
