"""Download, safe extraction and discovery of the ModelNet40 renders (SPEC Sec. 1), against a local HTTP server
on 127.0.0.1 only: no other host is ever contacted.
"""
import hashlib
import io
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from greedymm.config import DataConfig
from greedymm.data.download import DownloadError, UnsafeArchiveError, download, safe_extract
from greedymm.data.modelnet import ensure_modelnet, find_class_root

TOP = "modelnet40_images_new_12x"
CLASSES = ("airplane", "bathtub", "chair")
# object numbers per split: ModelNet numbers each class's training objects from 0001 and its test objects on
OBJECTS = {"train": (1, 2), "test": (3,)}


def png_bytes(value: int) -> bytes:
    """A 4x4 gray PNG filled with `value`."""
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def render_files(top: str = TOP) -> dict:
    """{relative path: PNG bytes} in the real layout; view v is filled with 10 * v so views can be told apart."""
    return {f"{top}/{cls}/{split}/{cls}_{n:04d}.obj.shaded_v{v:03d}.png": png_bytes(10 * v)
            for cls in CLASSES for split, numbers in OBJECTS.items() for n in numbers for v in range(1, 13)}


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def modelnet_archive(top: str = TOP) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in render_files(top).items():
            add_file(tar, name, data)
    return buf.getvalue()


def write_tree(root: Path, top: str) -> None:
    """The unpacked archive written file by file under `root`."""
    for name, data in render_files(top).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


ARCHIVE = modelnet_archive()
VIEWS_PER_CLASS = {split: 12 * len(numbers) for split, numbers in OBJECTS.items()}


