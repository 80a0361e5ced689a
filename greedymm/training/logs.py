"""A run's logs (SPEC Sec. 4 and 6: the CLS of every step, the figures of every epoch): logging/<run>/steps.jsonl and
epochs.jsonl, written line by line, reopened at a checkpoint's position on resume (and repaired when they were lost),
and read back.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Union

from ..io import read_jsonl

log = logging.getLogger(__name__)

LOGS = ("steps", "epochs")


class RunLogs:
    """steps.jsonl and epochs.jsonl of a run while it trains.

    Args:
        log_dir: logging/<run>/.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.files: Dict[str, Any] = {}  # name -> open file while the run trains

    def open(self, offsets: Dict[str, int], history: List[dict], step: int) -> None:
        """Open steps.jsonl and epochs.jsonl at the checkpoint's position.

        Lines written after the checkpoint are cut off (they are replayed identically). A log shorter than the
        checkpoint's position (its folder was lost, e.g. only the checkpoints were kept on Drive) is never padded:
        epochs.jsonl is rewritten from the checkpoint's history, and steps.jsonl keeps the step records it still
        has, followed by one {"gap": [first, last]} record for the steps it lost.
        """
        self.files = {}
        for name in LOGS:
            path = self.log_dir / f"{name}.jsonl"
            want = offsets.get(name, 0)
            size = path.stat().st_size if path.exists() else 0
            if size >= want:
                f = open(path, "r+" if path.exists() else "w")
                f.truncate(want)
                f.seek(want)
            elif name == "epochs":
                log.warning("%s is shorter than the checkpoint knows: rewriting it from the checkpoint's history", path)
                f = open(path, "w")
                f.writelines(json.dumps(record) + "\n" for record in history)
            else:
                kept = complete_step_records(path, step)
                first = kept[-1]["step"] + 1 if kept else 1
                log.warning("%s lacks steps %d..%d that the checkpoint has trained (its log folder was lost?); "
                            "continuing the log after a gap record", path, first, step)
                f = open(path, "w")
                f.writelines(json.dumps(record) + "\n" for record in kept)
                f.write(json.dumps({"gap": [first, step]}) + "\n")
            self.files[name] = f

    def write(self, name: str, record: dict) -> None:
        """Append one record as a JSON line to the log `name` ("steps" or "epochs")."""
        self.files[name].write(json.dumps(record) + "\n")

    def offsets(self) -> Dict[str, int]:
        """The logs' current lengths in bytes (flushed first): where a resume from this moment reopens them."""
        for f in self.files.values():
            f.flush()
        return {name: f.tell() for name, f in self.files.items()}

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def complete_step_records(path: Path, up_to: int) -> List[dict]:
    """The step records 1, 2, ... of a step log that are complete and consecutive, up to step `up_to`."""
    kept: List[dict] = []
    if not path.exists():
        return kept
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if record.get("step") != len(kept) + 1 or record["step"] > up_to:
                break
            kept.append(record)
    return kept


def read_steps(log_dir: Union[str, Path]) -> List[dict]:
    """The per-step records (steps.jsonl) of a run; gap records of a lost log are skipped."""
    return [r for r in read_jsonl(Path(log_dir) / "steps.jsonl") if "step" in r]


def read_epochs(log_dir: Union[str, Path]) -> List[dict]:
    """The per-epoch records (epochs.jsonl) of a run."""
    return read_jsonl(Path(log_dir) / "epochs.jsonl")
