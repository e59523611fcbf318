"""Users per second of batched in-process decoding (beam 20 and exact, k 10, batch 256) on a trained
run, over 2,048 random test histories, after a warm-up; `--profile` adds a cProfile of the beam
calls. An A/B tool: run it on two commits' src (PYTHONPATH) against the same run, back to back;
`--answers FILE` saves the top-10 of 1,024 users (beam and exact, seen items kept and excluded) from
one commit, and on the other compares with them (same items, scores within 1e-5).

    PYTHONPATH=src python -m bench.experiments.decode_speed RUN [--threads 1] [--profile] [--answers F]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    from sidrec.api import Recommender

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--answers", default=None, help="save top-10 answers here, or compare with them if present")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rec = Recommender.load(a.run, device="cpu")
    data = rec.data
    users = np.random.default_rng(0).choice(data.n_users, min(2048, data.n_users), replace=False)
    ends = data.history_end("test")
    idx = [data.items[data.offsets[u]:ends[u]].astype(np.int64) for u in users]
    batch = 256

    def rate(decode: str) -> float:
        rec.recommend_indices(idx[:batch], 10, decode=decode, beam=20)  # warm-up: node tables, caches
        t = time.perf_counter()
        for i in range(0, len(idx), batch):
            rec.recommend_indices(idx[i:i + batch], 10, decode=decode, beam=20)
        return len(idx) / (time.perf_counter() - t)

    print(f"beam users/s {rate('beam'):.0f} exact users/s {rate('exact'):.0f}")
    if a.answers:
        answers(rec, idx[:1024], a.answers)
    if a.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for i in range(0, len(idx), batch):
            rec.recommend_indices(idx[i:i + batch], 10, decode="beam", beam=20)
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(30)


def answers(rec, idx: list, path: str) -> None:
    """Save the answers (first run) or compare with the saved ones (second run)."""
    import os

    got = {}
    for decode in ("beam", "exact"):
        for seen in (True, False):
            i, s = rec.recommend_indices(idx, 10, decode=decode, beam=20, exclude_seen=seen)
            got[f"{decode}-{seen}-items"], got[f"{decode}-{seen}-scores"] = i, s
    if not os.path.exists(path):
        np.savez(path, **got)
        print(f"saved answers to {path}")
        return
    ref = np.load(path)
    for key in sorted(k for k in got if k.endswith("items")):
        same = (ref[key] == got[key]).all(1).mean()
        sk = key.replace("items", "scores")
        diff = np.nanmax(np.abs(np.where(np.isfinite(ref[sk]), ref[sk] - got[sk], 0)))
        print(f"{key[:-6]}: identical top-10 lists {same:.4f}, max score difference {diff:.2g}")


if __name__ == "__main__":
    main()
