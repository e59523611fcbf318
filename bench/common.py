"""Shared helpers for benchmarks: hardware/commit info, JSON output, timing."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from sidrec import io

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ARCHIVE = RESULTS / "archive"  # ablations, sweeps, comparisons: the evidence for docs/experiments.md
SHARED = Path(os.environ.get("SIDREC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def environment() -> dict:
    """The commit (with +uncommitted when the code differed from it) and the machine that ran."""
    from sidrec.run import environment as env

    return env()


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out = (out_dir or RESULTS) / f"{name}.json"
    io.write_json(out, {"env": environment(), **payload})
    print(f"wrote {out}")
    return out
