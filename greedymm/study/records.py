"""A study's results file, logging/studies/<study>/runs.jsonl (SPEC Sec. 11): one JSON line per finished run,
appended whole by the one process that runs the study; a torn last line (a crash mid-write) is skipped when read
and cut off before the next append.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Union

log = logging.getLogger(__name__)

RUNS_FILE = "runs.jsonl"


def study_dir(log_dir: Union[str, Path], name: str) -> Path:
    """logging/studies/<name>/: the study's runs.jsonl, study.json and figures."""
    return Path(log_dir) / "studies" / name


def _clean(value: Any) -> Any:
    """JSON-ready values: tuples become lists, paths text; NaN stays NaN (json writes and reads it)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def append_record(path: Union[str, Path], record: dict) -> None:
    """Append one record as one whole line, flushed and synced; a torn last line left by a crash is cut off first.

    Only one process may append to a file at a time (the study's runner: workers send their records back to it).

    Args:
        path: the runs.jsonl file (created with its folder if missing).
        record: a JSON-ready dict (tuples and paths are converted).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(_clean(record), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line: cut it off, after the last whole line
            tail = min(size, 1 << 20)
            while True:
                chunk = os.pread(fd, tail, size - tail)
                cut = chunk.rfind(b"\n")
                if cut >= 0 or tail == size:
                    break
                tail = min(size, tail * 2)
            keep = size - tail + cut + 1 if cut >= 0 else 0
            log.warning("%s ended in a torn line (%d bytes): cut off before appending", path, size - keep)
            os.ftruncate(fd, keep)
        os.write(fd, line)  # O_APPEND: one write of the whole line at the end
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Union[str, Path]) -> List[dict]:
    """The records of a runs.jsonl in file order; a missing file gives [], a torn or unreadable line is skipped.

    Args:
        path: the runs.jsonl file.
    Returns:
        The records (dicts).
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                record = json.loads(raw)
            except ValueError:
                log.warning("%s line %d is not a whole JSON record (a torn write?): skipped", path, number)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


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
