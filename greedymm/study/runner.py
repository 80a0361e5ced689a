"""Running a study (SPEC Sec. 11): expand its grid, skip the runs already recorded as finished, execute the rest
(resuming unfinished ones) with the chosen executor, append each record to runs.jsonl as it arrives, and rebuild
the study's figures from the file.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from matplotlib.figure import Figure

from ..data.loader import prepare_data
from ..io import save_figure, save_json, write_text
from .executors import Executor, RayExecutor, executor_of
from .figures import plot_cls_cur, study_figures, summary_table
from .grid import RunSpec, Study, expand, swept_settings
from .stats import cls_cur_correlations
from .records import RUNS_FILE, append_record, finished_keys, latest, read_records, study_dir

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    """What `run_study` did and what the study holds now."""

    study: Study  # the study
    records: List[dict]  # the latest record of each of its runs, in grid order (runs never recorded are absent)
    ran: int  # runs executed by this call
    skipped: int  # runs already finished (recorded "ok") before this call
    path: Path  # its runs.jsonl
    figures: Dict[str, Figure] = field(default_factory=dict)  # its figures, by name
    figure_paths: Dict[str, Path] = field(default_factory=dict)  # the PNGs written, by name

    @property
    def failed(self) -> List[dict]:
        """The records of the runs that failed (re-running the study retries them)."""
        return [r for r in self.records if r.get("status") != "ok"]


def study_records(specs: Sequence[RunSpec], records: Sequence[dict]) -> List[dict]:
    """The latest record of each run in `specs`, in their order (runs without a record are left out)."""
    by_key = latest(records)
    return [by_key[s.key] for s in specs if s.key in by_key]


def _prepare(specs: Sequence[RunSpec]) -> None:
    """Download and cache each dataset once, here, before workers start (they then only read the cache)."""
    seen = set()
    for spec in specs:
        key = json.dumps({k: v for k, v in spec.data.items() if k != "views"}, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            prepare_data(spec.data_config(), progress=False)


def run_study(study: Study, executor: Union[str, Executor, None] = None, log_dir: Union[str, Path] = "logging",
              ckpt_dir: Union[str, Path] = "checkpoints", data_dir: Optional[Union[str, Path]] = None,
              prepare: Optional[bool] = None, save: bool = True,
              callback: Optional[Callable[[dict], None]] = None) -> StudyResult:
    """Run every unfinished run of a study, record each, and rebuild its figures.

    A run whose latest record is "ok" (for the same tau and budget) is skipped, so re-running a finished study
    trains nothing; an interrupted run resumes from its checkpoint; a failed run is tried again. Records are
    appended to logging/studies/<study>/runs.jsonl by this process only, as they arrive.

    Args:
        study: the Study.
        executor: "local" (default), "processes", "ray", or an executor object (make_executor).
        log_dir, ckpt_dir: roots of the runs' logs and checkpoints; the study's folder is log_dir/studies/<name>/.
        data_dir: where the data lives; None = each dataset's default.
        prepare: prepare the data in this process before running (default: yes, except on a Ray cluster given by
            address, whose nodes prepare their own).
        save: write the figures as PNGs into the study's folder.
        callback: called with each new record as it arrives (e.g. to print a line).
    Returns:
        The StudyResult.
    """
    runner = executor_of(executor)
    specs = expand(study, log_dir, ckpt_dir, data_dir)
    folder = study_dir(log_dir, study.name)
    path = folder / RUNS_FILE
    save_json(study.to_dict(), folder / "study.json")
    done = finished_keys(read_records(path))
    todo = [s for s in specs if s.key not in done]
    log.info("study %s: %d runs, %d already finished, %d to run (%s)", study.name, len(specs),
             len(specs) - len(todo), len(todo), getattr(runner, "name", type(runner).__name__))
    if prepare is None:
        prepare = not (isinstance(runner, RayExecutor) and runner.address is not None)
    if todo and prepare:
        _prepare(todo)
    for record in runner.map(todo):
        append_record(path, record)
        if callback is not None:
            callback(record)
    records = study_records(specs, read_records(path))
    figures = study_figures(study.figures, records)
    paths = {name: save_figure(fig, folder / f"{name}.png") for name, fig in figures.items()} if save else {}
    return StudyResult(study, records, len(todo), len(specs) - len(todo), path, figures, paths)


def load_study(study: Study, log_dir: Union[str, Path] = "logging", ckpt_dir: Union[str, Path] = "checkpoints",
               data_dir: Optional[Union[str, Path]] = None) -> StudyResult:
    """A study's recorded results and figures without running anything (nothing is written).

    Args:
        study, log_dir, ckpt_dir, data_dir: as in `run_study`.
    Returns:
        The StudyResult (ran = 0).
    """
    specs = expand(study, log_dir, ckpt_dir, data_dir)
    path = study_dir(log_dir, study.name) / RUNS_FILE
    records = study_records(specs, read_records(path))
    skipped = sum(r.get("status") == "ok" for r in records)
    return StudyResult(study, records, 0, skipped, path, study_figures(study.figures, records))


def record_line(record: dict) -> str:
    """One line about a study's run as it finishes (the studies notebook prints it)."""
    if record["status"] != "ok":
        return f"{record['run_name']}: FAILED {record['error']}"
    return (f"{record['run_name']}: {record['pair']}, lr {record['lr']:g}, lambda {record['l1']:g}: "
            f"acc {record['acc']:.3f}, d_util {record['d_util']:+.3f}"
            + (f" (undefined: {record['d_util_undefined']})" if record.get("d_util_undefined") else "")
            + f", d_speed {record['d_speed']:+.3f}, "
            f"rho {record['rho']:.3f} ({record['steps_this_call']} steps now, {record['wall_s']:.0f} s)")


