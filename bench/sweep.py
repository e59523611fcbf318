"""Validation sweep: many one-seed `bench.quality` variants, run side by side, ranked on validation.

    python -m bench.sweep bench/sweeps/beauty-backbone.yaml --jobs 2

The YAML names the dataset, the seed and a list of variants, each a `bench.quality` call:
`{tag, heads, tokenizers, set: [key=value, ...], parallel_levels, backbone}` (`backbone`: the options of a
backbone ablation, run through `bench.experiments.backbone`). Variants run as separate processes (`--jobs` at
a time: one per core pair on a CPU, several per GPU); a finished variant is reused (bench.quality
reuses any run whose config is unchanged), so a killed sweep resumes. The ranking uses the
validation NDCG@10 under the config's protocol only; test metrics are listed beside it for the
record, never used to choose. Writes bench/results/archive/sweep-<name>.{json,md}, next to the
variants' quality-<dataset>-<tag>.{json,md}: sweeps are the evidence behind docs/experiments.md, not
headline results (bench/results/ holds only those).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from bench import common
from bench.common import ARCHIVE, ROOT, write_result
from bench.tables import sweep_table
from sidrec import io


def command(spec: dict, v: dict, out_root: Path, results: Path, allow_dirty: bool = False) -> list[str]:
    exp = ["-m", "bench.experiments.backbone", "--variant", json.dumps(v["backbone"]), "--"] if v.get("backbone") else []
    cmd = [sys.executable, *(exp or ["-m", "bench.quality"]), "--dataset", spec["dataset"], "--seeds", str(spec.get("seeds", 1)),
           "--tokenizers", v.get("tokenizers", "rq-kmeans"), "--heads", v.get("heads", "ar"), "--tag", v["tag"],
           "--out-root", str(out_root), "--results-dir", str(results), *(["--allow-dirty"] if allow_dirty else [])]
    if v.get("parallel_levels"):
        cmd += ["--parallel-levels", str(v["parallel_levels"])]
    if spec.get("max_users"):  # plumbing tests: a slice of the dataset
        cmd += ["--max-users", str(spec["max_users"])]
    return cmd + (["--set", *spec.get("set", []), *v.get("set", [])] if spec.get("set") or v.get("set") else [])


def run_variant(cmd: list[str], tag: str, threads: int, logs: Path) -> tuple[str, int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    with open(logs / f"{tag}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return tag, rc, round(time.perf_counter() - t, 1)


def rows(dataset: str, variants: list[dict], results: Path, failed: set[str] = frozenset()) -> list[dict]:
    """One row per (variant, model): validation NDCG@10 (the selection metric) and test metrics.
    Variants that failed in this call are left out (their results file, if any, is older)."""
    out = []
    for v in variants:
        f = results / f"quality-{dataset}-{v['tag']}.json"
        if v["tag"] in failed or not f.exists():
            continue
        r = io.read_json(f)
        sfx = "_seen_excluded" if r["config"]["eval"]["exclude_seen"] else ""
        for name, s in r["summary"].items():
            get = lambda mode, k: s.get(mode + sfx, {}).get(k, {}).get("mean")  # noqa: E731
            out.append({"tag": v["tag"], "model": name, "set": v.get("set", []) + [f"backbone.{k}={x}" for k, x in v.get("backbone", {}).items()], "note": v.get("note", ""),
                        "valid_ndcg@10": get("valid_exact", "ndcg@10"), "test_recall@10": get("exact", "recall@10"),
                        "test_ndcg@10": get("exact", "ndcg@10"), "beam_ndcg@10": get("beam", "ndcg@10"),
                        "wall_s": s.get("wall_s"), "device": r["env"].get("cuda") or "cpu"})
    return sorted(out, key=lambda x: (x["model"], -(x["valid_ndcg@10"] or 0)))


def prepare_once(spec: dict, out_root: Path) -> None:
    """Prepare the dataset before the variants start: parallel processes would all build (and
    replace) the same shared data directory at once."""
    from bench.quality import prepared
    from sidrec.config import load_config

    cfg = load_config(ROOT / "configs" / f"{spec['dataset']}.yaml", list(spec.get("set", [])))
    prepared(spec["dataset"], cfg, out_root / f"quality-{spec['dataset']}", spec.get("max_users"))


def load_spec(path: str) -> dict:
    """The sweep YAML, checked: a bad spec is one message and exit 2, not a traceback."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        spec, why = None, f"cannot read it ({e})"
    else:
        why = "needs 'dataset' and 'variants: [{tag, heads, tokenizers, set}, ...]'"
    variants = spec.get("variants") if isinstance(spec, dict) else None
    if not (isinstance(spec, dict) and isinstance(spec.get("dataset"), str) and isinstance(variants, list)
            and all(isinstance(v, dict) and v.get("tag") for v in variants)):
        print(f"bench.sweep: {path}: {why}", file=sys.stderr)
        raise SystemExit(2)
    return spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", help="YAML: dataset, seeds (default 1), variants: [{tag, heads, tokenizers, set}]")
    ap.add_argument("--jobs", type=int, default=1, help="variants run at once")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per variant (default: cores / jobs)")
    ap.add_argument("--only", default="", help="comma-separated tags to run (the table still lists all)")
    ap.add_argument("--out-root", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--results-dir", default=str(ARCHIVE), help="where the variants' and the sweep's results go")
    a = common.parse_args(ap, default_out=ARCHIVE)
    spec = load_spec(a.spec)
    out_root, results = Path(a.out_root), Path(a.results_dir)
    todo = [v for v in spec["variants"] if not a.only or v["tag"] in a.only.split(",")]
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    logs = out_root / "sweep-logs"
    logs.mkdir(parents=True, exist_ok=True)
    prepare_once(spec, out_root)
    failed = set()
    with ThreadPoolExecutor(a.jobs) as pool:
        done = pool.map(lambda v: run_variant(command(spec, v, out_root, results, a.allow_dirty), v["tag"], threads, logs), todo)
        for tag, rc, wall in done:
            print(f"{tag}: {'ok' if rc == 0 else f'FAILED (exit {rc}, see {logs / tag}.log)'} in {wall} s", flush=True)
            failed |= {tag} if rc else set()
    name = f"sweep-{Path(a.spec).stem}"
    rs = rows(spec["dataset"], spec["variants"], results, failed)
    write_result(name, {"spec": spec, "rows": rs}, results)
    io.write_text(results / f"{name}.md", sweep_table(rs))
    print(sweep_table(rs))


if __name__ == "__main__":
    main()
