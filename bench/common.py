"""Shared helpers for benchmarks: hardware/commit info, JSON output, timing."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from sidrec import io

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = Path(os.environ.get("SIDREC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def environment() -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "bench",
                                "configs", ":!bench/results"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        commit += "+uncommitted" if commit and dirty else ""  # the code that ran is not exactly that commit
    except OSError:
        commit = ""
    return {
        "commit": commit, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


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