def result_line(result: StudyResult, wall_s: float, executor: str) -> str:
    """One line about a study that ran: its runs recorded, run now, finished before, failed; its time."""
    return (f"{result.study.name}: {len(result.records)} runs recorded, {result.ran} run now, {result.skipped} "
            f"already finished, {len(result.failed)} failed; {wall_s:.0f} s with the {executor} executor")


def study_table(key: str, records: Sequence[dict]) -> str:
    """The table the studies notebook shows under a study of its plan ("greedy_learner" and its late-fusion
    "greedy_learner_<fusion>", "regularization", "sensitivity"): the figures' numbers by pair kind, by lambda, or by
    method and swept setting."""
    base = "greedy_learner" if key.startswith("greedy_learner") else key  # "greedy_learner_<fusion>" too
    by, keys = {"greedy_learner": (("dataset", "pair"), ("d_util", "d_speed", "acc")),
                "regularization": (("l1",), ("rho", "d_util", "d_util_last", "d_speed", "acc"))}.get(
        base, (("algorithm", *swept_settings()), ("acc", "d_util")))
    return summary_table(records, by, keys)


def result_summary(result: StudyResult, wall_s: float) -> dict:
    """What summary.json keeps of a study's result: its counts, time, files and figures."""
    return {"study": result.study.name, "runs": len(result.records), "ran": result.ran, "skipped": result.skipped,
            "failed": len(result.failed), "wall_s": wall_s, "runs_jsonl": str(result.path),
            "figures": {k: str(p) for k, p in result.figure_paths.items()}}


# The studies whose records form the CLS -> CUR population (their unregularized vanilla runs; MMTM only: a late-fusion
# greedy-learner study, "greedy_learner_<fusion>", draws its own CLS -> CUR figure).
POOLED = ("greedy_learner", "regularization")


def pooled_cls_cur(records: Sequence[dict], log_dir: Union[str, Path]) -> Tuple[dict, Optional[Figure]]:
    """CLS -> CUR over the pooled records of several studies (greedymm.study.stats.cls_cur_population): the figure,
    saved as log_dir/studies/cls_cur_population.png, and Spearman's correlation overall and within each pair kind.

    Args:
        records: the studies' records (e.g. the greedy-learner and regularization studies').
        log_dir: the runs' log root.
    Returns:
        ({"figure": path, "all": {"spearman", "n"}, "<pair>": {...}}, the figure), or ({}, None) without records.
    """
    if not records:
        return {}, None
    figure = plot_cls_cur(records)
    out: Dict[str, Any] = {"figure": str(save_figure(figure, Path(log_dir) / "studies" / "cls_cur_population.png"))}
    out.update({k: {"spearman": rho, "n": n} for k, (rho, n) in cls_cur_correlations(records).items()})
    return out, figure


def write_summary(log_dir: Union[str, Path], dataset: str, executor: str, results: Dict[str, dict],
                  **extra: Any) -> Path:
    """Write log_dir/studies/summary.json: the dataset, the executor, each study's `result_summary`, and `extra`
    (e.g. cls_cur: the CLS -> CUR correlations over the pooled population)."""
    summary = {"dataset": dataset, "executor": executor, "studies": results, **extra}
    return write_text(json.dumps(summary, indent=2), Path(log_dir) / "studies" / "summary.json")
