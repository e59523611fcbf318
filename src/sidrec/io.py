"""Safe file I/O: atomic output into directories sidrec owns, and reads that name the bad file.

Every artefact (data dirs, codebooks, checkpoints, metrics, reports) goes through these helpers:
write to a temporary sibling, fsync, then `os.replace`, which is atomic on POSIX.

Ownership. Every directory sidrec creates carries a marker file (`.sidrec.json`) naming its kind
(data, codebook, run, pipeline, download, verify). A directory is only ever written into, or
replaced, when it is new, empty, or carries the marker of the same kind: a user's own folder (or
a sidrec directory of another kind, e.g. a dataset given as a codebook's --out) is refused, so no
command can delete or move a file it did not create. Temp files a killed job left behind are
removed the next time a command takes the directory.

Reading. `reading(path)` turns any failure to read or parse a file into one `UserError` naming
the file, so a corrupt or truncated artefact is a user error (exit 2), never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sidrec.errors import SidrecWarning, UserError

try:
    import fcntl
except ImportError:  # Windows: directories are not locked (hold_writer_lock warns)
    fcntl = None

MARKER = ".sidrec.json"
KINDS = ("data", "codebook", "run", "pipeline", "download", "verify", "catalog")
#: Files that identify directories written before markers existed (adopted as owned).
_LEGACY = {"data": ("sequences.npz", "items.parquet"), "codebook": ("codebook.npz", "codebook.json"),
           "run": ("config.yaml", "metrics.jsonl", "trainer_state.pt"),
           "pipeline": ("config.yaml", "summary.json", "report.md")}


_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as e:  # name the file the user asked for, not our temp file (or no file: a full disk)
        if not e.filename or Path(str(e.filename)).name.startswith(f".{path.name}."):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    with reading(path, "JSON file"), open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line; a line is written with a single write() so readers never see half."""
    line = json.dumps(obj, default=_json_default) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Save arrays as .npz atomically; object arrays are refused (loading them needs pickle)."""
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise TypeError(f"refusing to save object array {name!r}: it would need pickle")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_npz(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Arrays of an .npz (never unpickled); a corrupt file or a missing array names the file."""
    with reading(path, "array file"), np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
        missing = [k for k in required if k not in out]
        if missing:
            raise ValueError(f"missing array(s) {', '.join(missing)}")
        return out


@contextlib.contextmanager
def reading(path: str | Path, what: str = "file") -> Iterator[None]:
    """Any exception while reading or parsing `path` becomes one UserError naming it."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{what} not found", str(path)) from None
    except Exception as e:  # noqa: BLE001 - corrupt input of any kind is the user's to fix
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {what}: corrupt or not a sidrec file ({type(e).__name__}: {msg})",
                        str(path)) from None


def read_marker(path: str | Path) -> dict | None:
    """The marker of a sidrec directory (legacy directories: inferred from their files), else None."""
    path = Path(path)
    m = path / MARKER
    if m.is_file():
        with reading(m, "directory marker"):
            obj = json.loads(m.read_text(encoding="utf-8"))
            if not isinstance(obj, dict) or obj.get("kind") not in KINDS:
                raise ValueError("no valid 'kind'")
            if not isinstance(obj.get("inputs", {}), dict) or not isinstance(obj.get("fingerprint", ""), str):
                raise ValueError("malformed inputs or fingerprint")
        return obj
    for kind, files in _LEGACY.items():
        if all((path / f).exists() for f in files):
            return {"kind": kind, "legacy": True}
    return None


def check_output_dir(path: str | Path, kind: str, *, overwrite: bool = False, exist_ok: bool = False,
                     inputs: tuple = (), option: str = "--out") -> bool:
    """Refuse `path` as an output directory of `kind` unless sidrec may write there; True if it exists.

    Allowed: a new path; an empty directory; a directory with the marker of `kind` when
    `exist_ok` (the command continues it) or `overwrite` (the command replaces it). Never a file,
    a foreign directory, a sidrec directory of another kind, or a folder holding the command's input.
    """
    path = Path(path)
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp).resolve()
        if inp == path.resolve() or path.resolve() in inp.parents:
            raise UserError(f"{option} {path} holds this command's own input {inp}; choose another directory")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"{option} exists and is not a directory; give a new directory", str(path))
    if not path.exists():
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
            raise UserError(f"{option}: cannot create a directory under {parent} (not a writable directory)",
                            str(path))
        return False
    if not any(p.name != LOCK for p in path.iterdir()):  # empty, or only a lock sidrec took
        return True
    m = read_marker(path)
    if m is None:
        raise UserError(f"{option} is an existing directory that sidrec did not create; refusing to write "
                        "into it (give a new directory)", str(path))
    if m["kind"] != kind:
        raise UserError(f"{option} is a sidrec {m['kind']} directory, not a {kind} directory; refusing to "
                        "write into it", str(path))
    if not (exist_ok or overwrite):
        raise UserError(f"{option} already holds a {kind} directory; pass --overwrite to replace it, or "
                        "give a new directory", str(path))
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{option} is not writable", str(path))
    return True


def check_output_file(path: str | Path, *, overwrite: bool = False, option: str = "--out") -> None:
    """Refuse to replace an existing file unless the user asked for it (`overwrite`); never a directory."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} is a directory; give a file name", str(path))
    if path.exists() and not overwrite:
        raise UserError(f"{option} exists; pass --overwrite to replace it, or give a new file", str(path))
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise UserError(f"{option}: cannot write under {parent} (not a writable directory)", str(path))


