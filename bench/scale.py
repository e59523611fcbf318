"""Cost at scale: AR-NTP vs FV-MLE output layers as the catalog grows.

    python -m bench.scale [--sizes 10000,100000,1000000] [--repeats 5]

For each catalog size N (synthetic clustered item embeddings, d=64):
- tokenizer fit time (RQ-KMeans, 3 levels x 256; 4 levels from N = 10^7);
- training step of the output layer alone on the same 2,048 target positions: forward + backward
  + AdamW step, for FV-MLE naive (full [2048, N] logits + cross_entropy), FV-MLE streamed
  (sidrec's chunked exact softmax CE) and AR-NTP (constrained, the product head); median time and
  peak extra memory; an allocation failure under the memory cap is reported as OOM, not a crash;
- output-layer parameter counts;
- inference on a batch of 256 users: FV exact full scoring + top-10, AR beam-20 top-10, AR exact
  all-item scoring + top-10; median latency per user.
Each measurement runs in a fresh subprocess (clean peak-RSS, capped address space). Results:
bench/results/scale.json, scale.md (rendered by bench.tables) and scale.png. On a GPU the same code
reports absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, write_result
from bench.tables import measured as _get, scale_table

D = 64
TARGETS = 2048
INFER_BATCH = 256


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    from sidrec.decode.beam import beam_search
    from sidrec.model.heads import AutoregressiveHead, FullSoftmaxHead
    from sidrec.tokenize import Codebook

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, kind = spec["n"], spec["kind"]
    cb = Codebook.load(spec["codebook"]) if kind.startswith("ar") else None
    if kind.startswith("fv"):
        head = FullSoftmaxHead(D, n, chunk_size=None if kind == "fv-naive" else 1024).to(dev)
    else:
        head = AutoregressiveHead(D, cb, item_vectors=False).to(dev)  # the head without item vectors
    out = {"n": n, "kind": kind, "output_parameters": sum(p.numel() for p in head.parameters())}
    base = _rss_gib()
    if spec["mode"] == "train":
        h = torch.randn(TARGETS, D, device=dev, requires_grad=True)
        y = torch.randint(0, n, (TARGETS,), device=dev)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3)

        def step():
            if kind == "fv-naive":
                loss = torch.nn.functional.cross_entropy(head.logits(h), y)
            else:
                loss = head.nll(h, y).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        out["step_seconds"] = _median(step, spec["repeats"])
    else:
        h = torch.randn(INFER_BATCH, D, device=dev)
        with torch.no_grad():
            if kind == "fv":
                out["exact_seconds"] = _median(lambda: torch.topk(head.logits(h), 10, 1), spec["repeats"])
            else:
                head.eval()
                out["beam20_seconds"] = _median(lambda: beam_search(head, h, beam=20, k=10), spec["repeats"])
                t = time.perf_counter()
                tables = head.eval_cache(dev)
                out["node_tables_seconds"] = time.perf_counter() - t
                out["exact_seconds"] = _median(lambda: torch.topk(head.log_prob_all(h, tables), 10, 1),
                                               spec["repeats"])
    out["peak_extra_gib"] = round(max(0.0, _peak_gib() - base), 3)
    if torch.cuda.is_available():
        out["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def run_worker(spec: dict, mem_cap_gib: float, timeout: int) -> dict:
    code = ("import json,sys,resource; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({int(mem_cap_gib * 2**30)}, {int(mem_cap_gib * 2**30)})); "
            "from bench.scale import worker; print('RESULT', json.dumps(worker(json.loads(sys.argv[1]))))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    try:
        r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout after {timeout} s"}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
    oom = "memory" in r.stderr.lower() or "alloc" in r.stderr.lower() or r.returncode in (-9, 137)
    return {**spec, "error": ("OOM: " if oom else "") + err[:300]}


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    from bench.tokenize import clustered_embeddings

    return clustered_embeddings(n, d, seed)


def main() -> None:
    from sidrec.tokenize import fit_codebook

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mem-cap-gib", type=float, default=16.0, help="address-space cap per measurement")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args()
    out_dir = Path(a.out_dir) if a.out_dir else RESULTS
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            levels = 3 if n < 10**7 else 4
            x = clustered(n, D)
            t = time.perf_counter()
            cb = fit_codebook(x, "rq-kmeans", levels, 256)
            fit_s = time.perf_counter() - t
            cb_dir = Path(tmp) / f"cb{n}"
            cb.save(cb_dir)
            del x
            row = {"n": n, "levels": levels, "codebook_size": 256, "tokenizer_fit_seconds": round(fit_s, 2),
                   "collision_rate_before": cb.meta["collision_rate_before"]}
            for kind in ("fv-naive", "fv-chunked", "ar"):
                spec = {"n": n, "kind": kind, "mode": "train", "codebook": str(cb_dir), "repeats": a.repeats}
                row[f"train_{kind}"] = run_worker(spec, a.mem_cap_gib, a.timeout)
                print(n, kind, row[f"train_{kind}"], flush=True)
            for kind in ("fv", "ar"):
                spec = {"n": n, "kind": kind, "mode": "infer", "codebook": str(cb_dir), "repeats": a.repeats}
                row[f"infer_{kind}"] = run_worker(spec, a.mem_cap_gib, a.timeout)
                print(n, kind, row[f"infer_{kind}"], flush=True)
            rows.append(row)
    summary = summarise(rows)
    write_result("scale", {"targets": TARGETS, "d": D, "infer_batch": INFER_BATCH, "rows": rows, "summary": summary},
                 out_dir)
    write_markdown_and_plot(rows, summary, out_dir)


def summarise(rows: list[dict]) -> dict:
    s = {}
    for r in rows:
        ar = _get(r, "train_ar", "step_seconds")
        fvc = _get(r, "train_fv-chunked", "step_seconds")
        fvn = _get(r, "train_fv-naive", "step_seconds")
        fv_best = min(v for v in (fvc, fvn) if v is not None) if (fvc or fvn) else None
        beam = _get(r, "infer_ar", "beam20_seconds")
        fv_inf = _get(r, "infer_fv", "exact_seconds")
        s[str(r["n"])] = {
            "train_speedup_ar_vs_best_fv": round(fv_best / ar, 1) if fv_best and ar else None,
            "output_params_ratio_fv_over_ar": round(_get(r, "train_fv-chunked", "output_parameters")
                                                    / _get(r, "train_ar", "output_parameters"), 1)
            if _get(r, "train_ar", "output_parameters") and _get(r, "train_fv-chunked", "output_parameters") else None,
            "infer_speedup_beam_vs_fv_exact": round(fv_inf / beam, 1) if fv_inf and beam else None,
        }
    ns = [r["n"] for r in rows]
    if len(ns) > 1:
        first, last = rows[0], rows[-1]
        for key in ("train_ar", "train_fv-chunked"):
            a, b = _get(first, key, "step_seconds"), _get(last, key, "step_seconds")
            s[f"{key}_growth_{ns[0]}_to_{ns[-1]}"] = round(b / a, 2) if a and b else None
    return s


def write_markdown_and_plot(rows: list[dict], summary: dict, out_dir: Path) -> None:
    from sidrec import io

    io.write_text(out_dir / "scale.md", scale_table({"rows": rows, "summary": summary, "infer_batch": INFER_BATCH}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_fv-naive", "FV-MLE naive"), ("train_fv-chunked", "FV-MLE streamed"),
                       ("train_ar", "AR-NTP")):
        pts = [(n, _get(r, key, "step_seconds")) for n, r in zip(ns, rows) if _get(r, key, "step_seconds")]
        if pts:
            a1.plot(*zip(*pts), marker="o", label=label)
    a1.set(xscale="log", yscale="log", xlabel="catalog size N", ylabel="s per step (2,048 targets)",
           title="output-layer training step")
    for key, field, label in (("infer_fv", "exact_seconds", "FV-MLE exact"), ("infer_ar", "beam20_seconds",
                              "AR-NTP beam-20"), ("infer_ar", "exact_seconds", "AR-NTP exact")):
        pts = [(n, _get(r, key, field) / INFER_BATCH * 1e3) for n, r in zip(ns, rows) if _get(r, key, field)]
        if pts:
            a2.plot(*zip(*pts), marker="o", label=label)
    a2.set(xscale="log", yscale="log", xlabel="catalog size N", ylabel="ms per user (batch 256)",
           title="top-10 inference")
    for ax in (a1, a2):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    with io.atomic_path(out_dir / "scale.png") as t:
        fig.savefig(t, format="png", dpi=110)
    print((out_dir / "scale.md").read_text())


if __name__ == "__main__":
    main()
