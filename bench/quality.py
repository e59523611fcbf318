"""Real-data quality: AR-NTP vs FV-MLE vs the parallel head on one backbone, full ranking.

    python -m bench.quality --dataset beauty --seeds 3

Per seed: FV-MLE once (it does not use semantic IDs), then AR-NTP and the parallel head for each
tokenizer (RQ-KMeans and OPQ on item text by default). Test metrics with exact ranking (and beam
20 for AR), mean ± std over seeds, wall time, hardware and commit go to
bench/results/quality-<dataset>.json and .md. Hyper-parameters come from configs/<dataset>.yaml,
which were chosen on the validation split only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, SHARED, write_result
from sidrec import io
from sidrec.config import load_config
from sidrec.data import SequenceData, prepare, read
from sidrec.pipeline import ensure_codebook, evaluate_run, head_config, train_one

DATASETS = {
    "beauty": ("amazon-beauty/s3rec/Beauty.txt", "amazon-beauty/derived/items.jsonl"),
    "sports": ("amazon-sports/s3rec/Sports_and_Outdoors.txt", "amazon-sports/derived/items.jsonl"),
    "yelp": ("yelp/s3rec/Yelp.txt", "yelp/derived/items.jsonl"),
}
KEYS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "mrr")
ANCHORS = {
    "beauty": {"TIGER (published)": (0.0648, 0.0384), "ActionPiece (published)": (0.0775, 0.0424),
               "RPG (published)": (None, 0.0464)},
    "sports": {"TIGER (published)": (0.0400, 0.0225), "ActionPiece (published)": (0.0500, 0.0264)},
}


def prepared(dataset: str, work: Path, max_users: int | None) -> SequenceData:
    out = work / "data"
    if (out / "sequences.npz").exists():
        return SequenceData.load(out)
    seq, meta = DATASETS[dataset]
    src = SHARED / seq
    if max_users:  # a tiny slice for plumbing tests: the first users' lines
        lines = src.read_text().splitlines()[:max_users]
        src = work / "slice.txt"
        io.write_text(src, "\n".join(lines) + "\n")
    prepare(read("seq", src, SHARED / meta), kcore_k=0 if max_users else 5).save(out)
    return SequenceData.load(out)


def run(dataset: str, seeds: int, tokenizers: list[str], heads: list[str], overrides: list[str],
        max_users: int | None, out_root: Path, results_dir: Path) -> dict:
    work = out_root / f"quality-{dataset}"
    data = prepared(dataset, work, max_users)
    base = load_config(ROOT / "configs" / f"{dataset}.yaml", overrides)
    rows: dict[str, list[dict]] = {}
    walls = []
    for seed in range(seeds):
        t_seed = time.perf_counter()
        for tok in tokenizers:
            cfg = copy.deepcopy(base)
            cfg["tokenizer"]["method"] = tok
            cfg["tokenizer"]["levels"] = 4 if tok in ("pq", "opq") else cfg["tokenizer"]["levels"]
            cfg["tokenizer"]["seed"] = seed
            cfg["train"]["seed"] = seed
            cb = ensure_codebook(cfg, data, work / tok)
            for head in heads:
                if head == "fv" and tok != tokenizers[0]:
                    continue  # FV-MLE does not use the codebook: once per seed
                name = f"{head}" if head == "fv" else f"{head}/{tok}"
                run_dir = work / f"seed{seed}" / name.replace("/", "-")
                if not (run_dir / "eval.json").exists():
                    train_one(head_config(cfg, head), data, cb, run_dir, resume=True)
                    evaluate_run(run_dir, beam=20, data=data)
                ev = io.read_json(run_dir / "eval.json")
                rec = {"seed": seed, "exact": {k: ev["test"]["exact"][k] for k in KEYS},
                       "valid_exact": {k: ev["valid"]["exact"][k] for k in KEYS}}
                if "beam" in ev["test"]:
                    rec["beam"] = {k: ev["test"]["beam"][k] for k in KEYS}
                    rec["overlap@10"] = ev["test"]["overlap@10"]
                rows.setdefault(name, []).append(rec)
        walls.append(round(time.perf_counter() - t_seed, 1))
        result = _result(dataset, data, seed + 1, tokenizers, heads, overrides, max_users, walls, base, rows)
        write_result(f"quality-{dataset}", result, results_dir)  # after every seed: partial results survive
        io.write_text(results_dir / f"quality-{dataset}.md", markdown(result))
    return result


def _result(dataset, data, seeds, tokenizers, heads, overrides, max_users, walls, base, rows) -> dict:
    summary = {name: aggregate(recs) for name, recs in rows.items()}
    return {"dataset": dataset, "users": data.n_users, "items": data.n_items, "seeds": seeds,
              "tokenizers": tokenizers, "heads": heads, "overrides": overrides, "max_users": max_users,
              "wall_seconds_per_seed": walls, "config": {k: v for k, v in base.items() if not k.startswith("_")},
              "summary": summary, "runs": rows, "comparisons": compare(summary, tokenizers)}


def aggregate(recs: list[dict]) -> dict:
    out = {}
    for mode in ("exact", "beam", "valid_exact"):
        if mode in recs[0]:
            out[mode] = {k: {"mean": statistics.mean(r[mode][k] for r in recs),
                             "std": statistics.stdev(r[mode][k] for r in recs) if len(recs) > 1 else 0.0}
                         for k in KEYS}
    if "overlap@10" in recs[0]:
        out["overlap@10"] = statistics.mean(r["overlap@10"] for r in recs)
    return out


def compare(summary: dict, tokenizers: list[str]) -> dict:
    out = {}
    fv = summary.get("fv", {}).get("exact", {}).get("ndcg@10", {}).get("mean")
    for tok in tokenizers:
        for head in ("ar", "parallel"):
            s = summary.get(f"{head}/{tok}")
            if s and fv:
                out[f"{head}/{tok}_ndcg10_rel_gap_vs_fv"] = (s["exact"]["ndcg@10"]["mean"] - fv) / fv
            if s and "beam" in s:
                out[f"{head}/{tok}_beam_vs_exact_ndcg10_rel"] = (
                    s["beam"]["ndcg@10"]["mean"] - s["exact"]["ndcg@10"]["mean"]) / s["exact"]["ndcg@10"]["mean"]
    return out


def markdown(r: dict) -> str:
    def cell(s, mode, k):
        m = s.get(mode, {}).get(k)
        return f"{m['mean']:.4f} ± {m['std']:.4f}" if m else "—"

    lines = [f"Test split, full ranking, {r['users']:,} users, {r['items']:,} items, mean ± std over "
             f"{r['seeds']} seed(s); wall time per seed: {r['wall_seconds_per_seed']} s.", "",
             "| model | decode | Recall@10 | NDCG@10 | Recall@20 | NDCG@20 |", "|---|---|---|---|---|---|"]
    for name, s in r["summary"].items():
        for mode in ("exact", "beam"):
            if mode in s:
                label = {"fv": "FV-MLE (SASRec-style, full softmax)"}.get(name, name.replace("ar/", "AR-NTP / ")
                                                                         .replace("parallel/", "Parallel / "))
                lines.append(f"| {label} | {mode}{' 20' if mode == 'beam' else ''} | " +
                             " | ".join(cell(s, mode, k) for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"))
                             + " |")
    for name, (rec, ndcg) in ANCHORS.get(r["dataset"], {}).items():
        lines.append(f"| {name} | — | {rec if rec else '—'} | {ndcg} | — | — |")
    lines += ["", "Relative differences: " + ", ".join(f"{k} {100 * v:+.1f}%" for k, v in r["comparisons"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="beauty", choices=sorted(DATASETS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokenizers", default="rq-kmeans,opq")
    ap.add_argument("--heads", default="fv,ar,parallel")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides (key=value)")
    ap.add_argument("--max-users", type=int, default=None, help="tiny slice for plumbing tests")
    ap.add_argument("--out-root", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--results-dir", default=str(RESULTS))
    a = ap.parse_args()
    r = run(a.dataset, a.seeds, a.tokenizers.split(","), a.heads.split(","), a.set, a.max_users,
            Path(a.out_root), Path(a.results_dir))
    print(markdown(r))


if __name__ == "__main__":
    main()
