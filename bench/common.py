"""Shared helpers for benchmarks: provenance (commit stamps at start and end), JSON output, timing.

Every benchmark parses its arguments with `parse_args`, which takes the start stamp (the commit and
a hash of any uncommitted change, `sidrec.provenance`) before any work is done, and refuses to
write into bench/results/ from a dirty tree unless `--allow-dirty` (then every table rendered from
the file says "uncommitted", from the stamp itself). `write_result` adds the end stamp.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from sidrec import io
from sidrec.provenance import code_state, environment, span  # noqa: F401 (environment: used by bench modules)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ARCHIVE = RESULTS / "archive"  # ablations, sweeps, comparisons: the evidence for docs/experiments.md
SHARED = Path(os.environ.get("SIDREC_SHARED_DATA", ROOT.parent / "shared" / "data"))

_START: dict | None = None  # this process's start stamp (parse_args)


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None = None, out_attr: str = "results_dir",
               default_out: Path = RESULTS) -> argparse.Namespace:
    """Parse, then stamp the start. Exit 2 when the results would go into bench/results/ from a tree
    whose code differs from its commit, unless --allow-dirty."""
    global _START
    ap.add_argument("--allow-dirty", action="store_true", help="write into bench/results/ although the code "
                    "has uncommitted changes (the results are then labelled uncommitted)")
    a = ap.parse_args(argv)
    _START = code_state()
    out = Path(getattr(a, out_attr, None) or default_out).resolve()
    if _START and _START["dirty"] and out.is_relative_to(RESULTS.resolve()) and not a.allow_dirty:
        print(f"{ap.prog}: error: the code has uncommitted changes (diff {_START['diff']}); commit first, or pass "
              f"--allow-dirty, or write elsewhere (--{out_attr.replace('_', '-')})", file=sys.stderr)
        raise SystemExit(2)
    return a


def start_stamp() -> dict | None:
    """The stamp taken when this benchmark started (or now, for a benchmark called as a library)."""
    return _START if _START is not None else code_state()


def provenance() -> dict:
    """Start and end stamps of this process's work, and whether the code changed in between."""
    return span(start_stamp(), code_state())


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
    io.write_json(out, {"env": environment(), "provenance": provenance(), **payload})
    print(f"wrote {out}")
    return out
