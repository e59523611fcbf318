"""Serving tables in reduced precision: memory, ranking overlap with float32, and decoding speed.

    python -m bench.scale_serve [--run RUN] [--users 2000] [--items 1000000]

On a trained run (default: the Beauty AR-NTP run `bench.serve` serves, seed 0; trained when missing),
for each table precision (`sidrec.model.lowp`: float32, float16, bfloat16, int8): the bytes of the
item tables and scoring tables, the overlap of the top-10 with float32's for `--users` test users
(beam 20 and exact, seen items excluded as served), the largest score change, and the offline
decoding rate (beam 20, batches of 256, median of 3 passes). Then, for scale, an untrained model of
the default recipe over `--items` items (random bijective 3 x 256 codes, d 64), built, narrowed and
measured in a child process: table bytes per item and the child's resident memory after narrowing,
per precision. Results -> bench/results/scale-serve.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.common import RESULTS, ROOT, write_result

from sidrec.model.lowp import PRECISIONS


def on_run(run: Path, users: int) -> list[dict]:
    """Per precision: table bytes, top-10 overlap with float32 (beam 20, exact), rate."""
    from bench.serve import offline_ceiling, test_histories
    from sidrec.api import Recommender

    base = Recommender.load(run, device="cpu")
    hist = test_histories(base, users)
    idx = [base.item_index(h) for h in hist]
    want = {d: base.recommend_indices(idx, 10, decode=d, beam=20) for d in ("beam", "exact")}
    rows = []
    for p in PRECISIONS:
        rec = base if p == "float32" else Recommender.load(run, device="cpu", table_precision=p)
        row = {"precision": p, "table_bytes": rec.model.table_bytes(), "n_items": int(rec.model.n_items)}
        for d in ("beam", "exact"):
            got = rec.recommend_indices(idx, 10, decode=d, beam=20)
            a, b = np.asarray(want[d][0]), np.asarray(got[0])
            row[f"overlap@10_{d}"] = round(float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])), 4)
            row[f"same_top1_{d}"] = round(float(np.mean(a[:, 0] == b[:, 0])), 4)
            row[f"max_score_change_{d}"] = float(np.abs(np.asarray(want[d][1]) - np.asarray(got[1])).max())
        row["beam20_users_per_s"] = offline_ceiling(rec, hist, 10, "beam", 20)["users_per_s"]
        rows.append(row)
        print(row, flush=True)
    return rows


def child_scale(n: int, precision: str) -> None:
    """In a child: build an untrained default AR model over n items, narrow it, report memory."""
    import gc

    import torch

    from sidrec.model import ModelConfig, SeqRecModel
    from sidrec.tokenize.codebook import Codebook

    keys = np.sort(np.random.default_rng(0).choice(1 << 24, n, replace=False))
    codes = np.stack([keys >> 16, (keys >> 8) & 255, keys & 255], 1)
    t = time.perf_counter()
    with torch.no_grad():
        model = SeqRecModel(ModelConfig(head="ar"), n, Codebook(codes, [256, 256, 256]))
        model.eval()
        full = model.table_bytes()
        model.narrow_tables_(precision)
        narrow = model.table_bytes()
    gc.collect()
    status = Path("/proc/self/status").read_text()
    kib = {k: int(status.split(k + ":")[1].split()[0]) for k in ("RssAnon", "VmHWM")}
    print(json.dumps({"items": n, "precision": precision, "table_bytes": narrow, "float32_table_bytes": full,
                      "rss_anon_gib": round(kib["RssAnon"] / 2**20, 3), "peak_rss_gib": round(kib["VmHWM"] / 2**20, 3),
                      "seconds": round(time.perf_counter() - t, 1)}))


def scale_rows(n: int) -> list[dict]:
    rows = []
    for p in PRECISIONS:
        out = subprocess.run([sys.executable, "-m", "bench.scale_serve", "--child-scale", str(n), "--precision", p],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        rows[-1]["table_bytes_per_item"] = round(rows[-1]["table_bytes"] / n, 1)
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=1_000_000, help="catalogue of the scale rows (0: skip)")
    ap.add_argument("--name", default="scale-serve")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--child-scale", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    if "--child-scale" in sys.argv:
        a = ap.parse_args()
        return child_scale(a.child_scale, a.precision)
    a = common.parse_args(ap)
    from bench.serve import beauty_run

    run = a.run or beauty_run(0)  # the AR-NTP run bench.serve serves
    rows = on_run(run, a.users)
    scale = scale_rows(a.items) if a.items else []
    where = str(run.resolve())
    where = "bench/out/" + where.split("/bench/out/", 1)[1] if "/bench/out/" in where else where
    out = write_result(a.name, {"run": where,
                                "users": a.users, "rows": rows, "scale": scale},
                       Path(a.results_dir) if a.results_dir else RESULTS)
    from bench.tables import scale_serve_table

    out.with_suffix(".md").write_text(scale_serve_table(json.loads(out.read_text())))


if __name__ == "__main__":
    main()
