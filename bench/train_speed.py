"""Training-speed benchmark on Beauty: seconds per epoch for FV-MLE, AR-NTP and the parallel head.

    python -m bench.train_speed [--epochs 3] [--d-model 64] [--layers 2]

Each head trains `--epochs` full epochs (no evaluation) with the Beauty config's backbone
(history 50); the median epoch time and the process's peak RSS are written to
bench/results/train_speed.json. Bucketed batches (the default) are compared with random batches.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from bench.common import SHARED, write_result
from sidrec.data import prepare, read
from sidrec.embed import embed_collab
from sidrec.model import BackboneConfig, ModelConfig, SeqRecModel
from sidrec.tokenize import fit_codebook
from sidrec.train import TrainConfig, Trainer


#: name -> (head, model keys, train keys): the shipped models (library defaults) and the earlier AR head
VARIANTS = {"fv": ("fv", {}, {}), "ar": ("ar", {}, {}),
            "ar-free": ("ar", {"node_table": False}, {"sparse": False}), "parallel": ("parallel", {}, {})}


def epoch_times(model, data, tc: TrainConfig, epochs: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(model, data, tc, tmp)
        times = []
        for e in range(epochs):
            order = tr.batches.order(e)
            t = time.perf_counter()
            for rows in order:
                tr.step(rows)
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--heads", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    a = common.parse_args(ap, out_attr="out_dir")
    root = SHARED / "amazon-beauty"
    data = prepare(read("seq", root / "s3rec/Beauty.txt", root / "derived/items.jsonl"))
    cb = fit_codebook(embed_collab(data, 64), "rq-kmeans", 3, 256)
    results = []
    for name in a.heads.split(","):
        if name not in VARIANTS:
            ap.error(f"--heads: unknown {name!r}; choose from {', '.join(VARIANTS)}")
        head, model_keys, train_keys = VARIANTS[name]
        for bucket in (True, False):
            if not bucket and head == "parallel":
                continue
            torch.manual_seed(0)
            # the shipped model: the library defaults (the recipe), at the width asked for
            cfg = ModelConfig(head=head, **model_keys, backbone=BackboneConfig(d_model=a.d_model, n_layers=a.layers,
                                                                               d_ff=4 * a.d_model))
            model = SeqRecModel(cfg, data.n_items, cb)
            tc = TrainConfig(batch_size=a.batch_size, bucket=bucket, epochs=a.epochs, **train_keys)
            ts = epoch_times(model, data, tc, a.epochs)
            r = {"head": name, "bucketed": bucket, "epoch_seconds": [round(t, 2) for t in ts],
                 "median_epoch_seconds": round(statistics.median(ts), 2),
                 "output_layer_parameters": model.output_parameters(),
                 "total_parameters": sum(p.numel() for p in model.parameters())}
            results.append(r)
            print(r)
    fv = next(r for r in results if r["head"] == "fv" and r["bucketed"])
    ar = next(r for r in results if r["head"] == "ar" and r["bucketed"])
    summary = {
        "dataset": "beauty", "users": data.n_users, "items": data.n_items, "train_targets": None,
        "d_model": a.d_model, "layers": a.layers, "batch_size": a.batch_size, "max_len": 50,
        "ar_over_fv_epoch_ratio": round(ar["median_epoch_seconds"] / fv["median_epoch_seconds"], 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    free = next((r for r in results if r["head"] == "ar-free" and r["bucketed"]), None)
    if free:  # the node-table head on the row-sparse path against the head it replaced
        summary["ar_over_ar_free_epoch_ratio"] = round(ar["median_epoch_seconds"] / free["median_epoch_seconds"], 3)
    write_result("train_speed", {"summary": summary, "results": results},
                 Path(a.out_dir) if a.out_dir else None)
    print(summary)


if __name__ == "__main__":
    main()
