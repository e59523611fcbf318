"""Quantizers that turn item embeddings into k-token codes.

Cascaded (residual): RQ-KMeans, balanced RQ-KMeans, RQ-VAE (in rqvae.py) — token j quantizes what
tokens < j left unexplained. Parallel (product): PQ, OPQ — token j quantizes its own sub-space.
Every quantizer returns a `Quantized`, including, for collision resolution, the distance of any
item to every code of the last level.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable

import faiss
import numpy as np
import torch


#: Above this many items, RQ-KMeans fits its centroids on a sample of this size and assigns every
#: item in batches, reading the embeddings once (they may be a memory-mapped .npy): memory is then
#: the codes and one error per item, not copies of the [N, d] matrix. (faiss' k-means trains on
#: k * 256 points of whatever it is given, so the sample costs no fit quality.)
FIT_ROWS = 1 << 22
ASSIGN_BATCH = 1 << 16


@dataclass
class Quantized:
    codes: np.ndarray  # [N, k] integers
    sizes: list[int]
    err: np.ndarray  # [N] squared reconstruction error of each item (collision resolution keeps the closest)
    rel_err: float  # total squared error / total squared norm of the embeddings
    # level_dist(j, idx, codes): squared distances [m, V_j] of items idx to every level-j code,
    # given their current tokens at levels < j (cascaded quantizers depend on them)
    level_dist: Callable[[int, np.ndarray, np.ndarray], np.ndarray]
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def with_recon(x: np.ndarray, codes: np.ndarray, sizes: list[int], recon: np.ndarray, level_dist: Callable,
               extras: dict[str, np.ndarray]) -> Quantized:
    """A Quantized from an in-memory reconstruction [N, d] of x."""
    sq = (x - recon) ** 2
    return Quantized(codes, sizes, sq.sum(1), float(sq.sum() / max(1e-12, (x**2).sum())), level_dist, extras)


def _kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20) -> np.ndarray:
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, spherical=False)
    km.cp.min_points_per_centroid = 1  # small catalogs are fine; silence faiss' warning
    km.cp.max_points_per_centroid = 256  # faiss subsamples large inputs (k * 256 points)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.copy()


def _search(x: np.ndarray, c: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(np.ascontiguousarray(c, dtype=np.float32))
    d, i = index.search(np.ascontiguousarray(x, dtype=np.float32), k)
    return d, i


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[n, k] squared distances, column j = centroid j."""
    if len(x) * len(c) < 4_000_000:
        return ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    # |x|^2 - 2 x.c + |c|^2 as one GEMM (4x faster than a faiss search for every centroid), >= 0
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = x @ (-2.0 * c.T.astype(np.float32))
    out += (x**2).sum(1)[:, None]
    out += (c.astype(np.float32) ** 2).sum(1)[None, :]
    return np.maximum(out, 0, out=out)


def capacity_assign(x: np.ndarray, c: np.ndarray, capacity: np.ndarray, prefs: int = 32) -> np.ndarray:
    """Assign points to centroids without exceeding each centroid's capacity (greedy, vectorized).

    Each round, every pending point proposes its next-preferred centroid; each centroid accepts
    its closest proposers up to its remaining capacity. Points that run out of their `prefs`
    nearest centroids are re-assigned recursively among centroids that still have room.
    """
    n, k = len(x), len(c)
    t = min(prefs, k)
    dist, lab = _search(x, c, t)
    out = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    rank = np.zeros(n, dtype=np.int64)
    pending = np.arange(n)
    while len(pending) and rank[pending].min() < t:
        live = pending[rank[pending] < t]
        cand = lab[live, rank[live]]
        d = dist[live, rank[live]]
        order = np.lexsort((d, cand))
        live, cand = live[order], cand[order]
        start = np.searchsorted(cand, cand, side="left")
        pos = np.arange(len(cand)) - start  # position within its centroid's proposers
        ok = pos < (capacity[cand] - load[cand])
        out[live[ok]] = cand[ok]
        np.add.at(load, cand[ok], 1)
        rank[live[~ok]] += 1
        pending = np.flatnonzero(out < 0)
    if len(pending):
        room = np.flatnonzero(capacity - load > 0)
        sub = capacity_assign(x[pending], c[room], (capacity - load)[room], prefs=len(room))
        out[pending] = room[sub]
    return out


