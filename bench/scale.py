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
               "fv-sampled-popularity-4096", "fv-sampled-in-batch", "ar", "ar-token",
               "ar-node", "fv-sampled-uniform-4096-sparse")
INFER_KINDS = ("fv", "ar", "ar-token", "ar-node")
#: whole-model steps (backbone + head + optimizer) on a realistic batch; "-sparse": the row-sparse path
MODEL_KINDS = ("model-ar", "model-ar-node", "model-fv-sampled-4096", "model-fv-sampled-4096-sparse")
MODEL_USERS, MODEL_HISTORY = 256, 50  # a batch: 256 histories of 50 items (12,800 targets)
SPARSE = ("ar-node", "fv-sampled-uniform-4096-sparse")


def make_head(kind: str, n: int, cb, dev):
    """The output layer a measurement times (see the module doc)."""
    from sidrec.model.heads import AutoregressiveHead, FullSoftmaxHead
    from sidrec.model.sampled import NegativeSampler

    if kind.startswith("ar"):
        return AutoregressiveHead(D, cb, item_vectors=kind != "ar-token", node_table=kind == "ar-node").to(dev)
    sampler = None
    if kind.startswith("fv-sampled"):
        spec = kind.removeprefix("fv-sampled-").removesuffix("-sparse")  # uniform-256, popularity-4096, in-batch
        sampler_kind, k = ("in-batch", TARGETS) if spec == "in-batch" else (spec.rsplit("-", 1)[0], int(spec.rsplit("-", 1)[1]))
        sampler = NegativeSampler(n, sampler_kind, k)
        if sampler.kind != "uniform":
            sampler.set_counts(1e6 / torch.arange(1, n + 1, dtype=torch.float64))  # Zipf popularity
    return FullSoftmaxHead(D, n, chunk_size=None if kind == "fv-naive" else 1024, sampler=sampler).to(dev)


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    from sidrec.tokenize import Codebook

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, kind = spec["n"], spec["kind"]
    cb = Codebook.load(spec["codebook"]) if "ar" in kind else None
    base = _rss_gib()
    if spec["mode"] == "model":
        out = model_step(kind, n, cb, dev, spec["repeats"])
    else:
        head = make_head(kind, n, cb, dev)
        table = 0 if kind == "ar-token" else head.own_nodes.rows.numel() if kind == "ar-node" else n * D
        total = sum(p.numel() for p in head.parameters())
        out = {"n": n, "kind": kind, "output_parameters": total, "item_table_parameters": table,
               "other_output_parameters": total - table}
        out.update(head_train(head, kind, n, dev, spec["repeats"]) if spec["mode"] == "train" else
                   head_infer(head, kind, dev, spec))
    out["peak_extra_gib"] = round(max(0.0, _peak_gib() - base), 3)
    if torch.cuda.is_available():
        out["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def _optimizer(module, sparse: bool, lr_steps: int = 10**6):
    """The product's optimisation step (`sidrec.train.optim`) over a module: dense AdamW, or AdamW plus
    catch-up Adam on the N-row tables read sparsely."""
    from sidrec.train import TrainConfig
    from sidrec.train.optim import ModelOptimizer

    class Wrapped(torch.nn.Module):  # what ModelOptimizer needs of a model: its tables and re-centring
        def __init__(self, m):
            super().__init__()
            self.m = m

        def sparse_parameters(self):
            return [p for t in _tables(self.m) for p in ([t.rows, t.node_bias] if hasattr(t, "rows") else [t.weight])]

        def set_sparse(self, on):
            for t in _tables(self.m):
                t.sparse = on
            if hasattr(self.m, "sparse"):
                self.m.sparse = on

        def after_step(self, changed):
            for t in _tables(self.m):
                if hasattr(t, "rows") and t.rows in changed:
                    t.recentre_(changed[t.rows])

    model = module if hasattr(module, "sparse_parameters") else Wrapped(module)
    return ModelOptimizer(model, TrainConfig(sparse=sparse, grad_clip=1.0, weight_decay=0.0), lambda s: 1.0)


def _tables(head) -> list:
    if getattr(head, "own_nodes", None) is not None:
        return [head.own_nodes]
    return [head] if hasattr(head, "item_rows") and head.table is None else []


def head_train(head, kind: str, n: int, dev, repeats: int) -> dict:
    """The output layer's training step on 2,048 targets: forward + backward + clipping + optimizer."""
    h = torch.randn(TARGETS, D, device=dev, requires_grad=True)
    y = torch.randint(0, n, (TARGETS,), device=dev)
    opt = _optimizer(head, kind in SPARSE) if kind in SPARSE else None
    plain = torch.optim.AdamW(head.parameters(), lr=1e-3) if opt is None else None
    touched = {}

    def step():
        loss = torch.nn.functional.cross_entropy(head.logits(h), y) if kind == "fv-naive" else head.nll(h, y).mean()
        if opt is None:
            plain.zero_grad(set_to_none=True)
            loss.backward()
            plain.step()
        else:
            opt.step(loss)
            touched["rows"] = sum(int(p.grad._nnz()) for p in opt.sparse if p.grad is not None and p.grad.is_sparse)

    out = {"step_seconds": _median(step, repeats)}
    if touched:
        out["rows_touched"] = touched["rows"]
    return out


def head_infer(head, kind: str, dev, spec: dict) -> dict:
    from sidrec.decode.beam import beam_search

    out = {}
    h = torch.randn(spec.get("infer_batch", INFER_BATCH), D, device=dev)
    with torch.no_grad():
        if kind == "fv":
            out["exact_seconds"] = _median(lambda: torch.topk(head.logits(h), 10, 1), spec["repeats"])
            return out
        head.eval()
        t = time.perf_counter()
        if kind == "ar":
            head.node_means(dev)  # cached until the weights change (what a server pays once)
        out["node_means_seconds"] = time.perf_counter() - t
        out["beam20_seconds"] = _median(lambda: beam_search(head, h, beam=20, k=10), spec["repeats"])
        if kind in ("ar", "ar-node"):
            t = time.perf_counter()
            tables = head.eval_cache(dev)
            out["node_tables_seconds"] = time.perf_counter() - t
            out["exact_seconds"] = _median(lambda: torch.topk(head.log_prob_all(h, tables), 10, 1), spec["repeats"])
    return out


def model_step(kind: str, n: int, cb, dev, repeats: int) -> dict:
    """A whole training step (backbone d 64, 2 layers + head + optimizer) on MODEL_USERS histories of
    MODEL_HISTORY items drawn from a Zipf popularity: seconds, and the table rows it touched."""
    from sidrec.model import BackboneConfig, ModelConfig, SeqRecModel

    sparse = kind.endswith("-sparse") or kind == "model-ar-node"
    head = "fv" if "fv" in kind else "ar"
    cfg = ModelConfig(head=head, node_table=kind == "model-ar-node", fv_loss="sampled" if head == "fv" else "full",
                      fv_negatives=4096, backbone=BackboneConfig(d_model=D, n_layers=2, n_heads=2, d_ff=256,
                                                                 dropout=0.1, max_len=MODEL_HISTORY))
    model = SeqRecModel(cfg, n, cb if head == "ar" else None).to(dev)
    opt = _optimizer(model, sparse)
    g = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    seq = torch.multinomial(zipf / zipf.sum(), MODEL_USERS * (MODEL_HISTORY + 1), replacement=True, generator=g)
    seq = seq.view(MODEL_USERS, MODEL_HISTORY + 1).to(dev)
    touched = {}

    def step():
        model.train()
        loss = model.nll(seq[:, :-1], seq[:, 1:]).mean()
        opt.step(loss)
        touched["rows"] = sum(int(p.grad._nnz()) if p.grad.is_sparse else p.shape[0] for p in opt.sparse
                              if p.grad is not None) if opt.sparse else None

    out = {"n": n, "kind": kind, "step_seconds": _median(step, repeats), "targets": MODEL_USERS * MODEL_HISTORY,
           "parameters": sum(p.numel() for p in model.parameters())}
    if touched.get("rows") is not None:
        out["rows_touched"] = touched["rows"]
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
    ap.add_argument("--kinds", default=",".join(TRAIN_KINDS), help="output-layer training measurements to run")
    ap.add_argument("--infer-kinds", default=",".join(INFER_KINDS), help="inference measurements to run")
    ap.add_argument("--model-kinds", default=",".join(MODEL_KINDS), help="whole-model training steps to run")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--name", default="scale")
    ap.add_argument("--infer-batch", type=int, default=INFER_BATCH, help="users per inference batch (latency is per user)")
    a = common.parse_args(ap, out_attr="out_dir")
    out_dir = Path(a.out_dir) if a.out_dir else RESULTS
    sizes = [int(s) for s in a.sizes.split(",")]
    kinds = [k for k in a.kinds.split(",") if k]
    infer_kinds = [k for k in a.infer_kinds.split(",") if k]
    model_kinds = [k for k in a.model_kinds.split(",") if k]
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
            for mode, names in (("train", kinds), ("infer", infer_kinds), ("model", model_kinds)):
                for kind in names:
                    spec = {"n": n, "kind": kind, "mode": mode, "codebook": str(cb_dir), "repeats": repeats,
                            "infer_batch": a.infer_batch}
                    row[f"{mode}_{kind}"] = run_worker(spec, a.mem_cap_gib, a.timeout)
                    print(n, mode, kind, row[f"{mode}_{kind}"], flush=True)
            rows.append(row)
            summary = summarise(rows)  # written after every size: a long run leaves its finished sizes
            write_result(a.name, {"targets": TARGETS, "d": D, "infer_batch": a.infer_batch, "kinds": kinds,
                                  "model_batch": {"users": MODEL_USERS, "history": MODEL_HISTORY},
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
            "step_speedup_ar_node_vs_exact_fv": _ratio(min(fv_exact), _get(r, "train_ar-node", "step_seconds"))
            if fv_exact else None,
            "step_speedup_ar_node_vs_sampled_4096_sparse": _ratio(
                _get(r, "train_fv-sampled-uniform-4096-sparse", "step_seconds"), _get(r, "train_ar-node", "step_seconds")),
            "beam20_speedup_ar_node_vs_fv_exact": _ratio(_get(r, "infer_fv", "exact_seconds"),
                                                         _get(r, "infer_ar-node", "beam20_seconds")),
            "model_step_ar_node_vs_ar": _ratio(_get(r, "model_model-ar-node", "step_seconds"),
                                               _get(r, "model_model-ar", "step_seconds"), 3),
        }
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        for kind in ("ar", "ar-token", "ar-node", "fv-streamed", "fv-sampled-uniform-4096",
                     "fv-sampled-uniform-4096-sparse"):
            s[f"step_growth_{kind}_{first['n']}_to_{last['n']}"] = _ratio(
                _get(last, f"train_{kind}", "step_seconds"), _get(first, f"train_{kind}", "step_seconds"), 2)
        for kind in MODEL_KINDS:
            s[f"model_step_growth_{kind}_{first['n']}_to_{last['n']}"] = _ratio(
                _get(last, f"model_{kind}", "step_seconds"), _get(first, f"model_{kind}", "step_seconds"), 2)
    return s


LABELS = {"fv-naive": "FV-MLE naive", "fv-streamed": "FV-MLE streamed", "fv-sampled-uniform-256": "FV sampled, uniform 256",
          "fv-sampled-uniform-4096": "FV sampled, uniform 4,096", "fv-sampled-popularity-4096": "FV sampled, popularity 4,096",
          "fv-sampled-in-batch": "FV sampled, in-batch", "ar": "AR-NTP shipped head", "ar-token": "AR-NTP token-only head",
          "ar-node": "AR-NTP node table, row-sparse", "fv-sampled-uniform-4096-sparse": "FV sampled 4,096, row-sparse"}


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
