"""Out-of-core `data prepare` at scale: peak memory and time per row on a synthetic Parquet log.

    python -m bench.scale_data [--rows 100000000] [--memory-limit 4GB] [--work DIR]

Writes a synthetic log of `--rows` interactions as a directory of Parquet files (DuckDB, from hashes
of the row number, so the same rows every run: users = rows / 25, items = rows / 200 with a
power-law popularity, integer ids, integer timestamps), then runs the product's command in a child
process, `sidrec data prepare --format csv --engine duckdb --path LOG --out DATA`, and reports its
wall time, its peak resident memory (the child's ru_maxrss: DuckDB, Python and the part being
written), the engine's memory limit, and the per-row costs. The log and the data live in `--work`
(default: a temporary directory, removed at the end); results -> bench/results/scale-data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import RESULTS, write_result
from bench.tables import scale_data_table


def make_log(rows: int, out: Path, threads: int) -> dict:
    """The synthetic log as Parquet files of ~256 MB (deterministic: a function of the row number)."""
    import duckdb

    users, items = max(rows // 25, 10), max(rows // 200, 10)
    out.mkdir(parents=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}; SET preserve_insertion_order = false")
    t = time.perf_counter()
    con.execute(f"""COPY (SELECT hash(i) % {users} AS user_id,
            CAST(floor({items} * pow((hash(i + {rows}) % 4294967296) / 4294967296.0, 2.5)) AS BIGINT) AS item_id,
            hash(i + {2 * rows}) % 1000000000 AS timestamp FROM range({rows}) t(i))
        TO '{out}' (FORMAT parquet, FILE_SIZE_BYTES '256MB', PER_THREAD_OUTPUT true)""")
    con.close()
    size = sum(f.stat().st_size for f in out.rglob("*.parquet"))
    return {"rows": rows, "users_drawn": users, "items_drawn": items, "files": len(list(out.rglob("*.parquet"))),
            "bytes": size, "seconds": round(time.perf_counter() - t, 1)}


def run_prepare(log: Path, out: Path, memory_limit: str, shard_rows: int) -> dict:
    """The product's CLI in a child process: wall time and the child's peak RSS."""
    cmd = [sys.executable, "-m", "sidrec.cli", "data", "prepare", "--format", "csv", "--path", str(log), "--engine",
           "duckdb", "--out", str(out), "--memory-limit", memory_limit, "--shard-rows", str(shard_rows)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child: this one
    info = json.loads((out / "prepare.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    return {"command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1),
            "prepare_seconds": info["prepare_seconds"], "peak_rss_gib": round(peak_kib / 2**20, 3),
            "memory_limit": memory_limit, "parts": len(info["parts"]), "users": stats["users"],
            "items": stats["items"], "interactions": stats["interactions"],
            "output_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--memory-limit", default="4GB")
    ap.add_argument("--shard-rows", type=int, default=20_000_000)
    ap.add_argument("--work", default=None, help="directory for the log and the data (default: a temp dir)")
    ap.add_argument("--name", default="scale-data")
    ap.add_argument("--results-dir", default=None)
    a = common.parse_args(ap)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="sidrec-scale-data-"))
    try:
        log = make_log(a.rows, work / "log", os.cpu_count() or 1)
        print("log", log, flush=True)
        prep = run_prepare(work / "log", work / "data", a.memory_limit, a.shard_rows)
        print("prepare", prep, flush=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    row = {**prep, "log": log, "us_per_row": round(1e6 * prep["prepare_seconds"] / a.rows, 3),
           "bytes_per_row_peak_rss": round(prep["peak_rss_gib"] * 2**30 / a.rows, 2)}
    out = write_result(a.name, {"rows": [row]}, Path(a.results_dir) if a.results_dir else RESULTS)
    (out.with_suffix(".md")).write_text(scale_data_table(json.loads(out.read_text())))


if __name__ == "__main__":
    main()