def balanced_kmeans(x: np.ndarray, k: int, seed: int, iters: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Equal-size k-means (sizes differ by at most one): k-means init, then capacity-constrained
    assignment alternating with centroid updates."""
    c = _kmeans(x, k, seed)
    cap = np.full(k, math.ceil(len(x) / k), dtype=np.int64)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    a = capacity_assign(x, c, cap)
    for _ in range(iters):
        sums = torch.zeros(k, x.shape[1]).index_add_(0, torch.from_numpy(a), xt)
        cnt = np.bincount(a, minlength=k)
        c = np.where(cnt[:, None] > 0, sums.numpy() / np.maximum(cnt, 1)[:, None], c).astype(np.float32)
        a = capacity_assign(x, c, cap)
    return c, a


def rq_kmeans(x: np.ndarray, levels: int, k: int, seed: int = 0, balanced: bool = False,
              fit_rows: int | None = None) -> Quantized:
    """Residual k-means: level l clusters the residual left by levels < l (faiss k-means). Above
    `fit_rows` (default FIT_ROWS) items, and not balanced (its capacities are global), the streamed
    fit below."""
    fit_rows = fit_rows or FIT_ROWS
    if len(x) > fit_rows and not balanced:
        return rq_kmeans_streamed(x, levels, k, seed, fit_rows)
    x = np.ascontiguousarray(x, dtype=np.float32)
    k_eff = min(k, len(x))
    res = x.copy()
    codes, cents = [], []
    for level in range(levels):
        if balanced:
            c, a = balanced_kmeans(res, k_eff, seed + level)
        else:
            c = _kmeans(res, k_eff, seed + level)
            a = _search(res, c)[1][:, 0]
        codes.append(a.astype(np.int64))
        cents.append(c)
        res = res - c[a]

    def level_dist(j: int, idx: np.ndarray, cur: np.ndarray) -> np.ndarray:
        r = x[idx] - sum((cents[l][cur[:, l]] for l in range(j)), np.zeros_like(x[idx]))
        return _sq_dist(r, cents[j])

    extras = {f"centroids_{j}": c for j, c in enumerate(cents)}
    return with_recon(x, np.stack(codes, 1), [k] * levels, x - res, level_dist, extras)


class _Rows:
    """Rows of x: for a memory-mapped file, read with pread, so the pages stay in the kernel's cache
    and not in this process (a memory map keeps every page it touched resident: one pass over 10^8 x
    32 floats would be 12.8 GB of RSS); an array in memory is indexed as usual."""

    def __init__(self, x: np.ndarray):
        self.x, self.file = x, None
        whole = (isinstance(x, np.memmap) and x.filename and x.flags.c_contiguous and x.ndim == 2
                 and os.path.getsize(x.filename) == x.offset + x.nbytes)  # a slice keeps its parent's offset
        if whole:
            self.file = open(x.filename, "rb")
            weakref.finalize(self, self.file.close)
            self.row = x.dtype.itemsize * x.shape[1]

    def _read(self, a: int, m: int) -> np.ndarray:
        buf, want, at = bytearray(), m * self.row, self.x.offset + a * self.row
        while len(buf) < want:  # pread may return less (Linux caps one read below 2 GiB)
            chunk = os.pread(self.file.fileno(), want - len(buf), at + len(buf))
            if not chunk:
                raise OSError(f"{self.x.filename}: file shorter than its header says")
            buf += chunk
        return np.frombuffer(bytes(buf), dtype=self.x.dtype).reshape(m, self.x.shape[1])

    def block(self, a: int, b: int) -> np.ndarray:
        b = min(b, len(self.x))
        return np.array(self._read(a, b - a) if self.file else self.x[a:b], dtype=np.float32)

    def take(self, idx: np.ndarray, window: int = 4096) -> np.ndarray:
        """x[idx] as float32: one read per `window`-row span of the file that holds a wanted row."""
        if self.file is None or not len(idx):
            return np.asarray(self.x[idx], dtype=np.float32).reshape(len(idx), self.x.shape[1])
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        out = np.empty((len(idx), self.x.shape[1]), dtype=np.float32)
        cuts = np.flatnonzero(np.diff(rows // window)) + 1
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(rows)]])):
            first = int(rows[lo])
            span = self._read(first, int(rows[hi - 1]) - first + 1)
            out[order[lo:hi]] = span[rows[lo:hi] - first]
        return out


def rq_kmeans_streamed(x: np.ndarray, levels: int, k: int, seed: int, fit_rows: int,
                       batch: int = ASSIGN_BATCH) -> Quantized:
    """RQ-KMeans for catalogues larger than memory: centroids fitted on `fit_rows` sampled items,
    then every item assigned in batches of `batch` rows. Holds codes [N, levels] int32 and one error
    per item; `x` (e.g. np.load(..., mmap_mode="r")) is read once here and then only the rows that
    collision resolution asks for."""
    n, rows = len(x), _Rows(x)
    rng = np.random.default_rng(seed)
    res = rows.take(np.sort(rng.choice(n, fit_rows, replace=False)))
    cents = []
    for level in range(levels):
        c = _kmeans(res, min(k, fit_rows), seed + level)
        res -= c[_search(res, c)[1][:, 0]]
        cents.append(c)
    del res
    codes = np.empty((n, levels), dtype=np.int32)
    err = np.empty(n, dtype=np.float32)
    total, norm = 0.0, 0.0
    for a in range(0, n, batch):
        r = rows.block(a, a + batch)
        norm += float((r.astype(np.float64) ** 2).sum())
        for j, c in enumerate(cents):
            codes[a : a + batch, j] = _search(r, c)[1][:, 0]
            r -= c[codes[a : a + batch, j]]
        err[a : a + batch] = (r**2).sum(1)
        total += float(err[a : a + batch].astype(np.float64).sum())

    def level_dist(j: int, idx: np.ndarray, cur: np.ndarray) -> np.ndarray:
        xi = rows.take(idx)
        r = xi - sum((cents[l][cur[:, l]] for l in range(j)), np.zeros_like(xi))
        return _sq_dist(r, cents[j])

    extras = {f"centroids_{j}": c for j, c in enumerate(cents)}
    return Quantized(codes, [k] * levels, err, total / max(1e-12, norm), level_dist, extras)


def product_quantize(x: np.ndarray, levels: int, k: int, seed: int = 0, rotate: bool = False) -> Quantized:
    """PQ (and OPQ with `rotate`): split the (rotated) embedding into `levels` sub-spaces and run
    k-means in each; token j is the nearest centroid of sub-space j."""
    x = x0 = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    pad = (-d) % levels
    if pad:
        x = np.concatenate([x, np.zeros((n, pad), np.float32)], 1)
    d += pad
    extras: dict[str, np.ndarray] = {"embedding_dim": np.array(d - pad)}  # new items are padded the same way
    rot = np.eye(d, dtype=np.float32)
    if rotate:
        opq = faiss.OPQMatrix(d, levels)
        nbits = max(1, min(8, int(math.log2(max(2, n // 4)))))
        inner = faiss.ProductQuantizer(d, levels, nbits)
        inner.cp.min_points_per_centroid = 1
        opq.pq = inner
        opq.verbose = False
        opq.niter = 25  # faiss' default 50 doubles the time for a marginal gain
        opq.train(x)
        rot = faiss.vector_to_array(opq.A).reshape(d, d).astype(np.float32)
        extras["rotation"] = rot
    xr = x @ rot.T
    dsub = d // levels
    k_eff = min(k, n)
    codes, cents = [], []
    for m in range(levels):
        sub = np.ascontiguousarray(xr[:, m * dsub : (m + 1) * dsub])
        c = _kmeans(sub, k_eff, seed + m)
        codes.append(_search(sub, c)[1][:, 0].astype(np.int64))
        cents.append(c)
        extras[f"centroids_{m}"] = c
    recon_r = np.concatenate([cents[m][codes[m]] for m in range(levels)], 1)
    recon = (recon_r @ rot)[:, : d - pad]  # rot is orthonormal: inverse = transpose

    def level_dist(j: int, idx: np.ndarray, cur: np.ndarray) -> np.ndarray:
        return _sq_dist(xr[idx, j * dsub : (j + 1) * dsub], cents[j])

    return with_recon(x0, np.stack(codes, 1), [k] * levels, recon, level_dist, extras)
