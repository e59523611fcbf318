"""Catalogue versions of a trained run: items added after training, recommendable at once.

A new item gets a semantic ID from its content with the run's fitted tokenizer (no refit:
`sidrec.tokenize.encode`); the model scores it through its tokens like any other item, with the
vectors `sidrec.model.extend` gives it. This module keeps the versions (their files: `layout`):
version 0 is the run as trained; each later one is written once, whole, and the pointer to the
active version moves last, so a reader sees the old catalogue or the whole new one.
"""

from __future__ import annotations

import fcntl
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sidrec import io
from sidrec.errors import UserError
from sidrec.run.layout import CATALOG, CATALOG_INFO, CATALOG_LOCK, CODEBOOK, CURRENT, ITEMS, VECTORS, VERSION
from sidrec.tokenize.codebook import Codebook


# --------------------------------------------------------------------------------------- versions
def version_dir(run: str | Path, version: str) -> Path:
    return Path(run) / CATALOG / version


def current(run: str | Path) -> str | None:
    """The active catalogue version of a run ("v0003"), or None when it serves what it was trained on."""
    p = Path(run) / CATALOG / CURRENT
    if not p.exists():
        return None
    with io.reading(p, "catalogue pointer"):
        name = p.read_text(encoding="utf-8").strip()
        if not VERSION.fullmatch(name):  # never a path: the pointer names a version of this run
            raise ValueError(f"names no version ({name[:40]!r})")
        if not (version_dir(run, name) / CATALOG_INFO).is_file():
            raise ValueError(f"names a missing version {name!r}")
    return name


def versions(run: str | Path) -> list[dict]:
    """Every catalogue version of a run, oldest first (their catalog.json)."""
    root = Path(run) / CATALOG
    return [io.read_json(p / CATALOG_INFO) for p in sorted(root.glob("v[0-9][0-9][0-9][0-9]"))
            if (p / CATALOG_INFO).is_file()]


def clear(run: str | Path) -> None:
    """Delete every version and the pointer (a retrain makes them meaningless); anything else a user
    put into catalog/ is left alone."""
    root = Path(run) / CATALOG
    if not root.is_dir():
        return
    for p in root.iterdir():
        if VERSION.fullmatch(p.name) and p.is_dir():
            shutil.rmtree(p)
        elif p.name in (CURRENT, CATALOG_LOCK):
            p.unlink()


def use(run: str | Path, version: str) -> None:
    """Make `version` (e.g. "v0002", or "v0000" for the run as trained) the active one."""
    root = Path(run) / CATALOG
    if not VERSION.fullmatch(version):
        raise UserError(f"a catalogue version is written v0001, v0002, ... (v0000: as trained), not {version!r}")
    if version == "v0000":
        (root / CURRENT).unlink(missing_ok=True)
        return
    if not (root / version / CATALOG_INFO).is_file():
        raise UserError(f"no catalogue version {version!r} (have: v0000, "
                        f"{', '.join(v['version'] for v in versions(run)) or 'no others'})", str(run))
    io.write_text(root / CURRENT, version + "\n")


def load_version(run: str | Path, name: str) -> tuple[Codebook, pd.DataFrame, dict]:
    """(codebook, item table, catalog.json) of one version."""
    if not VERSION.fullmatch(name):
        raise UserError(f"not a catalogue version: {name[:40]!r}", str(run))
    p = version_dir(run, name)
    info = io.read_json(p / CATALOG_INFO)
    with io.reading(p / ITEMS, "catalogue item table"):
        table = pd.read_parquet(p / ITEMS)
        if "item" not in table.columns:
            raise ValueError("no 'item' column")
    cb = Codebook.load(p / CODEBOOK)
    if cb.n_items != len(table):
        raise UserError(f"the catalogue's codebook has {cb.n_items} items, its table {len(table)}", str(p))
    return cb, table, info


