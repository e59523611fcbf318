"""Serving load benchmark: a real `sidrec serve` process on 127.0.0.1, a real HTTP client.

    python -m bench.serve                      # Beauty AR-NTP (beam 20) and FV-MLE (exact), k = 10
    python -m bench.serve --run RUN [--run RUN2] --requests 2000

For each run and each batching mode (micro-batching on: up to --max-batch users per call; off: one
request per call) a fresh server is started; then, at each concurrency, a warm-up followed by a
bounded load (at most --requests requests or --seconds seconds) from `concurrency` keep-alive
connections of one aiohttp client, each sending its next request when the last one is answered
(closed loop). Histories are real test histories (seen items excluded), so every answer is checked
(k items, none of the history, all in the catalogue). Reported: throughput, p50/p95/p99 latency
as the client saw it, non-200 answers, invalid ids, mean rows per batched call (from /metrics),
and the offline ceiling: `Recommender.recommend_indices` over the same histories in batches of
256 in this process. The Beauty runs are the seed-0 defaults of `bench.quality` (trained when missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.common import RESULTS, ROOT, write_result
from bench.tables import serve_table
from sidrec import io
from sidrec.run import RunDir
from sidrec.serve.process import ServerProcess

BEAUTY_RUNS = ROOT / "bench" / "out" / "quality-beauty" / "defaults" / "seed0"


def beauty_runs() -> list[Path]:
    """AR-NTP (RQ-KMeans 3x256) and FV-MLE on Beauty with the library defaults, seed 0."""
    want = [BEAUTY_RUNS / "ar-rq-kmeans", BEAUTY_RUNS / "fv"]
    if not all(RunDir(p).has_weights() for p in want):
        print("training the Beauty runs (python -m bench.quality --dataset beauty --tokenizers rq-kmeans "
              "--heads ar,fv --tag defaults --only-seed 0)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "bench.quality", "--dataset", "beauty", "--tokenizers", "rq-kmeans",
                        "--heads", "ar,fv", "--tag", "defaults", "--only-seed", "0"], cwd=ROOT, check=True)
    return want


def test_histories(rec, n: int, seed: int = 0) -> list[list[str]]:
    """Raw-id test histories (everything but each user's last item) of n random users."""
    data = rec.data
    users = np.random.default_rng(seed).choice(data.n_users, min(n, data.n_users), replace=False)
    raw = rec.raw_ids
    ends = data.history_end("test")
    return [raw[data.items[data.offsets[u]:ends[u]]].tolist() for u in users]


def offline_ceiling(rec, histories: list[list[str]], k: int, decode: str, beam: int, batch: int = 256) -> dict:
    """Users per second of batched decoding in-process (no HTTP): the ceiling a server approaches."""
    idx = [rec.item_index(h) for h in histories]
    rec.recommend_indices(idx[:batch], k, decode=decode, beam=beam)  # warm-up
    t = time.perf_counter()
    for i in range(0, len(idx), batch):
        rec.recommend_indices(idx[i:i + batch], k, decode=decode, beam=beam)
    secs = time.perf_counter() - t
    return {"users": len(idx), "batch": batch, "seconds": round(secs, 3), "users_per_s": round(len(idx) / secs, 1)}


async def _load(url: str, bodies: list[bytes], concurrency: int, max_requests: int, seconds: float,
                check) -> dict:
    """Closed-loop load: `concurrency` workers on keep-alive connections until the request or time budget
    is spent. Returns latencies (s), status counts and the wall time."""
    import aiohttp

    lat: list[float] = []
    status: dict[int, int] = {}
    bad = [0]
    sent = [0]
    deadline = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        async def worker():
            while sent[0] < max_requests and time.perf_counter() < deadline:
                i = sent[0]
                sent[0] += 1
                t = time.perf_counter()
                async with s.post(url, data=bodies[i % len(bodies)],
                                  headers={"content-type": "application/json"}) as r:
                    body = await r.read()
                lat.append(time.perf_counter() - t)
                status[r.status] = status.get(r.status, 0) + 1
                if r.status == 200 and not check(i % len(bodies), json.loads(body)):
                    bad[0] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"lat": lat, "status": status, "bad": bad[0], "wall": wall}


def batch_rows(url: str) -> tuple[float, float]:
    """(rows decoded, batched calls) so far, from the server's Prometheus metrics."""
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    s = re.search(r"^sidrec_batch_rows_sum ([\d.e+]+)$", text, re.M)
    c = re.search(r"^sidrec_batch_rows_count ([\d.e+]+)$", text, re.M)
    return float(s.group(1)), float(c.group(1))


