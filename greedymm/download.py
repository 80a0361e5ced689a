"""Fetching the ModelNet40 12-view renders (SPEC Sec. 1): a resumable HTTP download with retries and
checks, and a safe extraction of the archive that finds the class folders whatever the top folder is called.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

from tqdm.auto import tqdm

from .config import MODELNET40_CLASSES, DataConfig

log = logging.getLogger(__name__)

ARCHIVE_NAME = "shaded_images.tar.gz"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


class DownloadError(RuntimeError):
    """No URL delivered a complete, verified archive."""


class UnsafeArchiveError(ValueError):
    """The archive holds a member that could write outside the target folder."""


def _check_free(folder: Path, needed: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(f"not enough disk space in {folder} for {what}: need {needed / 2**30:.2f} GiB, "
                      f"{free / 2**30:.2f} GiB free")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(url: str, part: Path, timeout: float, chunk_size: int, progress: bool) -> int:
    """One request: append to `part` from its current size (HTTP Range). Returns the announced total size.

    Raises on HTTP errors, timeouts and short reads; the bytes received so far stay in `part` for the next try.
    """
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if have and response.status == 206:
            # Content-Range: bytes START-END/TOTAL
            content_range = response.headers.get("Content-Range", "")
            start = int(content_range.split()[1].split("-")[0]) if content_range.startswith("bytes ") else -1
            if start != have:
                raise DownloadError(f"{url} answered Content-Range {content_range!r} to a request from byte {have}")
            total = int(content_range.rsplit("/", 1)[1]) if not content_range.endswith("/*") else -1
        else:
            have = 0  # the server ignored the Range request: start over
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else -1
        if total > 0:
            _check_free(part.parent, total - have, f"the rest of {url}")
        mode = "ab" if have else "wb"
        with open(part, mode) as f, tqdm(total=total if total > 0 else None, initial=have, unit="B",
                                         unit_scale=True, unit_divisor=1024, desc=Path(url).name,
                                         disable=not progress, leave=False) as bar:
            while True:
                block = response.read(chunk_size)
                if not block:
                    break
                f.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total > 0 and size < total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")
    if total > 0 and size != total:
        part.unlink()
        raise DownloadError(f"{url} delivered {size} bytes but announced {total}")
    return total


def download(urls: Sequence[str], dest: Path, sha256: Optional[str] = None, timeout: float = 30,
             retries: int = 5, backoff: float = 1.0, chunk_size: int = 1 << 20, progress: bool = True) -> Path:
    """Download the first URL that works to `dest`, resuming partial downloads.

    The bytes go to `dest` + ".part" and are renamed to `dest` only once complete and verified.

    Args:
        urls: URLs tried in order.
        dest: the final file.
        sha256: expected hex digest, or None to skip the check.
        timeout: seconds a request may stall.
        retries: tries per URL; each retry resumes with an HTTP Range request.
        backoff: seconds before the first retry, doubled after each.
        chunk_size: bytes per read.
        progress: tqdm bar in bytes.
    Returns:
        `dest`.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for url in urls:
        delay = backoff
        for attempt in range(1, retries + 1):
            try:
                total = _fetch(url, part, timeout, chunk_size, progress)
                if total < 0:
                    log.warning("%s did not announce its size: the download cannot be checked for completeness", url)
                if sha256 is not None:
                    digest = _sha256(part)
                    if digest.lower() != sha256.lower():
                        part.unlink()
                        raise DownloadError(f"{url}: sha256 {digest} does not match the expected {sha256}")
                os.replace(part, dest)
                log.info("downloaded %s to %s", url, dest)
                return dest
            except DownloadError as e:  # wrong content: retrying the same URL would not help
                errors.append(f"{url}: {e}")
                break
            except urllib.error.HTTPError as e:
                errors.append(f"{url}: HTTP {e.code} {e.reason}")
                if e.code == 416:  # the .part is larger than the file: start over
                    part.unlink(missing_ok=True)
                elif e.code < 500:
                    break
            except (urllib.error.URLError, OSError) as e:  # refused, timed out, cut short
                errors.append(f"{url}: {e}")
            if attempt < retries:
                log.info("retrying %s in %.1f s (try %d of %d)", url, delay, attempt + 1, retries)
                time.sleep(delay)
                delay *= 2
    raise DownloadError("could not download the archive:\n  " + "\n  ".join(errors))


