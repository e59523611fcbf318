"""Download: checksums, resume with HTTP Range, unzip — against a server on 127.0.0.1."""

import hashlib
import http.server
import io
import threading
import zipfile

import pytest

from sidrec.data import download as dl
from sidrec.errors import UserError


class RangeHandler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    requests: list = []

    def do_GET(self):  # noqa: N802
        name = self.path.rsplit("/", 1)[1]
        body = self.files.get(name)
        self.requests.append((name, self.headers.get("Range")))
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *a):
        pass


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    RangeHandler.requests = []
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def _zip_bytes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ml-100k/u.data", "1\t1\t5\t100\n")
    return buf.getvalue()


def test_fetch_resumes_partial_download(server, tmp_path):
    body = bytes(range(256)) * 1000
    RangeHandler.files = {"f.bin": body}
    part = tmp_path / "f.bin.part"
    part.write_bytes(body[:100_000])
    out = dl.fetch(f"{server}/f.bin", tmp_path / "f.bin", hashlib.md5(body).hexdigest())
    assert out.read_bytes() == body and not part.exists()
    assert RangeHandler.requests[-1] == ("f.bin", "bytes=100000-")


def test_checksum_mismatch_is_an_error(server, tmp_path):
    RangeHandler.files = {"f.bin": b"corrupted"}
    with pytest.raises(UserError, match="checksum mismatch"):
        dl.fetch(f"{server}/f.bin", tmp_path / "f.bin", "0" * 32)
    assert not (tmp_path / "f.bin").exists()


def test_download_named_dataset_from_mirror(server, tmp_path, monkeypatch):
    z = _zip_bytes()
    RangeHandler.files = {"ml-100k.zip": z}
    monkeypatch.setattr(dl, "sources", lambda name: [dl.RemoteFile(dl.GROUPLENS + "ml-100k.zip",
                                                                   hashlib.md5(z).hexdigest(), unzip=True)])
    dl.download("ml-100k", tmp_path, base_url=server)
    assert (tmp_path / "ml-100k" / "u.data").read_text().startswith("1\t1")


def test_real_sources_have_checksums():
    assert dl.sources("ml-1m")[0].md5 == "c4d9eecfca2ab87c1945afe126590906"
    assert dl.sources("ml-100k")[0].url.startswith("https://files.grouplens.org/")
    assert dl.sources("amazon-beauty")[0].url.endswith("reviews_Beauty_5.json.gz")
    with pytest.raises(UserError):
        dl.sources("nope")


def test_http_error_is_user_error(server, tmp_path):
    RangeHandler.files = {}
    with pytest.raises(UserError, match="HTTP 404"):
        dl.fetch(f"{server}/missing.zip", tmp_path / "missing.zip")
