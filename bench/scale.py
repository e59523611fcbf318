"""Cost at scale: AR-NTP vs FV-MLE output layers as the catalog grows.

    python -m bench.scale [--sizes 10000,100000,1000000,10000000] [--repeats 5]

For each catalog size N (synthetic clustered item embeddings, d=64):
- tokenizer fit time (RQ-KMeans, 3 levels x 256; 4 levels from N = 10^7);
- training step of the output layer alone on the same 2,048 target positions: forward + backward
  + AdamW step over all of the layer's parameters, for
  FV-MLE exact: naive (full [2048, N] logits + cross_entropy) and streamed (sidrec's chunked exact
  softmax CE); FV-MLE sampled softmax with logQ correction: uniform 256 and 4,096 negatives,
  popularity 4,096 (Zipf item counts), in-batch (the 2,048 targets);
  AR-NTP: the shipped head (item vectors + node biases: an N x d item table of its own, as the tied
  model's item-ID table) and the token-only head (item_vectors=False);
  median time and peak extra memory; an allocation failure under the memory cap is OOM, not a crash;
- output-layer parameter counts, with the N x d item table counted apart;
- inference on a batch of 256 users: FV exact full scoring + top-10, AR beam-20 top-10 (both heads),
  AR exact all-item scoring + top-10; median latency per user; the node tables an AR head caches
  between weight updates (node means, exact-scoring tables) are timed once, apart.
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

from bench import common
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


TRAIN_KINDS = ("fv-naive", "fv-streamed", "fv-sampled-uniform-256", "fv-sampled-uniform-4096",
               "fv-sampled-popularity-4096", "fv-sampled-in-batch", "ar", "ar-token")
INFER_KINDS = ("fv", "ar", "ar-token")


def make_head(kind: str, n: int, cb, dev):
    """The output layer a measurement times (see the module doc)."""
    from sidrec.model.heads import AutoregressiveHead, FullSoftmaxHead
    from sidrec.model.sampled import NegativeSampler

    if kind.startswith("ar"):
        return AutoregressiveHead(D, cb, item_vectors=kind == "ar").to(dev)
    sampler = None
    if kind.startswith("fv-sampled"):
        spec = kind.removeprefix("fv-sampled-")  # uniform-256, popularity-4096, in-batch
        sampler_kind, k = ("in-batch", TARGETS) if spec == "in-batch" else (spec.rsplit("-", 1)[0], int(spec.rsplit("-", 1)[1]))
        sampler = NegativeSampler(n, sampler_kind, k)
        if sampler.kind != "uniform":
            sampler.set_counts(1e6 / torch.arange(1, n + 1, dtype=torch.float64))  # Zipf popularity
    return FullSoftmaxHead(D, n, chunk_size=None if kind == "fv-naive" else 1024, sampler=sampler).to(dev)


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    from sidrec.decode.beam import beam_search
    from sidrec.tokenize import Codebook

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, kind = spec["n"], spec["kind"]
    cb = Codebook.load(spec["codebook"]) if kind.startswith("ar") else None
    head = make_head(kind, n, cb, dev)
    table = n * D if kind in ("ar", "fv", "fv-naive", "fv-streamed") or kind.startswith("fv-sampled") else 0
    total = sum(p.numel() for p in head.parameters())
    out = {"n": n, "kind": kind, "output_parameters": total, "item_table_parameters": table,
           "other_output_parameters": total - table}
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
        h = torch.randn(spec.get("infer_batch", INFER_BATCH), D, device=dev)
        with torch.no_grad():
            if kind == "fv":
                out["exact_seconds"] = _median(lambda: torch.topk(head.logits(h), 10, 1), spec["repeats"])
            else:
                head.eval()
                t = time.perf_counter()
                if kind == "ar":
                    head.node_means(dev)  # cached until the weights change (what a server pays once)
                out["node_means_seconds"] = time.perf_counter() - t
                out["beam20_seconds"] = _median(lambda: beam_search(head, h, beam=20, k=10), spec["repeats"])
                if kind == "ar":
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
    ap.add_argument("--sizes", default="10000,100000,1000000,10000000")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (after a warm-up); 1 from N = 10^7")
    ap.add_argument("--mem-cap-gib", type=float, default=20.0, help="address-space cap per measurement")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--kinds", default=",".join(TRAIN_KINDS), help="training measurements to run")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--name", default="scale")
    ap.add_argument("--infer-batch", type=int, default=INFER_BATCH, help="users per inference batch (latency is per user)")
    a = common.parse_args(ap, out_attr="out_dir")
    out_dir = Path(a.out_dir) if a.out_dir else RESULTS
    sizes = [int(s) for s in a.sizes.split(",")]
    kinds = [k for k in a.kinds.split(",") if k]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            levels = 3 if n < 10**7 else 4
            repeats = a.repeats if n < 10**7 else 1
            x = clustered(n, D)
            t = time.perf_counter()
            cb = fit_codebook(x, "rq-kmeans", levels, 256)
            fit_s = time.perf_counter() - t
            cb_dir = Path(tmp) / f"cb{n}"
            cb.save(cb_dir)
            del x
            row = {"n": n, "levels": levels, "codebook_size": 256, "tokenizer_fit_seconds": round(fit_s, 2),
                   "collision_rate_before": cb.meta["collision_rate_before"], "repeats": repeats}
            del cb
            for mode, names in (("train", kinds), ("infer", INFER_KINDS)):
                for kind in names:
                    spec = {"n": n, "kind": kind, "mode": mode, "codebook": str(cb_dir), "repeats": repeats,
                            "infer_batch": a.infer_batch}
                    row[f"{mode}_{kind}"] = run_worker(spec, a.mem_cap_gib, a.timeout)
                    print(n, mode, kind, row[f"{mode}_{kind}"], flush=True)
            rows.append(row)
            summary = summarise(rows)  # written after every size: a long run leaves its finished sizes
            write_result(a.name, {"targets": TARGETS, "d": D, "infer_batch": a.infer_batch, "kinds": kinds,
                                  "rows": rows, "summary": summary}, out_dir)
    write_markdown_and_plot(rows, summary, out_dir, a.name, a.infer_batch)


def _ratio(a, b, digits: int = 1):
    return round(a / b, digits) if a and b else None


def summarise(rows: list[dict]) -> dict:
    """Per size: the shipped AR head's step against each FV-MLE variant, parameters, inference."""
    s = {}
    for r in rows:
        ar = _get(r, "train_ar", "step_seconds")
        fv_exact = [v for v in (_get(r, "train_fv-streamed", "step_seconds"), _get(r, "train_fv-naive", "step_seconds"))
                    if v]
        s[str(r["n"])] = {
            "step_speedup_ar_vs_exact_fv": _ratio(min(fv_exact), ar) if fv_exact else None,
            "step_speedup_ar_vs_sampled_4096": _ratio(_get(r, "train_fv-sampled-uniform-4096", "step_seconds"), ar),
            "step_speedup_ar_token_vs_exact_fv": _ratio(min(fv_exact), _get(r, "train_ar-token", "step_seconds"))
            if fv_exact else None,
            "output_params_ratio_fv_over_ar": _ratio(_get(r, "train_fv-streamed", "output_parameters"),
                                                     _get(r, "train_ar", "output_parameters")),
            "output_params_ratio_fv_over_ar_token": _ratio(_get(r, "train_fv-streamed", "output_parameters"),
                                                           _get(r, "train_ar-token", "output_parameters")),
            "beam20_speedup_vs_fv_exact": _ratio(_get(r, "infer_fv", "exact_seconds"),
                                                 _get(r, "infer_ar", "beam20_seconds")),
        }
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        for kind in ("ar", "ar-token", "fv-streamed", "fv-sampled-uniform-4096"):
            s[f"step_growth_{kind}_{first['n']}_to_{last['n']}"] = _ratio(
                _get(last, f"train_{kind}", "step_seconds"), _get(first, f"train_{kind}", "step_seconds"), 2)
    return s


