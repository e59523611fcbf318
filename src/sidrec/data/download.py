"""Dataset download: real URLs with checksums, resumable (HTTP Range), with a progress bar.

There is no internet on the development machines: the code is exercised against a local HTTP
server in the tests. `base_url` (or SIDREC_DOWNLOAD_MIRROR) points every file at a mirror.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sidrec.errors import UserError


@dataclass(frozen=True)
class RemoteFile:
    url: str
    md5: str | None = None  # GroupLens publishes md5; None = no published checksum
    unzip: bool = False


GROUPLENS = "https://files.grouplens.org/datasets/movielens/"
AMAZON_2014 = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
AMAZON_CATEGORIES = {
    "beauty": "Beauty", "sports": "Sports_and_Outdoors", "toys": "Toys_and_Games",
    "clothing": "Clothing_Shoes_and_Jewelry", "books": "Books", "electronics": "Electronics",
    "cds": "CDs_and_Vinyl", "movies": "Movies_and_TV", "home": "Home_and_Kitchen",
    "video-games": "Video_Games", "office": "Office_Products", "grocery": "Grocery_and_Gourmet_Food",
}


def sources(name: str) -> list[RemoteFile]:
    """The files of a named dataset (`ml-100k`, `ml-1m`, `amazon-<category>`)."""
    if name == "ml-100k":
        return [RemoteFile(GROUPLENS + "ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", unzip=True)]
    if name == "ml-1m":
        return [RemoteFile(GROUPLENS + "ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", unzip=True)]
    if name.startswith("amazon-"):
        key = name[len("amazon-"):]
        cat = AMAZON_CATEGORIES.get(key.lower(), key)
        # McAuley's 2014 files have no published checksums; the sha256 is printed after download.
        return [RemoteFile(f"{AMAZON_2014}reviews_{cat}_5.json.gz"), RemoteFile(f"{AMAZON_2014}meta_{cat}.json.gz")]
    known = ["ml-100k", "ml-1m"] + [f"amazon-{k}" for k in AMAZON_CATEGORIES]
    raise UserError(f"unknown dataset {name!r}; known: {', '.join(known)}")


def _mirror(url: str, base_url: str | None) -> str:
    base = base_url or os.environ.get("SIDREC_DOWNLOAD_MIRROR")
    return url if not base else base.rstrip("/") + "/" + url.rsplit("/", 1)[1]


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, md5: str | None = None, timeout: float = 30.0) -> Path:
    """Download `url` to `dest`, resuming a previous partial `dest.part` with a Range request.

    The file only appears under its final name after its checksum matched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and (md5 is None or _md5(dest) == md5):
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # already complete
            resp = None
        else:
            raise UserError(f"download failed: HTTP {e.code} {e.reason} for {url}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"download failed for {url}: {getattr(e, 'reason', e)}") from None
    if resp is not None:
        with resp:
            resumed = resp.status == 206
            mode = "ab" if resumed else "wb"
            total = resp.headers.get("Content-Length")
            total = int(total) + (have if resumed else 0) if total else None
            with open(part, mode) as f, tqdm(
                total=total, initial=have if resumed else 0, unit="B", unit_scale=True,
                desc=dest.name, disable=None,
            ) as bar:
                try:
                    for block in iter(lambda: resp.read(1 << 16), b""):
                        f.write(block)
                        bar.update(len(block))
                except (OSError, urllib.error.URLError) as e:
                    raise UserError(f"download of {url} interrupted ({e}); run again to resume") from None
    if md5 is not None and (got := _md5(part)) != md5:
        part.unlink()
        raise UserError(f"checksum mismatch for {url}: md5 {got}, expected {md5}; the partial file was removed")
    os.replace(part, dest)
    return dest


def download(name: str, out: str | Path, base_url: str | None = None) -> list[Path]:
    """Download (and unzip) a named dataset into `out`; returns the paths written."""
    out = Path(out)
    written = []
    for rf in sources(name):
        url = _mirror(rf.url, base_url)
        try:
            urllib.parse.urlsplit(url)
        except ValueError as e:
            raise UserError(f"--mirror: not a valid URL ({e})") from None
        dest = fetch(url, out / rf.url.rsplit("/", 1)[1], rf.md5)
        if rf.unzip:
            try:
                with zipfile.ZipFile(dest) as z:
                    z.extractall(out)
            except zipfile.BadZipFile:
                raise UserError("downloaded archive is not a valid zip file", str(dest)) from None
        written.append(dest)
    return written


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
