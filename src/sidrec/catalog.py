"""Catalogue versions of a trained run: items added after training, recommendable at once.

A new item gets a semantic ID from its content with the run's fitted tokenizer (no refit:
`sidrec.tokenize.encode`); the AR-NTP head then scores it through its tokens like any other item.
What the model holds per item and was never trained for a new one:

- its item vector (the tied item-ID table: the backbone's input row and, in the AR head, the
  vector averaged into every trie node above it): by default the trained vector of its nearest
  trained item by content (`content_map`), stored with the weights' stamp; else, or with other weights,
  the *prefix mean*: the mean trained vector of the items that share its longest ID prefix — its
  siblings under the same k-1 tokens, else k-2, ... else all items;
- a trie node that did not exist (its leaf, and any new prefix) gets the mean trained bias of its
  siblings the same way.

Prefix means are derived from the trained weights at load time (never stored), so they always
match the weights. FV-MLE has no content path (a new item has no output vector) and refuses; the
parallel head needs only the codes.

Layout inside the run directory (version 0 is the run as trained: codebook/ and the data's items):

    catalog/CURRENT          the active version's name (replaced atomically)
    catalog/v0001/           one directory per version, never changed once written
        catalog.json         version, parent, sizes, the added ids and how their IDs were found
        items.parquet        the whole item table: trained items first (same order), then added ones
        codebook/            the extended codebook (existing codes unchanged)
        vectors.npz          content vectors of the added items and the weights' stamp (if any)
"""

from __future__ import annotations

import fcntl
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sidrec import io
from sidrec.errors import UserError
from sidrec.tokenize.codebook import Codebook, mixed_radix

DIR, CURRENT = "catalog", "CURRENT"


# --------------------------------------------------------------------------------------- versions
VERSION = re.compile(r"v\d{4}")


def current(run: str | Path) -> str | None:
    """The active catalogue version of a run ("v0003"), or None when it serves what it was trained on."""
    p = Path(run) / DIR / CURRENT
    if not p.exists():
        return None
    with io.reading(p, "catalogue pointer"):
        name = p.read_text(encoding="utf-8").strip()
        if not VERSION.fullmatch(name):  # never a path: the pointer names a version of this run
            raise ValueError(f"names no version ({name[:40]!r})")
        if not (Path(run) / DIR / name / "catalog.json").is_file():
            raise ValueError(f"names a missing version {name!r}")
    return name


def versions(run: str | Path) -> list[dict]:
    """Every catalogue version of a run, oldest first (their catalog.json)."""
    root = Path(run) / DIR
    return [io.read_json(p / "catalog.json") for p in sorted(root.glob("v[0-9][0-9][0-9][0-9]"))
            if (p / "catalog.json").is_file()]


def use(run: str | Path, version: str) -> None:
    """Make `version` (e.g. "v0002", or "v0000" for the run as trained) the active one."""
    root = Path(run) / DIR
    if not VERSION.fullmatch(version):
        raise UserError(f"a catalogue version is written v0001, v0002, ... (v0000: as trained), not {version!r}")
    if version == "v0000":
        (root / CURRENT).unlink(missing_ok=True)
        return
    if not (root / version / "catalog.json").is_file():
        raise UserError(f"no catalogue version {version!r} (have: v0000, "
                        f"{', '.join(v['version'] for v in versions(run)) or 'no others'})", str(run))
    io.write_text(root / CURRENT, version + "\n")


def load_version(run: str | Path, name: str) -> tuple[Codebook, pd.DataFrame, dict]:
    """(codebook, item table, catalog.json) of one version."""
    if not VERSION.fullmatch(name):
        raise UserError(f"not a catalogue version: {name[:40]!r}", str(run))
    p = Path(run) / DIR / name
    info = io.read_json(p / "catalog.json")
    with io.reading(p / "items.parquet", "catalogue item table"):
        table = pd.read_parquet(p / "items.parquet")
        if "item" not in table.columns:
            raise ValueError("no 'item' column")
    cb = Codebook.load(p / "codebook")
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
    if model.cfg.head in ("fv", "joint"):
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
    FittedQuantizer.from_codebook(codebook).transform(x)  # refuse a wrong dimension before writing anything
    root = run.path / DIR
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
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
                "seconds": round(time.perf_counter() - t0, 2)}  # embedding the text and finding the IDs
        vectors = _cumulative_vectors(run.path, parent, int(run.config()["n_items"]), len(table),
                                      None if content_map is None else content_map(x))
        info["item_vectors"] = "prefix mean" if vectors is None else "content (nearest trained items by embedding)"
        with io.atomic_dir(root / name, "catalog") as tmp:
            full.to_parquet(tmp / "items.parquet", index=False)
            ext.save(tmp / "codebook")
            if vectors is not None:  # stamped: used only with the weights they were derived from
                io.save_npz(tmp / "vectors.npz", vectors=vectors, weights_stamp=np.array(run.weights_stamp() or ""))
            io.write_json(tmp / "catalog.json", info)
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
    p = Path(run) / DIR / version / "vectors.npz"
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