def _check_member(member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or (path.parts and ":" in path.parts[0]):  # POSIX or drive path
        raise UnsafeArchiveError(f"archive member {member.name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"archive member {member.name!r} points outside the target with '..'")
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"archive member {member.name!r} is a link (to {member.linkname!r})")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {member.name!r} is a device, FIFO or other special file")


def safe_extract(archive: Path, dest: Path, progress: bool = True) -> Path:
    """Unpack a tar (optionally gzip-compressed) archive into `dest`, refusing anything unsafe.

    Every member is checked before anything is written: absolute paths, '..', links, devices and FIFOs are
    refused. The archive is unpacked into a temporary folder beside `dest` and renamed once complete.

    Args:
        archive: the .tar.gz / .tgz / .tar file.
        dest: the folder to create (must not exist yet).
        progress: tqdm bar over members.
    Returns:
        `dest`.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists already; remove it to unpack {archive.name} again")
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            _check_member(m)
        _check_free(dest.parent, sum(m.size for m in members), f"unpacking {archive.name}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            for m in tqdm(members, desc=f"unpacking {archive.name}", unit="file", disable=not progress, leave=False):
                target = tmp / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def find_class_root(root: Path, classes: Sequence[str] = MODELNET40_CLASSES, max_depth: int = 3) -> Optional[Path]:
    """The folder under `root` whose children are class folders with train/ or test/ inside.

    Args:
        root: where to look.
        classes: the class names to recognise.
        max_depth: how many folder levels below `root` to search.
    Returns:
        The folder, or None if there is none.
    """
    root = Path(root)
    wanted = set(classes)
    level = [root] if root.is_dir() else []
    for _ in range(max_depth + 1):
        nxt = []
        for folder in sorted(level):
            if folder.name.startswith("."):
                continue  # a temporary folder of an unfinished extraction
            subdirs = [p for p in folder.iterdir() if p.is_dir()]
            hits = [p for p in subdirs if p.name in wanted and ((p / "train").is_dir() or (p / "test").is_dir())]
            if hits:
                return folder
            nxt.extend(subdirs)
        level = nxt
    return None


def ensure_modelnet(cfg: DataConfig, progress: bool = True, retries: int = 5, backoff: float = 1.0) -> Path:
    """The folder holding the 40 class folders: found under `cfg.data_dir`, unpacked, or downloaded and unpacked.

    Args:
        cfg: data settings (`data_dir`, `url`, `mirrors`, `sha256`).
        progress: tqdm bars.
        retries, backoff: per-URL tries and the first back-off in seconds (see `download`).
    Returns:
        The class root, e.g. `ModelNet/modelnet40_images_new_12x`.
    """
    data_dir = Path(cfg.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    root = find_class_root(data_dir)
    if root is not None:
        log.info("using the renders in %s", root)
        return root
    archives = sorted(p for p in data_dir.iterdir() if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
    if archives:
        archive = archives[0]
    else:
        urls = [cfg.url, *cfg.mirrors]
        try:
            archive = download(urls, data_dir / ARCHIVE_NAME, sha256=cfg.sha256, retries=retries, backoff=backoff,
                               progress=progress)
        except DownloadError as e:
            raise DownloadError(
                f"{e}\nThe public link has been reported dead at times. Alternatives:\n"
                f"  1. download {ARCHIVE_NAME} by other means and place it in {data_dir}/ (it is unpacked for you);\n"
                f"  2. place the unpacked folder (the one holding airplane/, bathtub/, ...) in {data_dir}/;\n"
                f"  3. pass other URLs: DataConfig(url=..., mirrors=(...)).") from None
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    unpacked = safe_extract(archive, data_dir / name, progress=progress)
    root = find_class_root(unpacked)
    if root is None:
        raise FileNotFoundError(f"{archive} holds no ModelNet40 class folders (airplane/, bathtub/, ... with "
                                "train/ and test/ inside)")
    return root