def measure(run: Path, histories: list[list[str]], catalogue: set[str], *, k: int, decode: str, beam: int,
            batching: str, max_batch: int, concurrencies: list[int], requests: int, seconds: float,
            threads: int | None) -> list[dict]:
    bodies = [json.dumps({"history": h, "k": k}).encode() for h in histories]
    seen = [set(h) for h in histories]

    def check(i: int, ans: dict) -> bool:
        items = ans["items"]
        return len(items) == k and all(x in catalogue and x not in seen[i] for x in items)

    args = ["--decode", decode, "--beam", str(beam), "--max-batch", str(max_batch if batching == "on" else 1)]
    if threads:
        args += ["--threads", str(threads)]
    server = ServerProcess(run, *args)
    rows = []
    try:
        for c in concurrencies:
            asyncio.run(_load(server.url + "/recommend", bodies, c, min(200, requests), seconds, check))  # warm-up
            rows0, calls0 = batch_rows(server.url)
            r = asyncio.run(_load(server.url + "/recommend", bodies, c, requests, seconds, check))
            rows1, calls1 = batch_rows(server.url)
            lat = np.array(r["lat"]) * 1000
            ok = r["status"].get(200, 0)
            rows.append({"run": run.name, "decode": decode, "beam": beam if decode == "beam" else None, "k": k,
                         "batching": batching, "max_batch": max_batch if batching == "on" else 1, "concurrency": c,
                         "requests": len(lat), "ok": ok, "non_200": len(lat) - ok, "invalid_answers": r["bad"],
                         "requests_per_s": round(len(lat) / r["wall"], 1),
                         "p50_ms": round(float(np.percentile(lat, 50)), 2),
                         "p95_ms": round(float(np.percentile(lat, 95)), 2),
                         "p99_ms": round(float(np.percentile(lat, 99)), 2),
                         "rows_per_call": round((rows1 - rows0) / max(calls1 - calls0, 1), 2)})
            print(json.dumps({k_: v for k_, v in rows[-1].items() if not k_.startswith("_")}), file=sys.stderr)
    finally:
        code = server.stop()
    for r in rows:
        r["server_exit_code"] = code
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", default=None, help="run directory (repeatable; default: Beauty AR + FV)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--requests", type=int, default=4000, help="requests per measurement (upper bound)")
    ap.add_argument("--seconds", type=float, default=20.0, help="time per measurement (upper bound)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--users", type=int, default=2000, help="distinct test histories sent")
    ap.add_argument("--name", default="serve", help="results file bench/results/NAME.json")
    ap.add_argument("--results-dir", default=str(RESULTS))
    a = common.parse_args(ap)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sidrec.api import Recommender

    runs = [Path(r) for r in a.run] if a.run else beauty_runs()
    conc = [int(c) for c in a.concurrency.split(",")]
    res: dict = {"command": "python -m bench.serve " + " ".join(sys.argv[1:]), "k": a.k, "load": [], "offline": {},
                 "settings": {"requests": a.requests, "seconds": a.seconds, "users": a.users, "max_batch": a.max_batch,
                              "threads": a.threads, "client": "aiohttp, one process, keep-alive, closed loop"}}
    for run in runs:
        rec = Recommender.load(run, device="cpu")
        decode = "beam" if rec.model.supports_beam else "exact"
        hist = test_histories(rec, a.users)
        res["offline"][run.name] = {"decode": decode, **offline_ceiling(rec, hist, a.k, decode, a.beam)}
        catalogue = set(rec.raw_ids.tolist())
        del rec
        for batching in ("on", "off"):
            res["load"] += measure(run, hist, catalogue, k=a.k, decode=decode, beam=a.beam, batching=batching,
                                   max_batch=a.max_batch, concurrencies=conc, requests=a.requests, seconds=a.seconds,
                                   threads=a.threads)
    top = max(conc)
    res["speedup_batching"] = {}
    for run in runs:
        on = [r for r in res["load"] if r["run"] == run.name and r["batching"] == "on" and r["concurrency"] == top]
        off = [r for r in res["load"] if r["run"] == run.name and r["batching"] == "off" and r["concurrency"] == top]
        if on and off:
            res["speedup_batching"][run.name] = round(on[0]["requests_per_s"] / off[0]["requests_per_s"], 2)
    path = write_result(a.name, res, Path(a.results_dir))
    io.write_text(path.with_suffix(".md"), serve_table(io.read_json(path)))


if __name__ == "__main__":
    main()