LABELS = {"fv-naive": "FV-MLE naive", "fv-streamed": "FV-MLE streamed", "fv-sampled-uniform-256": "FV sampled, uniform 256",
          "fv-sampled-uniform-4096": "FV sampled, uniform 4,096", "fv-sampled-popularity-4096": "FV sampled, popularity 4,096",
          "fv-sampled-in-batch": "FV sampled, in-batch", "ar": "AR-NTP shipped head", "ar-token": "AR-NTP token-only head"}


def write_markdown_and_plot(rows: list[dict], summary: dict, out_dir: Path, name: str = "scale",
                            infer_batch: int = INFER_BATCH) -> None:
    from sidrec import io

    io.write_text(out_dir / f"{name}.md", scale_table({"rows": rows, "summary": summary, "infer_batch": infer_batch}))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, label in LABELS.items():
        pts = [(n, _get(r, f"train_{kind}", "step_seconds")) for n, r in zip(ns, rows) if _get(r, f"train_{kind}", "step_seconds")]
        if pts:
            a1.plot(*zip(*pts), marker="o", label=label, linestyle="--" if "sampled" in kind else "-")
    a1.set(xscale="log", yscale="log", xlabel="catalog size N", ylabel="s per step (2,048 targets)",
           title="output-layer training step (forward + backward + AdamW)")
    for key, field, label in (("infer_fv", "exact_seconds", "FV-MLE exact"), ("infer_ar", "beam20_seconds",
                              "AR-NTP shipped, beam-20"), ("infer_ar-token", "beam20_seconds", "AR-NTP token-only, beam-20"),
                              ("infer_ar", "exact_seconds", "AR-NTP shipped, exact")):
        pts = [(n, _get(r, key, field) / infer_batch * 1e3) for n, r in zip(ns, rows) if _get(r, key, field)]
        if pts:
            a2.plot(*zip(*pts), marker="o", label=label)
    a2.set(xscale="log", yscale="log", xlabel="catalog size N", ylabel="ms per user (batch 256)",
           title="top-10 inference")
    for ax in (a1, a2):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with io.atomic_path(out_dir / f"{name}.png") as t:
        fig.savefig(t, format="png", dpi=110)
    print((out_dir / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
