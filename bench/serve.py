"""Serving load benchmark: a real `sidrec serve` process on 127.0.0.1, a compiled HTTP load client.

    python -m bench.serve          # Beauty: AR-NTP (beam 20), the joint model (beam 50 + FV rescoring), FV-MLE (exact)
    python -m bench.serve --run RUN [--run RUN2] --beam 20 --requests 2000

For each run and each batching mode (micro-batching on: up to --max-batch users per call; off: one
request per call) a fresh server is started; then, at each concurrency, a warm-up followed by a
bounded load (--seconds) from `concurrency` keep-alive connections, each sending its next request
when the last one is answered (closed loop). The client is `wrk` (C; Debian's package `wrk`), one
thread, so the figures are the server's: its CPU per request is reported beside the server's
(server = the HTTP process plus its decode worker, read from /proc). Without wrk, one aiohttp
process is the client (slower; its CPU is reported the same way). Histories are real test
histories (seen items excluded). Reported: throughput, p50/p95/p99 latency as the client saw it,
non-200 answers, mean rows per batched call (from /metrics), CPU seconds per request of server and
client; then a check that served answers equal `Recommender.recommend_indices` for --check users,
and the offline ceiling: `recommend_indices` over the same histories in batches of 256 in this
process. The Beauty runs are the seed-0 headline runs of `bench.quality` (trained when missing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench import common
from bench.common import RESULTS, ROOT, write_result
from bench.tables import serve_table
from sidrec import io
from sidrec.run import RunDir
from sidrec.serve.process import ServerProcess

BEAUTY = ROOT / "bench" / "out" / "quality-beauty"
QUALITY = [sys.executable, "-m", "bench.quality", "--dataset", "beauty", "--tokenizers", "rq-kmeans", "--only-seed", "0"]
BEAUTY_RUNS = [  # (run, beam, the bench.quality command that trains it)
    (BEAUTY / "seed0" / "ar-rq-kmeans", 20, [*QUALITY, "--heads", "ar"]),
    (BEAUTY / "joint-nt" / "seed0" / "joint-rq-kmeans", 50,
     [*QUALITY, "--heads", "joint", "--tag", "joint-nt", "--name", "joint", "--set", "model.node_table=true",
      "train.sparse=true"]),
    (BEAUTY / "fv-target" / "seed0" / "fv", 20, [*QUALITY, "--heads", "fv", "--tag", "fv-target", "--name", "fv"]),
]
LUA = Path(__file__).with_name("serve_load.lua")


def beauty_run(i: int) -> Path:
    """The i-th Beauty headline run (seed 0), trained when missing."""
    run, _, cmd = BEAUTY_RUNS[i]
    if not RunDir(run).has_weights():
        print("training " + " ".join(cmd[1:]), file=sys.stderr)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return run


def beauty_runs() -> list[tuple[Path, int]]:
    """The Beauty headline runs (seed 0) and the beam each is served at; trained when missing."""
    return [(beauty_run(i), beam) for i, (_, beam, _) in enumerate(BEAUTY_RUNS)]


def test_histories(rec, n: int, seed: int = 0) -> list[list[str]]:
    """Raw-id test histories (everything but each user's last item) of n random users."""
    data = rec.data
    users = np.random.default_rng(seed).choice(data.n_users, min(n, data.n_users), replace=False)
    raw = rec.raw_ids
    ends = data.history_end("test")
    return [raw[data.items[data.offsets[u]:ends[u]]].tolist() for u in users]


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) CPU ticks of the machine so far, from /proc/stat: on a virtual machine the
    hypervisor can take cores away (steal); a row measured under steal is slower than the code."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[7], sum(fields[:8])


