"""Fingerprints: what each stage (data, codebook, run) was made from, and whether it is stale.

Every stage records its *inputs* as a flat dict of setting -> value (plus the fingerprints of the
stages it was built on and, for files, a content hash), and the digest of that dict. A stage is
reused only when the inputs it would be made from now have the same digest; otherwise `sidrec run`
makes it again and says which settings changed, and `train --resume` refuses, naming them. The
package version is an input of every stage, so results from another version of sidrec are never
passed off as current; the git commit is recorded, not compared.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from sidrec import io
from sidrec.config import flat_keys
from sidrec.errors import UserError
from sidrec.provenance import code_state, label
from sidrec.version import __version__

#: Settings that may change on `train --resume`: they do not change the weights a run reaches.
RESUME_FREE = frozenset({"train.device", "train.eval_batch_size", "train.log_every", "train.ckpt_every_steps"})


def _canon(v: Any) -> Any:
    """1 and 1.0 are one setting (YAML and --set spell numbers either way)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _canon(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    return v


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_canon(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def array_digest(*arrays) -> str:
    """sha256 of arrays' bytes (content fingerprints of in-memory data and of codes)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (cached per process by path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with io.reading(p), open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_DIGESTS[key] = h.hexdigest()[:16]
    return _FILE_DIGESTS[key]


def data_inputs(data: dict, resolve=lambda p: p) -> dict:
    """What a prepared data directory is made from: the data settings and the input files' hashes.
    `data` is a config's data section; `resolve` maps its relative paths to files."""
    if data.get("dir"):
        return {"data.dir": dir_fingerprint(resolve(data["dir"]), "data")}
    if data.get("synthetic") is not None:
        return {"sidrec": __version__, **flat_keys({"synthetic": data["synthetic"]}, "data.")}
    out = {"sidrec": __version__}
    for k in ("format", "kcore", "dedup", "max_seq_len", "item_id_col", "user_col", "item_col", "time_col", "sep",
              "engine", "shard_rows"):
        if k in data:
            out[f"data.{k}"] = data[k]
    for k in ("path", "meta"):
        if data.get(k):
            f = Path(resolve(data[k]))
            if k == "path" and data.get("engine") == "duckdb" and f.is_dir():  # a directory of Parquet parts
                from sidrec.data.stream import parquet_files

                out[f"data.{k}#sha256"] = hashlib.sha256(" ".join(
                    f"{g.relative_to(f)}:{file_digest(g)}" for g in parquet_files(f)).encode()).hexdigest()[:16]
                continue
            if not f.is_file():
                raise UserError(f"data.{k}: {'not a file' if f.exists() else 'file not found'}", str(f))
            out[f"data.{k}#sha256"] = file_digest(f)
    return out


def codebook_inputs(tokenizer: dict, data_fp: str, resolve=lambda p: p) -> dict:
    out = {"sidrec": __version__, "data": data_fp, **flat_keys(tokenizer, "tokenizer.")}
    emb = str(tokenizer.get("embeddings", ""))
    if emb.endswith(".npy"):
        out["tokenizer.embeddings"] = "file"  # the file's content, not how its path was spelled
        f = Path(resolve(emb))
        if not f.is_file():
            raise UserError("tokenizer.embeddings: file not found", str(f))
        out["tokenizer.embeddings#sha256"] = file_digest(f)
    return out


def model_inputs(cfg: dict, data_fp: str, codebook_fp: str | None) -> dict:
    """What a trained model is made from: model and train settings, its data and codebook."""
    train = {k: v for k, v in flat_keys(cfg["train"], "train.").items() if k not in RESUME_FREE}
    return {"sidrec": __version__, "data": data_fp, "codebook": codebook_fp, **flat_keys(cfg["model"], "model."), **train}


#: Settings added after runs were recorded, at the value that does what those runs did: a stage whose
#: recorded inputs lack one of them was made with this value (so it is not stale for it).
ADDED_KEYS = {"model.fv_loss": "full", "model.fv_sampler": "uniform", "model.fv_negatives": 256,
              "model.fv_shared_negatives": True, "model.fv_logq": True,
              "train.max_seconds": 0, "model.joint_fv_weight": 1.0, "model.joint_mix": 0.5,
              "model.node_table": False, "train.sparse": False, "train.sparse_optimizer": "adam", "train.sparse_lr": 0}


def changed_keys(old: dict, new: dict, ignore=frozenset()) -> list[str]:
    old = {**{k: v for k, v in ADDED_KEYS.items() if k in new and k not in old}, **old}
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [k for k in keys if _canon(old.get(k, "<absent>")) != _canon(new.get(k, "<absent>"))]


def dir_fingerprint(path: str | Path, kind: str) -> str:
    """The fingerprint a sidrec directory was made with (legacy directories: a hash of their main file)."""
    p = Path(path)
    m = io.read_marker(p) if p.is_dir() else None
    if m is None or m["kind"] != kind:
        what = {"data": "a prepared data directory (run `sidrec data prepare`)",
                "codebook": "a codebook directory (run `sidrec tokenize`)"}.get(kind, f"a sidrec {kind} directory")
        raise UserError(f"not {what}", str(p))
    if m.get("fingerprint"):
        return m["fingerprint"]
    from sidrec.data.shards import part_files

    parts = part_files(p) if kind == "data" else []
    if parts and not (p / "sequences.npz").exists():  # sharded data written by another engine (docs/scale-out.md)
        return hashlib.sha256(" ".join(f"{f.name}:{file_digest(f)}" for f in parts).encode()).hexdigest()[:16]
    return file_digest(p / {"data": "sequences.npz", "codebook": "codebook.npz"}[kind])


def stage_status(path: str | Path, kind: str, inputs: dict) -> tuple[str, list[str]]:
    """("new" | "same" | "stale", changed keys) of the stage directory `path` against `inputs`."""
    p = Path(path)
    m = io.read_marker(p) if p.is_dir() else None
    if m is None:
        return "new", []
    if m["kind"] != kind:
        io.check_output_dir(p, kind, exist_ok=True)  # raises: a directory of another kind
    old = m.get("inputs")
    if old is None:
        return "stale", ["its fingerprint: it was made by an older sidrec"]
    if m.get("fingerprint") == digest(inputs):
        return "same", []
    changed = changed_keys(old, inputs)
    return ("stale", changed) if changed else ("same", [])  # e.g. a key added later, at its old value


def marker_fields(inputs: dict) -> dict:
    return {"inputs": inputs, "fingerprint": digest(inputs), "commit": _commit()}


def _commit() -> str | None:
    return label(code_state())
