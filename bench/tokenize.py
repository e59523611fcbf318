"""Tokenizer benchmark: 10^6 x 384 -> RQ-KMeans 3x256 and OPQ 4x256; Beauty from item text.

    python -m bench.tokenize [--items 1000000] [--skip-beauty]

Writes bench/results/tokenize.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench import common
from bench.common import SHARED, write_result
from sidrec.tokenize import fit_codebook


def clustered_embeddings(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Hierarchically clustered unit vectors (like text embeddings: structure at several scales,
    with item-level variation comparable to the cluster spread, so no single scale dominates)."""
    rng = np.random.default_rng(seed)
    top = rng.normal(size=(1024, d)).astype(np.float32)
    sub = top[rng.integers(0, 1024, 65536)] + 0.8 * rng.normal(size=(65536, d)).astype(np.float32)
    x = sub[rng.integers(0, 65536, n)]
    x += 1.0 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run_fit(x, method, levels, size) -> dict:
    t = time.perf_counter()
    cb = fit_codebook(x, method, levels, size)
    secs = time.perf_counter() - t
    info = cb.to_json()
    return {"method": method, "levels": levels, "codebook_size": size, "n_items": len(x), "seconds": round(secs, 2),
            "bijective": info["bijective"], "collision_rate_before": info["collision_rate_before"],
            "reconstruction_error": info["reconstruction_error"], "utilization": info["utilization"],
            "max_items_per_prefix": info["max_items_per_prefix"]}


def beauty(results: list) -> None:
    from sidrec.data import prepare, read
    from sidrec.embed import get_embeddings

    root = SHARED / "amazon-beauty"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(read("seq", root / "s3rec/Beauty.txt", root / "derived/items.jsonl"))
        data.save(f"{tmp}/beauty")
        from sidrec.data import SequenceData

        data = SequenceData.load(f"{tmp}/beauty")
        t = time.perf_counter()
        x = get_embeddings(data, "text")
        embed_s = time.perf_counter() - t
        for method, levels in (("rq-kmeans", 3), ("rq-kmeans-balanced", 3), ("opq", 4), ("rq-vae", 3)):
            t = time.perf_counter()
            x_cached = get_embeddings(data, "text")  # from the cache: part of "end to end"
            r = run_fit(x_cached, method, levels, 256)
            r["seconds_end_to_end_cached"] = round(time.perf_counter() - t, 2)
            r["dataset"] = "beauty-text"
            r["text_embedding_seconds_uncached"] = round(embed_s, 1)
            results.append(r)
            print(r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--skip-beauty", action="store_true")
    ap.add_argument("--out-dir", default=None)
    a = common.parse_args(ap, out_attr="out_dir")
    results = []
    x = clustered_embeddings(a.items, a.dim)
    for method, levels in (("rq-kmeans", 3), ("opq", 4)):
        r = run_fit(x, method, levels, 256)
        r["dataset"] = f"synthetic-{a.items}x{a.dim}"
        results.append(r)
        print(r)
    if not a.skip_beauty:
        beauty(results)
    from pathlib import Path

    write_result("tokenize", {"results": results}, Path(a.out_dir) if a.out_dir else None)


if __name__ == "__main__":
    main()