def content_map(x_trained: np.ndarray, vectors: np.ndarray, neighbours: int = 1, chunk: int = 1024):
    """x -> vectors: a new item takes the trained vector of its nearest trained item by content
    (cosine similarity in the tokenizer's embedding space; with neighbours > 1, their similarity-
    weighted mean). Catalogues are full of near-twins (another size, colour or edition of a product)
    whose trained vector carries who buys such an item; on Beauty's cold start one neighbour ranked
    cold items best, a ridge regression from content to vectors worst (it shrinks every vector)."""
    xt = torch.from_numpy(_unit(x_trained))
    v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))

    def apply(new: np.ndarray) -> np.ndarray:
        xn = torch.from_numpy(_unit(new))
        out = []
        for s in range(0, len(xn), chunk):  # [chunk, N] similarities at a time
            sim, idx = torch.topk(xn[s:s + chunk] @ xt.T, min(neighbours, len(xt)), dim=1)
            w = torch.softmax(sim * 20.0, dim=1)  # sharp: the nearest twin dominates
            out.append((w[..., None] * v[idx]).sum(1))
        return torch.cat(out).numpy() if out else np.zeros((0, v.shape[1]), np.float32)

    return apply


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def _text_embeddings(codebook: Codebook, items: pd.DataFrame, text_model: str) -> np.ndarray:
    from sidrec.embed import embed_table_text

    tok = codebook.meta.get("tokenizer", {})
    source = str(tok.get("embeddings", codebook.meta.get("embeddings", "")))
    if source != "text":
        raise UserError(f"this run's semantic IDs were fitted on {source or 'unknown'} embeddings, which a new item "
                        "cannot be given from its text: pass --embeddings NEW.npy with vectors in the same space "
                        "(one row per new item)")
    return embed_table_text(items, text_model)


# ---------------------------------------------------------------------------- the extended model
def prefix_mean(base_codes: np.ndarray, values: torch.Tensor, query_codes: np.ndarray, sizes: list[int]) -> torch.Tensor:
    """For each query code row: the mean of `values` over the base rows that share its longest prefix
    (all its tokens but the last first, then shorter prefixes, down to the mean of all rows)."""
    depth = query_codes.shape[1]
    out = values.new_zeros((len(query_codes), *values.shape[1:]))
    done = np.zeros(len(query_codes), dtype=bool)
    for length in range(depth - 1, -1, -1):
        bk = mixed_radix(base_codes[:, :length], sizes[:length])
        qk = mixed_radix(query_codes[:, :length], sizes[:length])
        uniq, inv = np.unique(bk, return_inverse=True)
        sums = values.new_zeros((len(uniq), *values.shape[1:])).index_add_(0, torch.as_tensor(inv), values)
        counts = torch.as_tensor(np.bincount(inv, minlength=len(uniq)), dtype=values.dtype)
        pos = np.searchsorted(uniq, qk).clip(max=len(uniq) - 1)
        hit = (uniq[pos] == qk) & ~done
        idx = torch.as_tensor(pos[hit])
        out[torch.as_tensor(np.flatnonzero(hit))] = sums[idx] / counts[idx].reshape(-1, *[1] * (values.dim() - 1))
        done |= hit
    return out