def own_dir(path: str | Path, kind: str, **marker: Any) -> Path:
    """Create (or take over) the sidrec directory `path` of `kind` and write its marker; removes the
    temp files a killed job left inside it. Refuses foreign directories (see check_output_dir)."""
    path = Path(path)
    check_output_dir(path, kind, exist_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    if kind in LOCKED_KINDS:
        hold_writer_lock(path)  # before clean_stale: another writer's temp files are not stale
    clean_stale(path)
    old = read_marker(path) or {}
    if old.get("legacy") or MARKER not in os.listdir(path) or marker:
        write_marker(path, kind, **{**{k: v for k, v in old.items() if k not in ("kind", "legacy")}, **marker})
    return path


#: Kinds written by long jobs, which one process at a time may write (see hold_writer_lock).
LOCKED_KINDS = ("run", "pipeline")
LOCK = ".sidrec.lock"
_HELD: dict[str, Any] = {}
_UNLOCKABLE: list[str] = []


def hold_writer_lock(path: str | Path) -> None:
    """Take the sidrec directory `path` for this process alone, or refuse (UserError) while another
    process writes it: two trainings into one run would interleave checkpoints and remove each
    other's temp files. A non-blocking flock on `.sidrec.lock`, held until `release_writer_lock` or
    the process ends; the OS drops it when a killed job dies, so no stale lock outlives its writer.
    Where the platform or filesystem has no flock (Windows, some network mounts) it warns once and
    goes on unlocked, as sidrec did before the lock existed. Per process: threads share it."""
    key = str(Path(path).resolve())
    if key in _HELD:
        return
    f = open(Path(path) / LOCK, "a")  # noqa: SIM115 - kept open: the lock lives as long as the file
    try:
        if fcntl is None:
            raise OSError(errno.ENOSYS, "no fcntl on this platform")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError("another sidrec process is writing this directory; wait for it to finish or give "
                        "another directory", str(path)) from None
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
            f.close()
            raise
        if not _UNLOCKABLE:
            warnings.warn(f"{path}: this filesystem cannot lock files ({e.strerror}); nothing stops a second "
                          "process writing the same run", SidrecWarning, stacklevel=2)
        _UNLOCKABLE.append(key)
    _HELD[key] = f


def release_writer_lock(path: str | Path) -> None:
    """Let other processes write `path` again (a no-op if this process does not hold it)."""
    f = _HELD.pop(str(Path(path).resolve()), None)
    if f is not None:
        f.close()


@contextlib.contextmanager
def writer_session() -> Iterator[None]:
    """The directories taken inside the block are released when it ends (a CLI command, a fit);
    those this process held before stay held."""
    before = set(_HELD)
    try:
        yield
    finally:
        for key in [k for k in _HELD if k not in before]:
            release_writer_lock(key)


#: What sidrec writes into directories it replaces wholesale (anything else there is the user's).
#: The module that owns a kind's layout registers it (sidrec.run.layout: "run", "catalog").
_OWN_ENTRIES = {"data": {"sequences.npz", "items.parquet", "stats.json", "prepare.json", "world.npz", "embeddings"},
                "codebook": {"codebook.npz", "codebook.json"}}


def register_entries(kind: str, names: set[str]) -> None:
    """Declare what sidrec writes into a directory of `kind` (called by the module owning its layout,
    and by tools that add their own records, e.g. bench.quality); adds to what is declared."""
    _OWN_ENTRIES.setdefault(kind, set()).update(names)


def foreign_entries(path: Path, kind: str) -> list[str]:
    """Names in `path` that sidrec does not write for a directory of `kind` (sorted)."""
    own = _OWN_ENTRIES.get(kind)
    if own is None:
        return []
    return sorted(p.name for p in Path(path).iterdir() if p.name not in own and p.name not in (MARKER, LOCK)
                  and not (p.name.startswith(".") and p.name.endswith((".tmp", ".old"))))


def write_marker(path: Path, kind: str, **fields: Any) -> None:
    from sidrec.version import __version__

    write_json(Path(path) / MARKER, {"kind": kind, "sidrec": __version__, **fields})


def clean_stale(path: Path) -> None:
    """Remove `.NAME.*.tmp` files/dirs and `.NAME.old` dirs (only sidrec makes these names)."""
    for p in Path(path).iterdir():
        if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, kind: str, **marker: Any) -> Iterator[Path]:
    """Build the sidrec directory `path` of `kind` under a temporary name; rename it into place
    only when complete. An existing `path` is replaced only if it is empty or of the same kind
    (the caller decides whether replacing is wanted: see check_output_dir).

    If the body raises, the temporary directory is removed and `path` is left untouched.
    """
    path = Path(path)
    if path.exists():
        check_output_dir(path, kind, overwrite=True)
    with writer_session():
        if path.is_dir() and kind in LOCKED_KINDS:
            hold_writer_lock(path)  # not replaced under a process that is writing it
        with _replace_dir(path, kind, marker) as tmp:
            yield tmp


@contextlib.contextmanager
def _replace_dir(path: Path, kind: str, marker: dict) -> Iterator[Path]:
    """atomic_dir's body: build under a temp name, then swap it in (the caller holds the lock)."""
    if path.exists():
        foreign = foreign_entries(path, kind)
        if foreign:
            raise UserError(f"holds files sidrec did not write ({', '.join(foreign[:5])}); move them out before "
                            f"it is replaced", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in path.parent.glob(f".{path.name}.*.tmp"):  # a killed earlier attempt
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        try:
            yield tmp
        except OSError as e:  # a write inside the temp directory: name the directory the user asked for
            if not e.filename or str(tmp) in str(e.filename):
                raise OSError(e.errno, e.strerror, str(path)) from None
            raise
        write_marker(tmp, kind, **marker)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
