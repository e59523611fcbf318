"""Semantic-ID tokenizers (cascaded and parallel) with a guaranteed bijection.

`fit_codebook(embeddings, method, levels, codebook_size)` fits a quantizer, resolves collisions
and returns a `Codebook` that is bijective by construction (checked on build).
"""

from __future__ import annotations

import time

import numpy as np

from sidrec.errors import UserError
from sidrec.tokenize.codebook import Codebook, Trie, codebook_diagnostics, mixed_radix
from sidrec.tokenize.quantizers import Quantized, product_quantize, rq_kmeans
from sidrec.tokenize.resolve import collision_stats, resolve
from sidrec.tokenize.rqvae import RQVAEConfig, rq_vae

METHODS = ("rq-kmeans", "rq-kmeans-balanced", "rq-vae", "pq", "opq")
CASCADED = ("rq-kmeans", "rq-kmeans-balanced", "rq-vae")
PARALLEL = ("pq", "opq")


def quantize(x: np.ndarray, method: str, levels: int, codebook_size: int, seed: int = 0,
             rqvae: RQVAEConfig | None = None) -> Quantized:
    if method == "rq-kmeans":
        return rq_kmeans(x, levels, codebook_size, seed)
    if method == "rq-kmeans-balanced":
        return rq_kmeans(x, levels, codebook_size, seed, balanced=True)
    if method == "rq-vae":
        return rq_vae(x, levels, codebook_size, seed, rqvae)
    if method in PARALLEL:
        return product_quantize(x, levels, codebook_size, seed, rotate=method == "opq")
    raise UserError(f"unknown tokenizer {method!r}; choose one of {', '.join(METHODS)}")


def fit_codebook(
    x: np.ndarray, method: str = "rq-kmeans", levels: int = 3, codebook_size: int = 256, *,
    resolve_strategy: str = "reassign", seed: int = 0, rqvae: RQVAEConfig | None = None,
    embeddings: str = "",
) -> Codebook:
    """Fit a tokenizer on item embeddings `x` [N, d] and return a bijective Codebook.

    With resolve_strategy="none" the result may have collisions (allowed, for counter-examples).
    """
    if x.ndim != 2 or len(x) < 2:
        raise UserError(f"need an [N >= 2, d] embedding matrix, got shape {list(x.shape)}")
    if levels < 1 or codebook_size < 2:
        raise UserError("need --levels >= 1 and --codebook-size >= 2")
    t0 = time.perf_counter()
    if not (isinstance(x, np.memmap) and x.dtype == np.float32 and x.flags.c_contiguous):
        x = np.ascontiguousarray(x, dtype=np.float32)  # a float32 memory map stays one: RQ-KMeans streams it
    q = quantize(x, method, levels, codebook_size, seed, rqvae)
    codes, sizes, stats = resolve(q, x, resolve_strategy)
    rel_err = q.rel_err
    meta = {
        "method": method, "embeddings": embeddings, "seed": seed, "resolve": resolve_strategy,
        "levels_requested": levels, "codebook_size": codebook_size,
        "reconstruction_error": round(rel_err, 6), "fit_seconds": round(time.perf_counter() - t0, 3), **stats,
    }
    return Codebook(codes, sizes, allow_collisions=resolve_strategy == "none", meta=meta, extras=q.extras)


__all__ = [
    "Codebook", "Trie", "fit_codebook", "quantize", "METHODS", "CASCADED", "PARALLEL", "mixed_radix",
    "collision_stats", "codebook_diagnostics", "RQVAEConfig",
]
