"""Semantic IDs for items a codebook was not fitted on, from the codebook's saved parameters.

No refit: every method maps new embeddings with what it saved when it was fitted — RQ-KMeans and
balanced RQ-KMeans their per-level centroids (a new item takes the nearest centroid; the balance
constraint applies to the fit only), RQ-VAE its encoder and code vectors, PQ / OPQ the rotation
and the sub-space centroids. Codes of existing items never change, and the map stays a bijection:

1. *direct*: a new item takes its nearest ID (greedy, level by level) when that ID is free;
2. *resolved*: otherwise the nearest free last-level code under the same prefix, as collisions are
   resolved at fit time (new items competing for one code: the closest wins);
3. *fallback*: when that prefix has no free code left, the next-nearest prefix with room (prefixes
   ranked by a small beam search over the quantizer's levels, widened until one has room).

With TIGER's extra-token resolution the last level numbers the items sharing a quantized ID, so a
new item takes the lowest free number under its nearest ID, or falls back to the next prefix.
Deterministic: the same items in the same order get the same IDs (ties go to the earlier item).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sidrec.errors import UserError
from sidrec.tokenize.codebook import Codebook, mixed_radix
from sidrec.tokenize.resolve import KeySet


@dataclass
class FittedQuantizer:
    """The parameters of a fitted tokenizer that map an embedding to tokens.

    kind "residual": level j quantizes what levels < j left; "product": level j quantizes its own
    sub-space. `weights` (RQ-VAE) is the encoder MLP as (W, b) pairs with SiLU between layers.
    """

    method: str
    kind: str
    centroids: list[np.ndarray]
    in_dim: int
    rotation: np.ndarray | None = None
    weights: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @classmethod
    def from_codebook(cls, cb: Codebook) -> "FittedQuantizer":
        method, ex = cb.meta.get("method"), cb.extras
        levels = cb.levels - (1 if cb.meta.get("resolve") == "extra-token" else 0)
        if method in ("rq-kmeans", "rq-kmeans-balanced", "pq", "opq") and all(f"centroids_{j}" in ex for j in range(levels)):
            cents = [ex[f"centroids_{j}"].astype(np.float32) for j in range(levels)]
            if method in ("pq", "opq"):
                dim = int(ex["embedding_dim"]) if "embedding_dim" in ex else sum(c.shape[1] for c in cents)
                return cls(method, "product", cents, dim, ex.get("rotation"))
            return cls(method, "residual", cents, cents[0].shape[1])
        if method == "rq-vae" and "codebooks" in ex and "encoder_0_weight" in ex:
            layers = sorted(int(k.split("_")[1]) for k in ex if k.startswith("encoder_") and k.endswith("_weight"))
            weights = [(ex[f"encoder_{i}_weight"], ex[f"encoder_{i}_bias"]) for i in layers]
            return cls(method, "residual", list(ex["codebooks"][:levels].astype(np.float32)), weights[0][0].shape[1],
                       weights=weights)
        raise UserError(f"this codebook ({method or 'unknown method'}) has no saved tokenizer parameters to encode new "
                        "items with; fit it again with this version of sidrec (`sidrec tokenize`)")

    @property
    def levels(self) -> int:
        return len(self.centroids)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """The space the centroids live in: the embedding itself, its rotation (OPQ, zero-padded to a
        multiple of the sub-spaces) or the RQ-VAE encoder's latent."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise UserError(f"new items need embeddings of dimension {self.in_dim} (the tokenizer's), got shape "
                            f"{list(x.shape)}")
        if self.weights:
            for i, (w, b) in enumerate(self.weights):
                x = x @ w.T + b
                if i < len(self.weights) - 1:
                    x = x / (1 + np.exp(-x))  # SiLU
            return x.astype(np.float32)
        if self.kind == "product":
            d = sum(c.shape[1] for c in self.centroids)
            x = np.concatenate([x, np.zeros((len(x), d - x.shape[1]), np.float32)], 1) if d > x.shape[1] else x
            return x @ self.rotation.T if self.rotation is not None else x
        return x

    def level_dist(self, j: int, z: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """Squared distances [m, V_j] of each row to every level-j code, given its tokens < j [m, j]."""
        c = self.centroids[j]
        if self.kind == "product":
            lo = sum(cc.shape[1] for cc in self.centroids[:j])
            r = z[:, lo:lo + c.shape[1]]
        else:
            r = z - sum((self.centroids[l][prefix[:, l]] for l in range(j)), np.zeros_like(z))
        return (r * r).sum(1, keepdims=True) - 2 * r @ c.T + (c * c).sum(1)[None, :]

    def encode(self, x: np.ndarray) -> np.ndarray:
        """The nearest (greedy, level by level) quantizer tokens [m, levels] of embeddings x."""
        return self.prefixes(self.transform(x), self.levels, width=1)[0][:, 0]

    def prefixes(self, z: np.ndarray, depth: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The `width` best token prefixes of length `depth` per row by a beam search ([m, W, depth]
        tokens, [m, W] costs, best first). Cost: the error left after the prefix (residual) or the
        summed sub-space errors (product)."""
        m = len(z)
        toks = np.zeros((m, 1, 0), np.int64)
        cost = np.zeros((m, 1))
        for j in range(depth):
            w = toks.shape[1]
            d = self.level_dist(j, np.repeat(z, w, 0), toks.reshape(m * w, j)).reshape(m, w, -1)
            total = (d if self.kind == "residual" else cost[:, :, None] + d).reshape(m, -1)
            keep = min(width, total.shape[1])
            best = np.argsort(total, axis=1, kind="stable")[:, :keep]
            v = d.shape[2]
            parent, tok = best // v, best % v
            toks = np.concatenate([np.take_along_axis(toks, parent[:, :, None], 1), tok[:, :, None]], 2)
            cost = np.take_along_axis(total, best, 1)
        return toks, cost


@dataclass
class EncodeReport:
    """How a batch of new items got its IDs."""

    n_new: int
    direct: int
    resolved: int  # their nearest ID was taken: a free last-level code under the same prefix
    fallback: int  # their nearest prefix was full: placed under the next-nearest prefix with room
    full_prefixes: list[list[int]]  # the prefixes that were full (up to 20)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def encode_new(cb: Codebook, x: np.ndarray) -> tuple[np.ndarray, EncodeReport]:
    """Bijective codes [m, k] for m new items with embeddings x, next to the codebook's N items (see
    the module doc). The codebook itself is not changed: `Codebook.extend` adds the codes."""
    fq = FittedQuantizer.from_codebook(cb)
    z = fq.transform(x)
    m, k, sizes = len(z), cb.levels, cb.sizes
    extra = k == fq.levels + 1
    if m == 0:
        return np.zeros((0, k), np.int64), EncodeReport(0, 0, 0, 0, [])
    taken = KeySet(cb.keys)
    greedy = fq.prefixes(z, fq.levels, 1)[0][:, 0]  # the nearest quantizer tokens
    prefix = greedy[:, : k - 1].copy() if not extra else greedy.copy()
    codes = np.full((m, k), -1, dtype=np.int64)
    state = np.zeros(m, dtype=np.int64)  # 0 direct, 1 resolved, 2 fallback
    pending = np.arange(m)
    full: list[list[int]] = []
    tried = [set() for _ in range(m)]
    width = 8
    while len(pending):
        last = _place(fq, z, pending, prefix[pending], sizes, taken, extra)
        placed = last >= 0
        first_try = np.array([not tried[i] for i in pending])
        own_best = (last == greedy[pending, -1]) if not extra else (last == 0)
        state[pending[placed & first_try & ~own_best]] = 1
        state[pending[placed & ~first_try]] = 2
        codes[pending[placed], : k - 1] = prefix[pending[placed]]
        codes[pending[placed], k - 1] = last[placed]
        stuck = pending[~placed]
        for i in stuck:
            tried[i].add(tuple(prefix[i].tolist()))
            if len(full) < 20 and list(prefix[i]) not in full:
                full.append(prefix[i].tolist())
        if len(stuck):
            width = _next_prefixes(fq, z, stuck, prefix, tried, k - 1, sizes, width)
        pending = stuck
    return codes, EncodeReport(m, int((state == 0).sum()), int((state == 1).sum()), int((state == 2).sum()), full)


def _place(fq: FittedQuantizer, z: np.ndarray, items: np.ndarray, prefix: np.ndarray, sizes: list[int],
           taken: KeySet, extra: bool) -> np.ndarray:
    """Last-level tokens for `items` under their `prefix` [n, k-1]: each takes its nearest free code
    (rounds of proposals; a code goes to its closest proposer, ties to the earlier item); -1 where
    the prefix has no free code left. Adds what it assigns to `taken`."""
    v = sizes[-1]
    if extra:  # the disambiguation number: lowest free first
        dist = np.tile(np.arange(v, dtype=np.float64), (len(items), 1))
    else:
        dist = fq.level_dist(len(sizes) - 1, z[items], prefix)
    prefs = np.argsort(dist, axis=1, kind="stable")
    base = mixed_radix(prefix, sizes[:-1]) * v
    out = np.full(len(items), -1, dtype=np.int64)
    ptr = np.zeros(len(items), dtype=np.int64)
    live = np.arange(len(items))
    while len(live):
        tok = prefs[live, ptr[live]]
        key = base[live] + tok
        free = ~taken.contains(key)
        order = np.lexsort((live, dist[live, tok], key))  # per key: closest, then earliest item
        first = np.ones(len(order), dtype=bool)
        first[1:] = key[order][1:] != key[order][:-1]
        win = np.zeros(len(live), dtype=bool)
        win[order[first]] = True
        win &= free
        out[live[win]] = tok[win]
        taken.add(key[win])
        ptr[live[~win]] += 1
        live = live[~win & (ptr[live] < prefs.shape[1])]  # a fit on few items has fewer codes than v
    return out


def _next_prefixes(fq: FittedQuantizer, z: np.ndarray, stuck: np.ndarray, prefix: np.ndarray, tried: list[set],
                   depth: int, sizes: list[int], width: int) -> int:
    """Move each stuck item to its best prefix not tried yet (beam of `width`, doubled until every
    stuck item finds one; the whole prefix space at most). Returns the width used."""
    space = int(np.prod(sizes[:depth]))
    while True:
        cands, _ = fq.prefixes(z[stuck], depth, min(width, space))
        ok = True
        for row, i in enumerate(stuck):
            nxt = next((c for c in cands[row] if tuple(c.tolist()) not in tried[i]), None)
            if nxt is None:
                ok = False
                break
            prefix[i] = nxt
        if ok:
            return width
        if width >= space:
            raise UserError("no free semantic ID is left for a new item: every prefix is full; fit the "
                            "tokenizer again with a larger --codebook-size or more --levels")
        width *= 4