def offline_ceiling(rec, histories: list[list[str]], k: int, decode: str, beam: int, batch: int = 256,
                    repeats: int = 3) -> dict:
    """Users per second of batched decoding in-process (no HTTP), the median of `repeats` passes:
    the ceiling a server approaches."""
    import torch

    idx = [rec.item_index(h) for h in histories]
    rec.recommend_indices(idx[:batch], k, decode=decode, beam=beam)  # warm-up
    secs, ticks0 = [], cpu_ticks()
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(idx), batch):
            rec.recommend_indices(idx[i:i + batch], k, decode=decode, beam=beam)
        secs.append(time.perf_counter() - t)
    ticks1 = cpu_ticks()
    med = float(np.median(secs))
    return {"users": len(idx), "batch": batch, "torch_threads": torch.get_num_threads(), "seconds": round(med, 3),
            "users_per_s": round(len(idx) / med, 1),
            "cpu_steal_share": round((ticks1[0] - ticks0[0]) / max(ticks1[1] - ticks0[1], 1), 3)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (the server and its decode worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in [pid] + [int(c) for t in os.listdir(f"/proc/{pid}/task")
                      for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def wrk_load(url: str, bodies: Path, concurrency: int, seconds: float) -> dict:
    """Closed-loop load from wrk (one thread, `concurrency` connections): counts, latency
    percentiles (ms) and the client's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                        "-s", str(LUA), url], env={**os.environ, "SIDREC_BODIES": str(bodies)},
                       capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = json.loads(p.stderr.strip().splitlines()[-1])
    return {"requests": r["requests"], "wall": r["duration_us"] / 1e6, "non_200": r["non_2xx"],
            "errors": r["socket_errors"] + r["timeouts"],
            **{f"p{q}_ms": round(r[f"p{q}_us"] / 1000, 2) for q in (50, 95, 99)},
            "client_cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}


def aiohttp_load(url: str, bodies: Path, concurrency: int, seconds: float) -> dict:
    """The same closed loop from aiohttp in this process (when wrk is not installed)."""
    import aiohttp

    data = bodies.read_bytes().splitlines()
    lat: list[float] = []
    status: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    async def run() -> float:
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
            async def worker(w: int):
                i = w
                while time.perf_counter() < deadline:
                    t = time.perf_counter()
                    async with s.post(url + "/recommend", data=data[i % len(data)],
                                      headers={"content-type": "application/json"}) as r:
                        await r.read()
                    lat.append(time.perf_counter() - t)
                    status[r.status] = status.get(r.status, 0) + 1
                    i += concurrency

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
            return time.perf_counter() - t0

    cpu = time.process_time()
    wall = asyncio.run(run())
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "wall": wall, "non_200": len(lat) - status.get(200, 0), "errors": 0,
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)},
            "client_cpu": time.process_time() - cpu}


def batch_rows(url: str) -> tuple[float, float]:
    """(rows decoded, batched calls) so far, from the server's Prometheus metrics."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    s = re.search(r"^sidrec_batch_rows_sum ([\d.e+]+)$", text, re.M)
    c = re.search(r"^sidrec_batch_rows_count ([\d.e+]+)$", text, re.M)
    return float(s.group(1)), float(c.group(1))


def served_equal(url: str, histories: list[list[str]], want: np.ndarray, raw: np.ndarray, k: int) -> float:
    """Share of users whose served top-k (one request each) equals `recommend_indices`' answer."""
    same = 0
    for h, w in zip(histories, want):
        req = urllib.request.Request(url + "/recommend", data=json.dumps({"history": h, "k": k}).encode(),
                                     headers={"content-type": "application/json"})
        got = json.loads(urllib.request.urlopen(req, timeout=30).read())["items"]
        same += got == raw[w[w >= 0]].tolist()
    return same / len(histories)


def measure(run: Path, bodies: Path, *, decode: str, beam: int, batching: str, max_batch: int, concurrencies: list[int],
            seconds: float, threads: int | None, workers: int, client: str, check: tuple | None) -> tuple[list[dict], float | None]:
    """One server, every concurrency: a row per concurrency, and (with `check`) the share of
    answers equal to the library's."""
    load = wrk_load if client == "wrk" else aiohttp_load
    args = ["--decode", decode, "--beam", str(beam), "--max-batch", str(max_batch if batching == "on" else 1)]
    if threads:
        args += ["--threads", str(threads)]
    server = ServerProcess(run, *args, "--workers", str(workers))
    rows, equal = [], None
    try:
        if check is not None:
            equal = served_equal(server.url, *check)
        for c in concurrencies:
            load(server.url, bodies, c, min(3.0, seconds))  # warm-up
            rows0, calls0 = batch_rows(server.url)
            cpu0, ticks0 = cpu_seconds(server.proc.pid), cpu_ticks()
            r = load(server.url, bodies, c, seconds)
            cpu1, ticks1 = cpu_seconds(server.proc.pid), cpu_ticks()
            rows1, calls1 = batch_rows(server.url)
            n = r["requests"]
            rows.append({"run": run.name, "decode": decode, "beam": beam if decode == "beam" else None,
                         "batching": batching, "max_batch": max_batch if batching == "on" else 1, "workers": workers,
                         "concurrency": c,
                         "requests": n, "non_200": r["non_200"], "socket_errors": r["errors"],
                         "requests_per_s": round((n - r["non_200"]) / r["wall"], 1),  # answered ones only
                         **{q: r[q] for q in ("p50_ms", "p95_ms", "p99_ms")},
                         "rows_per_call": round((rows1 - rows0) / max(calls1 - calls0, 1), 2),
                         "server_cpu_ms_per_request": round(1000 * (cpu1 - cpu0) / max(n, 1), 3),
                         "client_cpu_ms_per_request": round(1000 * r["client_cpu"] / max(n, 1), 3),
                         "cpu_steal_share": round((ticks1[0] - ticks0[0]) / max(ticks1[1] - ticks0[1], 1), 3)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        code = server.stop()
    for r in rows:
        r["server_exit_code"] = code
    return rows, equal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", default=None,
                    help="run directory (repeatable; default: the Beauty AR-NTP, joint and FV-MLE headline runs)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--beam", type=int, default=20, help="beam width for --run runs (the Beauty runs: their own)")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--seconds", type=float, default=10.0, help="load time per measurement")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="server torch threads (per decode process)")
    ap.add_argument("--workers", type=int, default=1, help="server decode processes")
    ap.add_argument("--users", type=int, default=2000, help="distinct test histories sent")
    ap.add_argument("--check", type=int, default=200, help="users whose served answer is compared with the library's")
    ap.add_argument("--client", choices=["auto", "wrk", "aiohttp"], default="auto")
    ap.add_argument("--name", default="serve", help="results file bench/results/NAME.json")
    ap.add_argument("--results-dir", default=str(RESULTS))
    a = common.parse_args(ap)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sidrec.api import Recommender

    client = ("wrk" if shutil.which("wrk") else "aiohttp") if a.client == "auto" else a.client
    runs = [(Path(r), a.beam) for r in a.run] if a.run else beauty_runs()
    conc = [int(c) for c in a.concurrency.split(",")]
    res: dict = {"command": "python -m bench.serve " + " ".join(sys.argv[1:]), "k": a.k, "load": [], "offline": {},
                 "answers_equal_library": {},
                 "settings": {"seconds": a.seconds, "users": a.users, "max_batch": a.max_batch, "threads": a.threads,
                              "workers": a.workers,
                              "client": "wrk 4.x, one thread, keep-alive, closed loop" if client == "wrk" else
                              "aiohttp, one process, keep-alive, closed loop (wrk not installed)"}}
    for run, beam in runs:
        rec = Recommender.load(run, device="cpu")
        decode = "beam" if rec.model.supports_beam else "exact"
        hist = test_histories(rec, a.users)
        res["offline"][run.name] = {"decode": decode, "beam": beam if decode == "beam" else None,
                                    **offline_ceiling(rec, hist, a.k, decode, beam)}
        want, _ = rec.recommend_indices([rec.item_index(h) for h in hist[:a.check]], a.k, decode=decode, beam=beam)
        check = (hist[:a.check], want, rec.raw_ids, a.k)
        del rec
        with tempfile.TemporaryDirectory() as tmp:
            bodies = Path(tmp) / "bodies.jsonl"
            bodies.write_text("".join(json.dumps({"history": h, "k": a.k}) + "\n" for h in hist))
            for batching in ("on", "off"):
                rows, equal = measure(run, bodies, decode=decode, beam=beam, batching=batching, max_batch=a.max_batch,
                                      concurrencies=conc, seconds=a.seconds, threads=a.threads, workers=a.workers,
                                      client=client,
                                      check=check if batching == "on" else None)
                res["load"] += rows
                if equal is not None:
                    res["answers_equal_library"][run.name] = equal
    top = max(conc)
    res["speedup_batching"] = {}
    for run, _ in runs:
        on = [r for r in res["load"] if r["run"] == run.name and r["batching"] == "on" and r["concurrency"] == top]
        off = [r for r in res["load"] if r["run"] == run.name and r["batching"] == "off" and r["concurrency"] == top]
        if on and off:
            res["speedup_batching"][run.name] = round(on[0]["requests_per_s"] / off[0]["requests_per_s"], 2)
    path = write_result(a.name, res, Path(a.results_dir))
    io.write_text(path.with_suffix(".md"), serve_table(io.read_json(path)))


if __name__ == "__main__":
    main()
