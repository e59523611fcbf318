"""Out-of-core data preparation and tokenization at scale: peak memory and time per row.

    python -m bench.scale_data [--rows 100000000] [--memory-limit 4GB] [--items 100000000] [--work DIR]

Writes a synthetic log of `--rows` interactions as a directory of Parquet files (DuckDB, from hashes
of the row number, so the same rows every run: users = rows / 25, items = rows / 200 with a
power-law popularity, integer ids, integer timestamps), then runs the product's command in a child
process, `sidrec data prepare --format csv --engine duckdb --path LOG --out DATA`, and reports its
wall time, its peak resident memory (the child's ru_maxrss: DuckDB, Python and the part being
written), the engine's memory limit, and the per-row costs. The log and the data live in `--work`
(default: a temporary directory, removed at the end); results -> bench/results/scale-data.json.

Tokenization (`--items N`, 0 to skip): N clustered item embeddings of `--dim` are written to a
float32 .npy file in blocks, then a child process memory-maps it and runs the library's RQ-KMeans
(`--levels` x 256 codes: centroids fitted on a sample of `FIT_ROWS` items, every item assigned in
batches) and the bijective collision resolution ("reassign"), and saves the codes; its peak RSS and
the seconds of each step are reported. (Building the in-memory `Codebook` and its trie from those
codes is the training host's cost, not measured here.)
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
import threading
import time
from pathlib import Path

import numpy as np

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


def run_child(cmd: list[str]) -> tuple[str, dict]:
    """Run `cmd`; (stdout, memory): its peak RSS (ru_maxrss: every resident page, including the pages
    of a memory-mapped input file, which are page cache the kernel may drop) and its peak anonymous
    RSS (RssAnon sampled every 0.2 s: the memory the process allocated itself)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True).start()
    err: list[str] = []
    threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True).start()
    anon = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            anon = max(anon, int(status.split("RssAnon:")[1].split()[0]))
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t
    time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[2:5]} failed ({proc.returncode}): {''.join(err).strip()[-2000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
    return "".join(out), {"wall_seconds": round(wall, 1), "peak_rss_gib": round(peak_kib / 2**20, 3),
                          "peak_anon_rss_gib": round(anon / 2**20, 3)}


def run_prepare(log: Path, out: Path, memory_limit: str, shard_rows: int) -> dict:
    """The product's CLI in a child process: wall time and the child's peak memory."""
    cmd = [sys.executable, "-m", "sidrec.cli", "data", "prepare", "--format", "csv", "--path", str(log), "--engine",
           "duckdb", "--out", str(out), "--memory-limit", memory_limit, "--shard-rows", str(shard_rows)]
    _, mem = run_child(cmd)
    info = json.loads((out / "prepare.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    return {"command": " ".join(cmd[1:]), **mem, "prepare_seconds": info["prepare_seconds"],
            "memory_limit": memory_limit, "parts": len(info["parts"]), "users": stats["users"],
            "items": stats["items"], "interactions": stats["interactions"],
            "output_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}


def make_embeddings(n: int, dim: int, out: Path, seed: int = 0, block: int = 1 << 20) -> dict:
    """[n, dim] float32 item vectors around a two-level hierarchy of centres, written in blocks."""
    spec = out.with_suffix(".json")
    if out.exists() and spec.exists() and json.loads(spec.read_text()).get("items") == n:  # made by an earlier run
        return json.loads(spec.read_text())
    if out.exists() and not spec.exists():
        raise SystemExit(f"{out} exists and this benchmark did not write it: choose another --work")
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    top, sub = rng.normal(size=(4096, dim)), 0.4 * rng.normal(size=(4096, dim))
    x = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, block):
        m = min(block, n - a)
        x[a : a + m] = top[rng.integers(0, 4096, m)] + sub[rng.integers(0, 4096, m)] + 0.1 * rng.normal(size=(m, dim))
    x.flush()
    del x
    info = {"items": n, "dim": dim, "seed": seed, "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - t, 1)}
    spec.write_text(json.dumps(info))
    return info


def tokenize_child(npy: Path, levels: int, out: Path) -> None:
    """In the child: memory-map, quantize, resolve, save the codes; timings as JSON on stdout."""
    from sidrec.tokenize import quantize
    from sidrec.tokenize.resolve import resolve

    x = np.load(npy, mmap_mode="r")
    t = time.perf_counter()
    q = quantize(x, "rq-kmeans", levels, 256)
    t_q = time.perf_counter() - t
    codes, sizes, stats = resolve(q, x, "reassign")
    t_r = time.perf_counter() - t - t_q
    np.save(out, codes)
    keys = np.zeros(len(codes), np.int64)
    for j in range(codes.shape[1]):
        keys = keys * sizes[j] + codes[:, j]
    print(json.dumps({"quantize_seconds": round(t_q, 1), "resolve_seconds": round(t_r, 1),
                      "bijective": bool(len(np.unique(keys)) == len(keys)), "rel_err": round(q.rel_err, 5),
                      **stats}))


def run_tokenize(npy: Path, levels: int, out: Path) -> dict:
    """The tokenizer in a child process. Its ru_maxrss counts the mapped file's pages: run it without
    the prepare step (--rows 0) for a peak of its own; the sampled anonymous peak is its own anyway."""
    cmd = [sys.executable, "-m", "bench.scale_data", "--child-tokenize", str(npy), "--levels", str(levels),
           "--child-out", str(out)]
    stdout, mem = run_child(cmd)
    res = json.loads(stdout.strip().splitlines()[-1])
    from sidrec.tokenize.quantizers import FIT_ROWS

    return {**res, **mem, "levels": levels, "codebook_size": 256, "fit_rows": FIT_ROWS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--memory-limit", default="4GB")
    ap.add_argument("--shard-rows", type=int, default=20_000_000)
    ap.add_argument("--work", default=None, help="directory for the log and the data (default: a temp dir)")
    ap.add_argument("--name", default="scale-data")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--items", type=int, default=100_000_000, help="items to tokenize (0: skip)")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--child-tokenize", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    if "--child-tokenize" in sys.argv:
        a = ap.parse_args()
        return tokenize_child(Path(a.child_tokenize), a.levels, Path(a.child_out))
    a = common.parse_args(ap)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="sidrec-scale-data-"))
    try:
        log = make_log(a.rows, work / "log", os.cpu_count() or 1)
        print("log", log, flush=True)
        prep = run_prepare(work / "log", work / "data", a.memory_limit, a.shard_rows) if a.rows else None
        print("prepare", prep, flush=True)
        shutil.rmtree(work / "log", ignore_errors=True)
        tok = None
        if a.items:
            emb = make_embeddings(a.items, a.dim, work / "emb.npy")
            print("embeddings", emb, flush=True)
            tok = {**run_tokenize(work / "emb.npy", a.levels, work / "codes.npy"), "embeddings": emb}
            tok["us_per_item"] = round(1e6 * (tok["quantize_seconds"] + tok["resolve_seconds"]) / a.items, 3)
            print("tokenize", tok, flush=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    if prep:
        rows.append({**prep, "log": log, "us_per_row": round(1e6 * prep["prepare_seconds"] / a.rows, 3),
                     "bytes_per_row_peak_rss": round(prep["peak_rss_gib"] * 2**30 / a.rows, 2)})
    out = write_result(a.name, {"rows": rows, "tokenize": tok}, Path(a.results_dir) if a.results_dir else RESULTS)
    (out.with_suffix(".md")).write_text(scale_data_table(json.loads(out.read_text())))


if __name__ == "__main__":
    main()