# ------------------------------------------------------------------------------ adding items
def add_items(run, model, codebook: Codebook, table: pd.DataFrame, new: pd.DataFrame,
              embeddings: np.ndarray | None, *, parent: str | None = None, text_model: str | None = None,
              content_map=None) -> dict:
    """Write a new catalogue version with the items of `new` (column `item` + text fields) appended,
    and make it the active one.

    run: the RunDir; model/codebook/table: the catalogue version `parent` (None: as trained), which
    must be the newest one: versions only grow, so an item's internal id never changes. Items already
    in the catalogue are skipped (their codes never move). embeddings: [m, d] in the tokenizer's
    space, or None to embed the items' text with the run's text model (IDs fitted on text).
    content_map(x) -> [m, d_model] item vectors from the new items' embeddings (see `content_map`),
    stored with the weights they were derived from; None: prefix means only.
    Concurrent calls on one run are serialised by a lock file."""
    from sidrec.tokenize.encode import FittedQuantizer, encode_new

    t0 = time.perf_counter()
    if not model.head.adds_items:
        raise UserError("FV-MLE has no content path: a new item has no trained output vector, so it could never be "
                        f"ranked ({model.cfg.head} head); new items need AR-NTP or the parallel head, or a retrain")
    ids = new["item"].astype(str)
    if ids.duplicated().any():
        raise UserError(f"item id {ids[ids.duplicated()].iloc[0]!r} appears twice in the new items")
    if embeddings is not None and len(embeddings) != len(new):
        raise UserError(f"{len(embeddings)} embeddings for {len(new)} new items")
    known = ids.isin(set(table["item"].astype(str))).to_numpy()
    fresh = new[~known].reset_index(drop=True)
    if not len(fresh):
        return {"version": parent or "v0000", "added": 0, "already_present": int(known.sum())}
    tok = codebook.meta.get("tokenizer", {})
    text_model = text_model or tok.get("text_model", "all-MiniLM-L6-v2")
    x = embeddings[~known] if embeddings is not None else _text_embeddings(codebook, fresh, text_model)
    t_embed = time.perf_counter() - t0  # the text model (import, load, inference): most of the time when it runs
    FittedQuantizer.from_codebook(codebook).transform(x)  # refuse a wrong dimension before writing anything
    root = run.path / CATALOG
    root.mkdir(exist_ok=True)
    with open(root / CATALOG_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time: version names are taken in order
        newest = max((v["version"] for v in versions(run.path)), default="v0000")
        if (parent or "v0000") != newest:
            raise UserError(f"catalogue {parent or 'v0000'} is loaded but {newest} is newer; items are added on top "
                            f"of the newest version (so no item's id ever changes): load it, or `sidrec items use "
                            f"{newest}`", str(run.path))
        codes, report = encode_new(codebook, x)
        name = f"v{int(newest[1:]) + 1:04d}"
        ext = codebook.extend(codes, meta={"catalog_version": name})
        cols = [c for c in table.columns if c in fresh.columns]
        full = pd.concat([table, fresh[cols].assign(item=fresh["item"].astype(str))], ignore_index=True)
        info = {"version": name, "parent": newest, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                "n_items": int(ext.n_items), "n_trained": int(run.config()["n_items"]), "added": int(len(fresh)),
                "already_present": int(known.sum()), "ids": report.to_dict(),
                "embeddings": "given" if embeddings is not None else f"text ({text_model})",
                "added_items": fresh["item"].astype(str).tolist()[:1000],
                "seconds": round(time.perf_counter() - t0, 2),  # embedding the text and finding the IDs
                "embed_seconds": round(t_embed, 2)}
        vectors = _cumulative_vectors(run.path, parent, int(run.config()["n_items"]), len(table),
                                      None if content_map is None else content_map(x))
        info["item_vectors"] = "prefix mean" if vectors is None else "content (nearest trained items by embedding)"
        with io.atomic_dir(root / name, "catalog") as tmp:
            full.to_parquet(tmp / ITEMS, index=False)
            ext.save(tmp / CODEBOOK)
            if vectors is not None:  # stamped: used only with the weights they were derived from
                io.save_npz(tmp / VECTORS, vectors=vectors, weights_stamp=np.array(run.weights_stamp() or ""))
            io.write_json(tmp / CATALOG_INFO, info)
        use(run.path, name)  # the pointer moves last: a reader sees the old version or the whole new one
    return info


def _cumulative_vectors(run: Path, parent: str | None, n0: int, n_now: int, new: np.ndarray | None) -> np.ndarray | None:
    """Content vectors of every added item so far ([n - n0, d]; NaN rows: none, use the prefix mean)."""
    old = load_vectors(run, parent, None) if parent and parent != "v0000" else None
    if new is None and old is None:
        return None
    d = (new if new is not None else old).shape[1]
    prev = old if old is not None else np.full((n_now - n0, d), np.nan, np.float32)
    add = new.astype(np.float32) if new is not None else np.full((0, d), np.nan, np.float32)
    return np.concatenate([prev, add])


def load_vectors(run: str | Path, version: str, weights_stamp: str | None) -> np.ndarray | None:
    """A version's stored content vectors, if any and (with a stamp given) derived from these weights."""
    p = version_dir(run, version) / VECTORS
    if not p.exists():
        return None
    arr = io.load_npz(p, required=("vectors", "weights_stamp"))
    if weights_stamp is not None and str(arr["weights_stamp"]) != weights_stamp:
        import warnings

        from sidrec.errors import SidrecWarning

        warnings.warn(f"{p}: derived from other weights (the run was trained further since): its new items use "
                      "prefix means; add them again for content vectors", SidrecWarning, stacklevel=2)
        return None
    return arr["vectors"]


def _text_embeddings(codebook: Codebook, items: pd.DataFrame, text_model: str) -> np.ndarray:
    from sidrec.embed import embed_table_text

    tok = codebook.meta.get("tokenizer", {})
    source = str(tok.get("embeddings", codebook.meta.get("embeddings", "")))
    if source != "text":
        raise UserError(f"this run's semantic IDs were fitted on {source or 'unknown'} embeddings, which a new item "
                        "cannot be given from its text: pass --embeddings NEW.npy with vectors in the same space "
                        "(one row per new item)")
    return embed_table_text(items, text_model)


