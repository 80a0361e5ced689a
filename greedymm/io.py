"""Files never seen half-written (SPEC Sec. 6: checkpoints, logs and results survive a crash): atomic writes of JSON,
text, torch objects and figures (a temporary name, then a rename), and JSON lines appended and read. Imports nothing
heavy at module level: the processes that build data caches use it without torch.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, List, Union

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".tmp")


def write_text(text: str, path: PathLike) -> Path:
    """Write `text` to `path` atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def save_json(obj: Any, path: PathLike) -> Path:
    """Write `obj` (a dataclass or a JSON-ready value) as indented JSON with sorted keys, atomically."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    return write_text(json.dumps(data, indent=2, sort_keys=True), path)


def save_torch(obj: Any, path: PathLike) -> Path:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written checkpoint."""
    import torch  # here: the cache workers import this module and must not import torch

    path = Path(path)
    tmp = _temporary(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def link(src: PathLike, dest: PathLike) -> Path:
    """Make `dest` a second name of the file `src` (a copy where hard links are not supported), atomically.

    `src` is later replaced by rename, which gives it a new file and leaves this one as it is.
    """
    dest = Path(dest)
    tmp = _temporary(dest)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


def save_figure(fig: Any, path: PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically (tight bounding box)."""
    path = Path(path)
    tmp = _temporary(path)
    fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def jsonable(value: Any) -> Any:
    """JSON-ready values: tuples become lists, paths text, keys text; NaN stays NaN (json writes and reads it)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def append_jsonl(path: PathLike, record: dict) -> None:
    """Append one record as one whole line, flushed and synced; a torn last line left by a crash is cut off first.

    Only one process may append to a file at a time.

    Args:
        path: the .jsonl file (created with its folder if missing).
        record: a JSON-ready dict (tuples and paths are converted); written with sorted keys.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(jsonable(record), sort_keys=True) + "\n").encode()
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


def read_jsonl(path: PathLike, missing_ok: bool = False) -> List[dict]:
    """The records (JSON objects) of a .jsonl file in file order; a torn or unreadable line is skipped with a warning.

    Args:
        path: the file.
        missing_ok: a missing file gives [] instead of FileNotFoundError.
    Returns:
        The records.
    """
    path = Path(path)
    if missing_ok and not path.exists():
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