class Server:
    """A Range-capable HTTP server on 127.0.0.1 with switchable misbehaviour; records every request's headers.

    Switches: `status` (answer every request with this error code), `fail_first` (answer the first n requests
    with 503), `cut_first` (send half the body of the first request, then drop the connection), `stall_first`
    (send half the body of the first request, then stall for `stall_s`), `extra` (announce this many bytes more
    than the body holds), `honour_range` (False: ignore Range and send the whole file with 200), `range_total`
    (the file size a 206 answer claims in Content-Range, whatever it sends).
    """

    def __init__(self, body: bytes = ARCHIVE):
        self.body = body
        self.status, self.fail_first, self.extra = None, 0, 0
        self.cut_first = self.stall_first = False
        self.stall_s = 1.0
        self.honour_range, self.range_total = True, None
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                server.requests.append(dict(self.headers))
                n, body = len(server.requests), server.body
                if server.status is not None:
                    return self.send_error(server.status)
                if n <= server.fail_first:
                    return self.send_error(503)
                total = len(body) + server.extra
                rng = self.headers.get("Range") if server.honour_range else None
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= total > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{total}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                self.send_response(206 if rng else 200)
                if rng:
                    claimed = server.range_total or total
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{claimed}")
                self.send_header("Content-Length", str(total - start))
                self.end_headers()
                rest = body[start:]
                if n == 1 and (server.cut_first or server.stall_first):
                    self.wfile.write(rest[: len(rest) // 2])
                    self.wfile.flush()
                    if server.stall_first:
                        time.sleep(server.stall_s)
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops midway
                    return
                self.wfile.write(rest)

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that timed out: expected here
                pass

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/shaded_images.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def unused_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(server, tmp_path, retries=3, **kw):
    return download([server.url], tmp_path / "a.tar.gz", timeout=kw.pop("timeout", 5), retries=retries,
                    backoff=0.01, progress=False, **kw)


def test_full_download(server, tmp_path):
    path = fetch(server, tmp_path)
    assert path == tmp_path / "a.tar.gz" and path.read_bytes() == ARCHIVE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz"]  # no .part left
    assert len(server.requests) == 1 and "Range" not in server.requests[0]


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.cut_first = True
    assert fetch(server, tmp_path).read_bytes() == ARCHIVE
    assert len(server.requests) == 2 and "Range" not in server.requests[0]
    assert server.requests[1]["Range"] == f"bytes={len(ARCHIVE) // 2}-"
    assert not (tmp_path / "a.tar.gz.part").exists()


def test_stalled_download_times_out_and_resumes(server, tmp_path):
    server.stall_first, server.stall_s = True, 1.0
    t0 = time.perf_counter()
    assert fetch(server, tmp_path, timeout=0.2).read_bytes() == ARCHIVE
    assert time.perf_counter() - t0 < 0.9  # the stall was cut by the timeout, not waited out
    assert [r.get("Range") for r in server.requests] == [None, f"bytes={len(ARCHIVE) // 2}-"]


def test_partial_file_of_an_earlier_run_is_resumed(server, tmp_path):
    (tmp_path / "a.tar.gz.part").write_bytes(ARCHIVE[:1000])
    assert fetch(server, tmp_path).read_bytes() == ARCHIVE
    assert [r.get("Range") for r in server.requests] == ["bytes=1000-"]


def test_complete_partial_file_is_finished_without_download(server, tmp_path):
    (tmp_path / "a.tar.gz.part").write_bytes(ARCHIVE)  # an earlier run stopped before the rename
    assert fetch(server, tmp_path, sha256=hashlib.sha256(ARCHIVE).hexdigest()).read_bytes() == ARCHIVE
    assert [r.get("Range") for r in server.requests] == [f"bytes={len(ARCHIVE)}-"]  # answered 416


def test_partial_file_longer_than_the_file_starts_over(server, tmp_path):
    (tmp_path / "a.tar.gz.part").write_bytes(ARCHIVE + b"junk")
    assert fetch(server, tmp_path).read_bytes() == ARCHIVE
    assert [r.get("Range") for r in server.requests] == [f"bytes={len(ARCHIVE) + 4}-", None]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.cut_first, server.honour_range = True, False
    assert fetch(server, tmp_path).read_bytes() == ARCHIVE  # not the first half twice
    assert server.requests[1]["Range"] == f"bytes={len(ARCHIVE) // 2}-"


def test_server_failing_twice_then_succeeding(server, tmp_path):
    server.fail_first = 2
    assert fetch(server, tmp_path).read_bytes() == ARCHIVE
    assert len(server.requests) == 3


def test_server_failing_more_than_retries_gives_up(server, tmp_path):
    server.fail_first = 5
    with pytest.raises(DownloadError, match="503"):
        fetch(server, tmp_path, retries=3)
    assert len(server.requests) == 3 and not (tmp_path / "a.tar.gz").exists()


def test_size_mismatch_is_rejected(server, tmp_path):
    server.extra = 100  # Content-Length announces 100 bytes that never come
    with pytest.raises(DownloadError, match="size mismatch") as err:
        fetch(server, tmp_path, retries=2)
    assert f"closed after {len(ARCHIVE)} of {len(ARCHIVE) + 100} bytes" in str(err.value)
    assert server.url in str(err.value)
    # one full try, then two resumes that brought nothing; the bad partial file is gone
    assert [r.get("Range") for r in server.requests] == [None] + [f"bytes={len(ARCHIVE)}-"] * 2
    assert list(tmp_path.iterdir()) == []


def test_more_bytes_than_announced_is_rejected(server, tmp_path):
    (tmp_path / "a.tar.gz.part").write_bytes(ARCHIVE[:1000])
    server.range_total = len(ARCHIVE) - 100  # Content-Range claims a smaller file than the bytes that come
    with pytest.raises(DownloadError, match=f"delivered {len(ARCHIVE)} bytes but announced {len(ARCHIVE) - 100}"):
        fetch(server, tmp_path)
    assert len(server.requests) == 1 and list(tmp_path.iterdir()) == []


def test_sha256_checked(server, tmp_path):
    good = hashlib.sha256(ARCHIVE).hexdigest()
    assert fetch(server, tmp_path, sha256=good.upper()).read_bytes() == ARCHIVE
    (tmp_path / "a.tar.gz").unlink()
    with pytest.raises(DownloadError, match="sha256") as err:
        fetch(server, tmp_path, sha256="0" * 64)
    assert good in str(err.value) and "0" * 64 in str(err.value)  # both digests
    assert list(tmp_path.iterdir()) == []


def test_every_url_is_tried_in_order_and_named(server, tmp_path):
    dead = f"http://127.0.0.1:{unused_port()}/x.tar.gz"
    path = download([dead, server.url], tmp_path / "a.tar.gz", retries=2, backoff=0.01, progress=False)
    assert path.read_bytes() == ARCHIVE
    server.status = 404
    with pytest.raises(DownloadError) as err:
        download([dead, server.url], tmp_path / "b.tar.gz", retries=2, backoff=0.01, progress=False)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 2 and lines[0].strip().startswith(dead) and "HTTP 404" in lines[1]


def hostile(tmp_path, kind):
    """A tar whose first member is harmless and whose next is unsafe in the way `kind` says."""
    path = tmp_path / f"{kind}.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, f"{TOP}/airplane/train/ok.png", b"fine")
        if kind == "absolute":
            add_file(tar, str(tmp_path / "evil_abs.txt"), b"x")
        elif kind == "dotdot":
            add_file(tar, f"{TOP}/../../evil_dotdot.txt", b"x")
        elif kind in ("symlink", "hardlink"):
            info = tarfile.TarInfo(f"{TOP}/link")
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = str(tmp_path / "evil_link_target")
            tar.addfile(info)
            add_file(tar, f"{TOP}/link/evil.txt", b"x")
        else:
            info = tarfile.TarInfo(f"{TOP}/special")
            info.type = tarfile.FIFOTYPE if kind == "fifo" else tarfile.CHRTYPE
            tar.addfile(info)
    return path


@pytest.mark.parametrize("kind, message", [("absolute", "absolute path"), ("dotdot", "'..'"),
                                           ("symlink", "is a link"), ("hardlink", "is a link"),
                                           ("fifo", "FIFO"), ("device", "device")])
def test_hostile_archives_are_refused(tmp_path, kind, message):
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UnsafeArchiveError, match=message):
        safe_extract(hostile(tmp_path, kind), work / "out", progress=False)
    for evil in ("evil_abs.txt", "evil_dotdot.txt", "evil_link_target"):
        assert not (tmp_path / evil).exists() and not (work / evil).exists()
    assert list(work.iterdir()) == []  # nothing unpacked, not even the harmless member


def test_safe_extract_unpacks_atomically(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(ARCHIVE)
    (tmp_path / ".out.extracting" / "junk").mkdir(parents=True)  # left by an interrupted run
    out = safe_extract(archive, tmp_path / "out", progress=False)
    assert out == tmp_path / "out"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert files == sorted(render_files())
    assert (out / TOP / "chair" / "test" / "chair_0003.obj.shaded_v007.png").read_bytes() == png_bytes(70)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "out"]
    with pytest.raises(FileExistsError, match="exists already"):
        safe_extract(archive, out, progress=False)


def test_truncated_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(ARCHIVE[: len(ARCHIVE) // 2])
    with pytest.raises(ValueError, match="cut.tar.gz is not a readable tar archive"):
        safe_extract(archive, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tar.gz"]


def test_ensure_modelnet_with_archive_placed_by_hand(tmp_path):
    data = tmp_path / "ModelNet"
    data.mkdir()
    (data / "shaded_images.tar.gz").write_bytes(ARCHIVE)
    cfg = DataConfig(data_dir=str(data), url=f"http://127.0.0.1:{unused_port()}/none")
    root = ensure_modelnet(cfg, progress=False, retries=1)
    assert root == data / "shaded_images" / TOP
    assert sorted(p.name for p in root.iterdir()) == list(CLASSES)
    assert len(list((root / "chair" / "test").glob("*.png"))) == VIEWS_PER_CLASS["test"]
    assert ensure_modelnet(cfg, progress=False, retries=1) == root  # the second call finds the unpacked folder


def test_ensure_modelnet_finds_an_unpacked_folder_of_any_name(tmp_path, server):
    data = tmp_path / "ModelNet"
    write_tree(data / "somewhere", "my_renders")
    root = ensure_modelnet(DataConfig(data_dir=str(data), url=server.url), progress=False)
    assert root == data / "somewhere" / "my_renders" and server.requests == []


def test_ensure_modelnet_names_the_alternatives_when_every_url_fails(tmp_path, server):
    server.status = 404
    dead = f"http://127.0.0.1:{unused_port()}/x.tar.gz"
    data = tmp_path / "ModelNet"
    with pytest.raises(DownloadError) as err:
        ensure_modelnet(DataConfig(data_dir=str(data), url=server.url, mirrors=(dead,)), progress=False,
                        retries=2, backoff=0.01)
    msg = str(err.value)
    assert server.url in msg and "HTTP 404" in msg and dead in msg  # every URL and its error
    assert f"place it in {data}/" in msg and "shaded_images.tar.gz" in msg
    assert f"place the unpacked folder (the one holding airplane/, bathtub/, ...) in {data}/" in msg
    assert "mirrors=" in msg and "reported dead" in msg
    assert list(data.iterdir()) == []


def test_ensure_modelnet_downloads(tmp_path, server):
    data = tmp_path / "ModelNet"
    cfg = DataConfig(data_dir=str(data), url=server.url, sha256=hashlib.sha256(ARCHIVE).hexdigest())
    root = ensure_modelnet(cfg, progress=False)
    assert (data / "shaded_images.tar.gz").read_bytes() == ARCHIVE
    assert root == data / "shaded_images" / TOP and find_class_root(data) == root
    assert sorted(p.name for p in root.iterdir()) == list(CLASSES)
    assert len(server.requests) == 1


def test_find_class_root_none(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "airplane").mkdir()  # a class name without train/ or test/ is not a class folder
    assert find_class_root(tmp_path) is None
    assert find_class_root(tmp_path / "missing") is None


def test_find_class_root_prefers_the_fullest_tree(tmp_path):
    (tmp_path / "stray" / "airplane" / "train").mkdir(parents=True)  # one class folder, shallower
    write_tree(tmp_path / "x", TOP)  # three class folders, one level deeper
    assert find_class_root(tmp_path) == tmp_path / "x" / TOP
    assert find_class_root(tmp_path, classes=("bed",)) is None


def test_prepare_data_downloads_unpacks_and_caches_modelnet40(tmp_path, server):
    from greedymm.data import build_loaders

    cfg = DataConfig(data_dir=str(tmp_path / "ModelNet"), url=server.url, image_size=8, val_fraction=0.5)
    loaders = build_loaders(cfg, "cpu", seed=0, progress=False)
    assert loaders.sizes == {"train": 3, "val": 3, "test": 3}
    x0, x1, y = next(iter(loaders.test))
    assert x0.shape == (3, 3, 8, 8) and sorted(y.tolist()) == [0, 1, 8]  # airplane, bathtub, chair in the 40
    # views 0 and 6 are the files v001 and v007 (pixel values 10 and 70), resized from 4 to 8 px
    mean, std = 0.485, 0.229
    assert abs(float(x0[0, 0, 0, 0]) - (10 / 255 - mean) / std) < 1e-4
    assert abs(float(x1[0, 0, 0, 0]) - (70 / 255 - mean) / std) < 1e-4
    assert len(server.requests) == 1
