"""Fetching data archives (SPEC Sec. 1): a resumable HTTP download with retries, size and checksum checks, and a
safe atomic extraction of a tar archive.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import logging
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from typing import Dict, Optional, Sequence

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_RETRY_HTTP = (408, 429)  # client-side codes that mean "try again later"; every 5xx is retried too
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class DownloadError(RuntimeError):
    """No URL delivered a complete, verified file."""


class UnsafeArchiveError(ValueError):
    """The archive holds a member that could write outside the target folder, or a special file."""


class NotEnoughSpaceError(OSError):
    """The disk cannot hold the download or the unpacked archive."""


class _Mismatch(Exception):
    """The bytes received cannot be the announced file: the partial file is deleted and the URL given up."""


class _ShortRead(ConnectionError):
    """The body ended before the announced size: retried, resuming from the bytes received."""


def _check_free(folder: Path, needed: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise NotEnoughSpaceError(f"not enough disk space in {folder} for {what}: need {needed / 2**30:.2f} "
                                  f"GiB, {free / 2**30:.2f} GiB free")


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm, usedforsecurity=False)  # md5 is an integrity check here, allowed under FIPS too
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _total_of_416(error: urllib.error.HTTPError) -> int:
    """The file size a 416 answer announces in `Content-Range: bytes */TOTAL`, or -1."""
    match = re.fullmatch(r"bytes\s+\*/(\d+)", (error.headers or {}).get("Content-Range", "").strip())
    return int(match.group(1)) if match else -1


def _fetch(url: str, part: Path, timeout: float, chunk_size: int, progress: bool) -> int:
    """One request appending to `part` from its current size (HTTP Range). Returns the announced size, or -1.

    Raises OSError/HTTPException on connection errors, timeouts and short reads (the bytes received so far stay
    in `part` for the next try), urllib's HTTPError on error codes, and _Mismatch on an impossible answer.
    """
    have = _size(part)
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left after byte `have`: complete, or longer than the file
            total = _total_of_416(e)
            if total == have:
                return total
            part.unlink()
            raise ConnectionError(f"the partial file ({have} bytes) is longer than the file ({total} bytes); "
                                  "starting over") from None
        raise
    with response:
        if have and response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match is None or int(match.group(1)) != have:
                part.unlink()
                raise ConnectionError(f"answered Content-Range {response.headers.get('Content-Range')!r} to a "
                                      f"request from byte {have}; starting over")
            total = int(match.group(3)) if match.group(3) != "*" else -1
        else:
            if have:
                log.info("%s ignored the range request: restarting from byte 0", url)
            have = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None and length.isdigit() else -1
        if total >= 0:  # a restart truncates the partial file, a resume keeps it: either way this much is new
            _check_free(part.parent, total - _size(part), f"the rest of {url}")
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total if total >= 0 else None, initial=have, unit="B", unit_scale=True,
                     unit_divisor=1024, desc=part.name[: -len(".part")], disable=not progress, leave=False) as bar:
            # read1 hands over what has arrived (read() waits for a full chunk): a stall loses no received bytes
            read = getattr(response, "read1", response.read)
            while True:
                block = read(chunk_size)
                if not block:
                    break
                f.write(block)
                bar.update(len(block))
    size = _size(part)
    if 0 <= total < size:
        raise _Mismatch(f"delivered {size} bytes but announced {total}")
    if size < total:
        raise _ShortRead(f"short read: the connection closed after {size} of {total} bytes")
    return total


def download(urls: Sequence[str], dest: Path, sha256: Optional[str] = None, timeout: float = 30,
             retries: int = 5, backoff: float = 1.0, chunk_size: int = 1 << 20, progress: bool = True,
             md5: Optional[str] = None) -> Path:
    """Download the first URL that works to `dest`, resuming partial downloads.

    The bytes go to `dest` + ".part" (kept between runs, continued with an HTTP Range request) and are renamed to
    `dest` only once complete and verified. Connection errors, timeouts, 5xx answers and short reads are retried
    with exponential back-off; a try that delivered new bytes does not use up a retry. A file whose size cannot
    match the announced one (or that keeps coming up short) or whose sha256 or md5 differs is deleted.

    Args:
        urls: URLs tried in order.
        dest: the final file.
        sha256: expected hex digest, or None to skip the check.
        timeout: seconds each request may wait for the server (to connect or for the next bytes).
        retries: tries per URL without progress.
        backoff: seconds before the first retry, doubled after each.
        chunk_size: bytes per read.
        progress: tqdm bar in bytes.
        md5: expected hex digest (the checksums torchvision publishes), or None to skip the check.
    Returns:
        `dest`.
    Raises:
        DownloadError: listing every URL tried and its last error.
        NotEnoughSpaceError: the disk cannot hold the rest of the file.
    """
    if not urls:
        raise ValueError("download() needs at least one URL")
    if retries < 1:
        raise ValueError(f"retries={retries} must be at least 1")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Dict[str, str] = {}
    for url in urls:
        failures, delay = 0, backoff
        while failures < retries:
            before, short = _size(part), False  # short: this try ended in a short read
            try:
                total = _fetch(url, part, timeout, chunk_size, progress)
                if total < 0:
                    log.warning("%s did not announce its size: the download cannot be checked for completeness", url)
                for algorithm, expected in (("sha256", sha256), ("md5", md5)):
                    if expected is not None:
                        digest = _digest(part, algorithm)
                        if digest.lower() != expected.lower():
                            raise _Mismatch(f"{algorithm} of the download is {digest}, expected {expected.lower()}")
                os.replace(part, dest)
                log.info("downloaded %s to %s (%d bytes)", url, dest, _size(dest))
                return dest
            except _Mismatch as e:  # wrong content: retrying the same URL would not help
                part.unlink(missing_ok=True)
                last_error[url] = str(e)
                break
            except urllib.error.HTTPError as e:
                last_error[url] = f"HTTP {e.code} {e.reason}"
                if e.code < 500 and e.code not in _RETRY_HTTP:
                    break  # 404 and friends: this URL will not work
            except ValueError as e:  # not a URL urllib can open
                last_error[url] = str(e)
                break
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, timed out, cut
                if isinstance(e, NotEnoughSpaceError) or getattr(e, "errno", None) == errno.ENOSPC:
                    raise  # no URL can help
                last_error[url] = str(getattr(e, "reason", e)) or type(e).__name__
                short = isinstance(e, _ShortRead)
            if _size(part) > before:
                delay = backoff  # progress: a flaky connection, not a dead server
                log.info("%s: %s; resuming from byte %d", url, last_error[url], _size(part))
                continue
            failures += 1
            if failures == retries:
                if short and part.exists():
                    # the server keeps announcing bytes it never sends: what we hold is not that file
                    part.unlink()
                    last_error[url] = f"size mismatch, {last_error[url]}; deleted the partial file"
                break
            log.info("%s: %s; retrying in %.2f s (try %d of %d)", url, last_error[url], delay, failures + 1, retries)
            time.sleep(delay)
            delay *= 2
        log.warning("giving up on %s: %s", url, last_error[url])
    lines = "\n".join(f"  {url}: {error}" for url, error in last_error.items())
    raise DownloadError(f"could not download {dest.name}; every URL failed:\n{lines}")


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name.replace("\\", "/")  # a Windows-made archive may use backslashes
    path = PurePosixPath(name)
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):  # POSIX root or a drive letter
        raise UnsafeArchiveError(f"archive member {member.name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"archive member {member.name!r} points outside the target with '..'")
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"archive member {member.name!r} is a link (to {member.linkname!r})")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {member.name!r} is a device, FIFO or other special file")


def safe_extract(archive: Path, dest: Path, progress: bool = True) -> Path:
    """Unpack a tar archive (plain or gzip-compressed) into the new folder `dest`, refusing anything unsafe.

    Every member is checked before anything is written: absolute paths, '..', symlinks, hardlinks, devices and
    FIFOs are refused. Members are written into `.{dest.name}.extracting` beside `dest` (a leftover of an
    interrupted run is removed first), renamed to `dest` once complete.

    Args:
        archive: the .tar.gz / .tgz / .tar file.
        dest: the folder to create; it must not exist yet.
        progress: tqdm bar over members.
    Returns:
        `dest`.
    Raises:
        UnsafeArchiveError: a member is unsafe (nothing is written).
        ValueError: the file is not a readable tar archive.
        NotEnoughSpaceError: the disk cannot hold the unpacked members.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} does not exist")
    if dest.exists():
        raise FileExistsError(f"{dest} exists already; remove it to unpack {archive.name} again")
    tmp = dest.with_name(f".{dest.name}.extracting")
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()  # reads the whole archive: all members are known before any is written
            for m in members:
                _check_member(m)
            _check_free(dest.parent, sum(m.size for m in members), f"unpacking {archive.name}")
            if tmp.exists():
                log.info("removing %s, left by an interrupted extraction", tmp)
                shutil.rmtree(tmp)
            tmp.mkdir()
            try:
                for m in tqdm(members, desc=f"unpacking {archive.name}", unit="file", disable=not progress,
                              leave=False):
                    target = tmp / m.name.replace("\\", "/")
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
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:  # corrupt or cut short
        raise ValueError(f"{archive} is not a readable tar archive ({e}); delete it and download it again") from e
    log.info("unpacked %s (%d members) to %s", archive, len(members), dest)
    return dest
