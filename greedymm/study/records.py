"""A study's records (SPEC Sec. 11): what one run records (`execute_run`: train or resume, CUR, sparsity; a failure is
a record too), and logging/studies/<study>/runs.jsonl, one JSON line per finished run appended whole by the process
that runs the study (a torn last line is skipped when read and cut off before the next append).
"""
from __future__ import annotations

import logging
import math
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch

from ..experiment.runs import Run, error_fields
from ..io import append_jsonl, read_jsonl
from ..models.zoo import model_factory
from ..runtime import default_device, device_name
from .grid import RunSpec

log = logging.getLogger(__name__)

RUNS_FILE = "runs.jsonl"
# What a record keeps of a run's measured record (the history and the paths of the run stay in its own folder).
RECORD_FIELDS = ("acc", "acc0", "acc1", "acc0_cut", "acc1_cut", "u_m1_m0", "u_m0_m1", "d_util", "d_util_undefined",
                 "fusion_spread", "d_speed", "val_acc", "test_acc", "test_acc0", "test_acc1", "best_epoch", "steps",
                 "steps_this_call", "stop_reason", "precision", "log_dir", "best_path")
# What a record keeps of the last checkpoint's CUR (SPEC Sec. 11: d_util at the best and at the last checkpoint), each
# with the suffix "_last".
LAST_FIELDS = ("acc", "acc0", "acc1", "u_m1_m0", "u_m0_m1", "d_util", "d_util_undefined", "fusion_spread")


def study_dir(log_dir: Union[str, Path], name: str) -> Path:
    """logging/studies/<name>/: the study's runs.jsonl, study.json and figures."""
    return Path(log_dir) / "studies" / name


def append_record(path: Union[str, Path], record: dict) -> None:
    """Append one record to a runs.jsonl as one whole line, flushed and synced (see `greedymm.io.append_jsonl`).

    Only one process may append to a file at a time (the study's runner: workers send their records back to it).
    """
    append_jsonl(path, record)


def read_records(path: Union[str, Path]) -> List[dict]:
    """The records of a runs.jsonl in file order; a missing file gives [], a torn or unreadable line is skipped."""
    return read_jsonl(path, missing_ok=True)


def failed_record(spec: RunSpec, err: BaseException, device: str = "", wall_s: float = math.nan) -> dict:
    """The record of a run that could not even report (its worker died, a Ray task failed)."""
    return {**spec.settings(), **error_fields(err), "wall_s": wall_s, "device": device, "host": socket.gethostname()}


def execute_run(spec: RunSpec, device: Optional[Union[str, torch.device]] = None,
                threads: Optional[int] = None) -> dict:
    """Train (or resume) one run of a study, measure its CUR and sparsity, and return its record.

    Args:
        spec: the run.
        device: where to train; CUDA when available if None.
        threads: torch CPU threads for this run (restored afterwards); None leaves them as they are.
    Returns:
        spec.settings() plus status ("ok" or "failed"), the figures (RECORD_FIELDS of the best checkpoint, LAST_FIELDS
        of the last one with the suffix "_last", rho, train_time_s, epochs) or the error and traceback, wall_s (this
        call), device and host.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    start = time.perf_counter()
    dev = torch.device(device) if device is not None else default_device()
    record: Dict[str, Any] = spec.settings()
    try:
        run = Run(spec.data_config(), spec.train_config(), model_factory(spec.model), spec.model, dev, progress=False,
                  measures=False)  # the studies need the CUR, not the modality measures
        trained, out = run.measure(resume=True)
        if out["status"] != "ok":
            record.update({k: out[k] for k in ("status", "error", "traceback")})
        else:
            record.update({k: out.get(k, math.nan) for k in RECORD_FIELDS})
            history = trained.get("history") or []
            record["epochs"] = len(history)
            record["train_time_s"] = float(sum(e.get("time", 0.0) for e in history))
            if run.method.multimodal:  # the last checkpoint too: the best one hides what training ended with
                last = run.utilization(trained, checkpoint="last")
                record.update({f"{k}_last": last.get(k, math.nan) for k in LAST_FIELDS})
            record["rho"] = run.sparsity(out["best_path"], spec.tau)
            record["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded: the study goes on with its other runs
        log.exception("run %s failed", spec.run_name)
        record.update(error_fields(err))
    finally:
        if threads is not None:
            torch.set_num_threads(previous)
    record.update({"wall_s": time.perf_counter() - start, "device": device_name(dev), "host": socket.gethostname()})
    return record


def latest(records: Iterable[dict], field: str = "key") -> Dict[str, dict]:
    """The last record of each run (by `field`, the RunSpec key by default): a retry replaces a failure."""
    out: Dict[str, dict] = {}
    for r in records:
        if field in r:
            out[r[field]] = r
    return out


def finished_keys(records: Iterable[dict]) -> set:
    """The keys of the runs whose latest record is a success (those a re-run skips)."""
    return {k for k, r in latest(records).items() if r.get("status") == "ok"}


def ok_records(records: Sequence[dict], require: Sequence[str] = ()) -> List[dict]:
    """The successful records whose `require` fields are finite numbers (what a figure can plot)."""
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    return [r for r in records if r.get("status") == "ok" and all(finite(r.get(k)) for k in require)]