def extend_model(model, base: Codebook, ext: Codebook, vectors: np.ndarray | None = None):
    """A model over the extended catalogue: trained weights for trained items and nodes; for what is
    new, the stored content vectors of the added items where given (`vectors` [n - n0, d], NaN: none),
    else prefix means (see the module doc). Same configuration, n_items = ext.n_items."""
    from sidrec.model import SeqRecModel

    n0, n = base.n_items, ext.n_items
    device = next(model.parameters()).device
    new = SeqRecModel(model.cfg, n, ext)
    old = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {}
    for key, target in new.state_dict().items():
        value = old[key]
        if value.shape == target.shape:
            state[key] = value
        elif key in ("backbone.item_emb.weight", "head.item_emb.weight"):
            rows = value[:n0]
            added = prefix_mean(base.codes, rows, ext.codes[n0:], ext.sizes)
            if vectors is not None and key == item_table_key(model):
                given = torch.as_tensor(vectors, dtype=added.dtype)
                added = torch.where(torch.isnan(given), added, given)
            pad = value[n0:]  # the padding row of the input table (empty for the head's own table)
            state[key] = torch.cat([rows, added, pad])
        elif key.endswith(".rows"):  # a node table: new nodes get zero rows (prefix means), see NodeTable
            owner = key.rsplit(".", 1)[0]
            state[key] = model.get_submodule(owner).extended_rows(new.get_submodule(owner), base.trie.keys)
        elif key.endswith(".node_bias") and target.ndim == 2:  # a node table's biases, depth by depth
            state[key] = _table_biases(model.get_submodule(key.rsplit(".", 1)[0]), target, base, ext)
        elif key.startswith("head.node_bias."):
            state[key] = _node_values(int(key.rsplit(".", 1)[1]) + 1, value, base, ext)
        else:
            raise RuntimeError(f"cannot extend parameter {key} from {tuple(value.shape)} to {tuple(target.shape)}")
    new.load_state_dict(state)
    table = _table_module(new)
    if vectors is not None and table is not None and not isinstance(table, torch.nn.Embedding):
        given = ~np.isnan(vectors).any(1)  # a node table: the content vectors through the new leaves
        table.set_items_(torch.as_tensor(np.flatnonzero(given) + n0), torch.as_tensor(vectors[given]))
    return new.to(device).eval()


def _table_biases(table, target: torch.Tensor, base: Codebook, ext: Codebook) -> torch.Tensor:
    """A node table's biases on the extended trie (`_node_values` at every depth; the root's kept)."""
    from sidrec.model.node_table import NodeTable

    bias = table.node_bias.detach().cpu()[:, 0]
    out = target.new_zeros(target.shape)
    out[0, 0] = bias[0]
    new_off = NodeTable.offsets(ext.trie)
    for depth in range(1, ext.trie.depth + 1):
        out[new_off[depth]:new_off[depth + 1], 0] = _node_values(depth, bias[table.depth_slice(depth)], base, ext)
    return out


def _table_module(model):
    """The module holding the item table content vectors are fitted to (see `item_table_key`)."""
    if model.backbone.item_emb is not None:
        return model.backbone.item_emb
    own = getattr(model.head, "own_nodes", None) or getattr(model.head, "item_emb", None)
    return own if isinstance(own, torch.nn.Module) else None


def item_table_key(model) -> str | None:
    """The item table content vectors are fitted to: the backbone's item-ID table (tied: also the AR
    head's item vectors), else the AR head's own."""
    if model.backbone.item_emb is not None:
        return "backbone.item_emb.weight"
    return "head.item_emb.weight" if isinstance(getattr(model.head, "item_emb", None), torch.nn.Embedding) else None


def item_table(model) -> torch.Tensor | None:
    """The trained item vectors [N, d] of that table (None: the model has no item table); a node
    table's are its path sums."""
    table = _table_module(model)
    if table is None:
        return None
    with torch.no_grad():
        return table.weight[: model.n_items].detach().cpu()


def _node_values(depth: int, value: torch.Tensor, base: Codebook, ext: Codebook) -> torch.Tensor:
    """Depth-`depth` node biases on the extended trie: trained nodes keep theirs, new nodes the prefix mean."""
    bt, et = base.trie, ext.trie
    pos = np.searchsorted(bt.keys[depth], et.keys[depth]).clip(max=len(bt.keys[depth]) - 1)
    known = bt.keys[depth][pos] == et.keys[depth]
    out = value.new_empty(et.n_nodes(depth))
    out[torch.as_tensor(np.flatnonzero(known))] = value[torch.as_tensor(pos[known])]
    if (~known).any():
        base_codes = base.codes[bt.first_item[depth], :depth]
        new_codes = ext.codes[et.first_item[depth][~known], :depth]
        out[torch.as_tensor(np.flatnonzero(~known))] = prefix_mean(base_codes, value, new_codes, ext.sizes)
    return out
