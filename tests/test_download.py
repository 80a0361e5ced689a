"""Download and extraction against a local HTTP server on 127.0.0.1 (SPEC Sec. 1)."""
import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from greedymm.config import DataConfig
from greedymm.download import (DownloadError, UnsafeArchiveError, download, ensure_modelnet, find_class_root,
                               safe_extract)

TOP = "modelnet40_images_new_12x"


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def modelnet_archive(top: str = TOP) -> bytes:
    """A small tar.gz in the real layout: 2 classes, 1 object per split, 12 views each."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for cls in ("airplane", "chair"):
            for split in ("train", "test"):
                for v in range(1, 13):
                    add_file(tar, f"{top}/{cls}/{split}/{cls}_0001.obj.shaded_v{v:03d}.png", png_bytes(v * 10))
    return buf.getvalue()


ARCHIVE = modelnet_archive()


class Server:
    """A Range-capable HTTP server with switchable misbehaviour; records every request's headers."""

    def __init__(self):
        self.body = ARCHIVE
        self.behaviour = "ok"  # ok | cut_first | fail_twice | short | 404
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                server.requests.append(dict(self.headers))
                n = len(server.requests)
                body = server.body
                if server.behaviour == "404":
                    self.send_error(404)
                    return
                if server.behaviour == "fail_twice" and n <= 2:
                    self.send_error(503)
                    return
                start = 0
                rng = self.headers.get("Range")
                extra = 100 if server.behaviour == "short" else 0  # "short" claims 100 bytes it never sends
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) + extra - 1}/{len(body) + extra}")
                else:
                    self.send_response(200)
                rest = body[start:]
                announced = len(rest) + extra
                self.send_header("Content-Length", str(announced))
                self.end_headers()
                if server.behaviour == "cut_first" and n == 1:
                    self.wfile.write(rest[: len(rest) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops midway
                    return
                self.wfile.write(rest)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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


def fetch(server, tmp_path, **kw):
    return download([server.url], tmp_path / "a.tar.gz", timeout=5, retries=kw.pop("retries", 3), backoff=0.01,
                    progress=False, **kw)


def test_full_download(server, tmp_path):
    path = fetch(server, tmp_path)
    assert path.read_bytes() == ARCHIVE
    assert not (tmp_path / "a.tar.gz.part").exists()
    assert len(server.requests) == 1 and "Range" not in server.requests[0]


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.behaviour = "cut_first"
    path = fetch(server, tmp_path)
    assert path.read_bytes() == ARCHIVE
    assert len(server.requests) == 2
    assert server.requests[1]["Range"] == f"bytes={len(ARCHIVE) // 2}-"


def test_server_failing_twice_then_succeeding(server, tmp_path):
    server.behaviour = "fail_twice"
    assert fetch(server, tmp_path).read_bytes() == ARCHIVE
    assert len(server.requests) == 3


def test_size_mismatch_is_rejected(server, tmp_path):
    server.behaviour = "short"  # announces 100 bytes more than it ever sends
    with pytest.raises(DownloadError, match="could not download"):
        fetch(server, tmp_path, retries=2)
    assert not (tmp_path / "a.tar.gz").exists()


def test_sha256_checked(server, tmp_path):
    good = hashlib.sha256(ARCHIVE).hexdigest()
    assert fetch(server, tmp_path, sha256=good).read_bytes() == ARCHIVE
    (tmp_path / "a.tar.gz").unlink()
    with pytest.raises(DownloadError, match="sha256"):
        fetch(server, tmp_path, sha256="0" * 64)
    assert not (tmp_path / "a.tar.gz").exists() and not (tmp_path / "a.tar.gz.part").exists()


def hostile(tmp_path, kind):
    path = tmp_path / f"{kind}.tar"
    with tarfile.open(path, "w") as tar:
        add_file(tar, f"{TOP}/airplane/train/ok.png", b"fine")
        if kind == "absolute":
            add_file(tar, str(tmp_path / "evil_abs.txt"), b"x")
        elif kind == "dotdot":
            add_file(tar, "../evil_dotdot.txt", b"x")
        else:
            info = tarfile.TarInfo(f"{TOP}/link")
            info.type, info.linkname = tarfile.SYMTYPE, str(tmp_path / "evil_link_target")
            tar.addfile(info)
            add_file(tar, f"{TOP}/link/evil.txt", b"x")
    return path


@pytest.mark.parametrize("kind, message", [("absolute", "absolute path"), ("dotdot", "'..'"), ("symlink", "link")])
def test_hostile_archives_are_refused(tmp_path, kind, message):
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UnsafeArchiveError, match=message):
        safe_extract(hostile(tmp_path, kind), work / "out", progress=False)
    assert not (tmp_path / "evil_abs.txt").exists() and not (tmp_path / "evil_dotdot.txt").exists()
    assert not (work / "evil_dotdot.txt").exists() and not (tmp_path / "evil_link_target").exists()
    assert list(work.iterdir()) == []  # nothing unpacked, not even the harmless member


def test_ensure_modelnet_with_archive_placed_by_hand(tmp_path):
    data = tmp_path / "ModelNet"
    data.mkdir()
    (data / "shaded_images.tar.gz").write_bytes(ARCHIVE)
    root = ensure_modelnet(DataConfig(data_dir=str(data), url="http://127.0.0.1:9/none"), progress=False)
    assert root == data / "shaded_images" / TOP
    assert sorted(p.name for p in root.iterdir()) == ["airplane", "chair"]
    assert len(list((root / "chair" / "test").glob("*.png"))) == 12


def test_ensure_modelnet_finds_an_unpacked_folder_of_any_name(tmp_path, server):
    data = tmp_path / "ModelNet"
    with tarfile.open(fileobj=io.BytesIO(modelnet_archive("my_renders"))) as tar:
        tar.extractall(data / "somewhere", filter="data")
    root = ensure_modelnet(DataConfig(data_dir=str(data), url=server.url), progress=False)
    assert root == data / "somewhere" / "my_renders" and server.requests == []


def test_ensure_modelnet_downloads(tmp_path, server):
    data = tmp_path / "ModelNet"
    root = ensure_modelnet(DataConfig(data_dir=str(data), url=server.url), progress=False)
    assert (data / "shaded_images.tar.gz").read_bytes() == ARCHIVE
    assert find_class_root(data) == root and (root / "airplane" / "train").is_dir()


def test_ensure_modelnet_names_the_alternatives_when_every_url_fails(tmp_path, server):
    server.behaviour = "404"
    cfg = DataConfig(data_dir=str(tmp_path / "ModelNet"), url=server.url, mirrors=("http://127.0.0.1:9/x.tar.gz",))
    with pytest.raises(DownloadError) as err:
        ensure_modelnet(cfg, progress=False, retries=2, backoff=0.01)
    msg = str(err.value)
    assert "HTTP 404" in msg and "127.0.0.1:9" in msg  # every URL and its error
    assert "shaded_images.tar.gz" in msg and "place the unpacked folder" in msg and "mirrors" in msg
    assert not list((tmp_path / "ModelNet").iterdir())


def test_find_class_root_none(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert find_class_root(tmp_path) is None


def test_prepare_data_downloads_unpacks_and_caches_modelnet40(tmp_path, server):
    from greedymm.data import build_loaders

    cfg = DataConfig(data_dir=str(tmp_path / "ModelNet"), url=server.url, image_size=8, val_fraction=0.5)
    loaders = build_loaders(cfg, "cpu", seed=0, progress=False)
    assert loaders.sizes == {"train": 1, "val": 1, "test": 2}
    x0, x1, y = next(iter(loaders.test))
    assert x0.shape == (2, 3, 8, 8) and sorted(y.tolist()) == [0, 8]  # airplane, chair in the 40-class order
    # views 0 and 6 are the files v001 and v007 (pixel values 10 and 70), resized from 4 to 8 px
    mean, std = 0.485, 0.229
    assert abs(float(x0[0, 0, 0, 0]) - (10 / 255 - mean) / std) < 1e-4
    assert abs(float(x1[0, 0, 0, 0]) - (70 / 255 - mean) / std) < 1e-4
    assert len(server.requests) == 1
