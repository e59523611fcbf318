"""Where a served request's CPU goes: one `sidrec serve` under wrk load at one concurrency, with the
CPU seconds of each process of the server (the HTTP process and, since 20b0cf3, its decode process)
per request and as cores busy. An A/B tool: run it with two commits' src on PYTHONPATH against the
same run, back to back (the server is started with the src on PYTHONPATH).

    PYTHONPATH=src python -m bench.experiments.serve_profile RUN [--concurrency 64] [--seconds 10] [-- ARGS]

ARGS go to `sidrec serve` (e.g. --beam 20). Needs wrk (Debian's package).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench.serve import cpu_ticks, test_histories, wrk_load


def process_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of a process and of each of its children, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    kids = [int(c) for t in os.listdir(f"/proc/{pid}/task") for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    out = {}
    for p in [pid, *kids]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        out[p] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    from sidrec.api import Recommender
    from sidrec.serve.process import ServerProcess

    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = ap.parse_args(argv[:cut])
    a.args = argv[cut + 1:]  # for sidrec serve
    hist = test_histories(Recommender.load(a.run, device="cpu"), 2000)
    with tempfile.TemporaryDirectory() as tmp:
        bodies = Path(tmp) / "bodies.jsonl"
        bodies.write_text("".join(json.dumps({"history": h, "k": 10}) + "\n" for h in hist))
        server = ServerProcess(a.run, *a.args)
        try:
            wrk_load(server.url, bodies, a.concurrency, 3.0)  # warm-up
            cpu0, ticks0 = process_cpu(server.proc.pid), cpu_ticks()
            r = wrk_load(server.url, bodies, a.concurrency, a.seconds)
            cpu1, ticks1 = process_cpu(server.proc.pid), cpu_ticks()
        finally:
            server.stop()
    n, wall = r["requests"], r["wall"]
    per = {("server" if p == server.proc.pid else f"child {p}"): cpu1[p] - cpu0.get(p, 0.0) for p in cpu1}
    print(json.dumps({"concurrency": a.concurrency, "requests_per_s": round(n / wall, 1), "p50_ms": r["p50_ms"],
                      "p99_ms": r["p99_ms"],
                      "cpu_ms_per_request": {k: round(1000 * v / n, 3) for k, v in per.items() if v > 0},
                      "cores_busy": {k: round(v / wall, 2) for k, v in per.items() if v > 0},
                      "client_cpu_ms_per_request": round(1000 * r["client_cpu"] / n, 3),
                      "cpu_steal_share": round((ticks1[0] - ticks0[0]) / max(ticks1[1] - ticks0[1], 1), 3)}))


if __name__ == "__main__":
    main()
