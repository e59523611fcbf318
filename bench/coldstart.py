"""Cold start: items never seen in training, added with `items add`, recommended at once (Beauty).

    python -m bench.coldstart                  # 5% of items cold, seed 0

A random `--cold-share` of Beauty's items is removed from every training sequence and from the
tokenizer's fit (the *warm* data: users left with fewer than 3 items are dropped). Trained on it:
AR-NTP on text-derived semantic IDs (a new item gets an ID from its title), AR-NTP on collaborative
IDs (which a new item cannot have), and FV-MLE (no content path). The cold items are then added to
the text-ID run with `Recommender.add_items` (their text embedded by the run's own text model), and
every model is evaluated on the full data's test split (each user's last item, the full history
before it; seen items excluded; full ranking over the model's catalogue): overall, on users whose
test item is cold, and on the rest (warm). A model whose catalogue lacks the cold items cannot rank
them (their targets count as misses) and ignores them in histories. Baselines: the most popular
items of the warm training data, and content-only ranking (cosine similarity of each item's text
embedding to the mean embedding of the history). Reference: AR-NTP on text IDs trained on the full
catalogue, for what the cold items cost the warm ones. Runs are reused when their inputs match.

Every row is measured on the full data's validation split too (each user's second-to-last item from
the history before it: the warm models never trained on it either). How a new item gets its vectors
(`items add --vectors content | prefix-mean`) is chosen there, on overall validation NDCG@10; the
test split decides nothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import common
from bench.common import RESULTS, ROOT, write_result
from bench.quality import prepared, trained
from bench.tables import coldstart_table
from sidrec import io
from sidrec.run import catalog
from sidrec import run as rundir
from sidrec.api import Recommender
from sidrec.config import load_config
from sidrec.data import SequenceData
from sidrec.data.batching import pad_windows
from sidrec.embed import get_embeddings
from sidrec.evaluate import exact_ranks
from sidrec.evaluate.metrics import metrics_from_ranks
from sidrec.pipeline import ensure_codebook, head_config

KEYS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def warm_data(full: SequenceData, cold: np.ndarray, out: Path) -> SequenceData:
    """`full` without the cold items anywhere (users left with < 3 items dropped), saved to `out`."""
    inputs = {"source": rundir.dir_fingerprint(full.path, "data"), "cold#sha256": rundir.array_digest(cold)}
    if rundir.stage_status(out, "data", inputs)[0] == "same":
        return SequenceData.load(out)
    keep_item = np.ones(full.n_items, dtype=bool)
    keep_item[cold] = False
    new_id = np.cumsum(keep_item) - 1  # warm items keep their order (sorted raw ids), ids made contiguous
    user = np.repeat(np.arange(full.n_users), full.lengths)
    ok = keep_item[full.items]
    lengths = np.bincount(user[ok], minlength=full.n_users)
    users = lengths >= 3
    ok &= users[user]
    offsets = np.concatenate([[0], np.cumsum(lengths[users])]).astype(np.int64)
    data = SequenceData(offsets, new_id[full.items[ok]].astype(np.int32), full.user_ids[users],
                        full.item_table[keep_item].reset_index(drop=True),
                        meta={"coldstart": {"from": str(full.path), "cold_items": int(len(cold))}})
    data.save(out, marker=rundir.marker_fields(inputs))
    return SequenceData.load(out)


SPLITS = ("valid", "test")
RULES = {"content": "AR-NTP, text IDs, cold items added (content vectors)",
         "prefix-mean": "AR-NTP, text IDs, cold items added (prefix-mean vectors)"}


def test_cases(full: SequenceData, split: str = "test") -> tuple[list[np.ndarray], np.ndarray]:
    """Each user's `split` history (raw ids of everything before its target) and target (raw id)."""
    raw = full.raw_item_ids()
    ends = full.history_end(split)
    hist = [raw[full.items[full.offsets[u]:ends[u]]] for u in range(full.n_users)]
    return hist, raw[full.items[ends]]


def model_ranks(rec: Recommender, hist: list[np.ndarray], target: np.ndarray, batch: int = 512) -> np.ndarray:
    """Full-ranking rank of each test item under `rec` (seen items excluded); inf when the model's
    catalogue does not hold it. History items it does not hold are left out of its input."""
    n, max_len = rec.model.n_items, rec.model.cfg.backbone.max_len
    idx = [i[i >= 0] for i in (rec.item_index(h) for h in hist)]
    tgt = rec.item_index(target)
    head = rec.model.head
    cache = head.eval_cache(rec.device)
    out = np.full(len(hist), np.inf)
    for s in range(0, len(hist), batch):
        rows = [r for r in range(s, min(s + batch, len(hist))) if len(idx[r])]
        hs = [idx[r] for r in rows]
        counts = np.array([len(h) for h in hs])
        flat = np.concatenate(hs)
        ends = np.cumsum(counts)
        lens = np.minimum(counts, max_len)
        recent = torch.from_numpy(pad_windows(flat, ends - lens, lens, n))
        seen = torch.from_numpy(pad_windows(flat, ends - counts, counts, n))
        with torch.no_grad():
            h = rec.model.encode(recent, torch.from_numpy(lens))
            sc = head.rank_scores(h, cache).float()
            t = torch.from_numpy(np.maximum(tgt[rows], 0))
            r = exact_ranks(sc, t, seen, n).numpy()
        out[rows] = np.where(tgt[rows] >= 0, r, np.inf)
    return out


def baseline_ranks(score_fn, full: SequenceData, split: str = "test", max_len: int = 50, batch: int = 1024) -> np.ndarray:
    """Ranks of the `split` targets under a baseline's scores (seen items excluded). score_fn(users,
    recent [B, <= max_len] most recent history items, right-padded with N) -> [B, N] scores."""
    n, items = full.n_items, full.items.astype(np.int64)
    ends = full.history_end(split)
    starts = full.offsets[:-1]
    out = np.empty(full.n_users)
    for s in range(0, full.n_users, batch):
        u = np.arange(s, min(s + batch, full.n_users))
        recent = torch.from_numpy(pad_windows(items, np.maximum(starts[u], ends[u] - max_len),
                                              np.minimum(ends[u] - starts[u], max_len), n))
        seen = torch.from_numpy(pad_windows(items, starts[u], ends[u] - starts[u], n))
        out[u] = exact_ranks(score_fn(u, recent), torch.from_numpy(items[ends[u]]), seen, n).numpy()
    return out


def popularity_scores(full: SequenceData, warm: SequenceData):
    """Counts in the warm training prefixes, in the full data's ids (cold items: 0); ties by id."""
    user = np.repeat(np.arange(warm.n_users), warm.lengths)
    train = np.arange(warm.n_interactions) < warm.history_end("train")[user]
    counts = np.bincount(warm.items[train], minlength=warm.n_items).astype(np.float64)
    raw = full.raw_item_ids()
    order = np.argsort(raw)
    to_full = order[np.searchsorted(raw[order], warm.raw_item_ids())]
    pop = np.zeros(full.n_items)
    pop[to_full] = counts
    pop = torch.from_numpy(pop - 1e-9 * np.arange(full.n_items))  # strict order: no ties in the target's favour
    return lambda users, hist: pop.expand(len(users), -1)


def content_scores(emb: np.ndarray):
    """Cosine similarity of every item's text embedding to the mean embedding of the history items."""
    e = torch.from_numpy(emb / np.linalg.norm(emb, axis=1, keepdims=True)).float()
    pad = torch.zeros(1, e.shape[1])
    table = torch.cat([e, pad])

    def score(users, recent):
        real = (recent < len(e)).float()
        q = (table[recent] * real[..., None]).sum(1)
        q = q / q.norm(dim=1, keepdim=True).clamp(min=1e-9)
        return q @ e.T

    return score


def split_metrics(ranks: np.ndarray, is_cold: np.ndarray) -> dict:
    out = {}
    for name, mask in (("overall", np.ones_like(is_cold)), ("cold", is_cold), ("warm", ~is_cold)):
        m = metrics_from_ranks(ranks[mask])
        out[name] = {"users": int(mask.sum()), **{k: round(m[k], 5) for k in KEYS}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cold-share", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every run (key=value)")
    ap.add_argument("--max-users", type=int, default=None, help="tiny slice for plumbing tests")
    ap.add_argument("--out-root", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--results-dir", default=str(RESULTS))
    ap.add_argument("--name", default="coldstart-beauty")
    a = common.parse_args(ap)
    t0 = time.perf_counter()
    base = load_config(ROOT / "configs" / "beauty.yaml", a.set)
    work = Path(a.out_root) / ("coldstart" + (f"-slice{a.max_users}" if a.max_users else ""))
    full = prepared("beauty", base, Path(a.out_root) / ("quality-beauty" if not a.max_users else f"coldstart-slice{a.max_users}"),
                    a.max_users)
    rng = np.random.default_rng(a.seed)
    cold = np.sort(rng.choice(full.n_items, int(round(a.cold_share * full.n_items)), replace=False))
    warm = warm_data(full, cold, work / f"warm-seed{a.seed}")
    text = {"tokenizer": {"embeddings": "text"}}

    def cfg_with(over: dict, head: str) -> dict:
        c = copy.deepcopy(base)
        for section, values in over.items():
            c[section].update(values)
        return head_config(c, head)

    runs: dict[str, dict] = {}
    plan = [(RULES["content"], warm, "ar", text, "warm-ar-text", "content"),
            (RULES["prefix-mean"], warm, "ar", text, "warm-ar-text", "prefix-mean"),
            ("AR-NTP, collaborative IDs (no ID for a new item)", warm, "ar", {}, "warm-ar-collab", None),
            ("FV-MLE (no content path)", warm, "fv", {}, "warm-fv", None),
            ("AR-NTP, text IDs, trained on the full catalogue (reference)", full, "ar", text, "full-ar-text", None)]
    cases = {split: test_cases(full, split) for split in SPLITS}
    cold_raw = full.raw_item_ids()[cold]
    is_cold = {split: np.isin(target, cold_raw) for split, (_, target) in cases.items()}
    cold_table = full.item_table.iloc[cold].reset_index(drop=True)
    for label, data, head, over, name, add in plan:
        cfg = cfg_with(over, head)
        run_dir = work / f"seed{a.seed}" / name
        cb = ensure_codebook(cfg, data, run_dir.parent / f"{name}-codebook" / "codebook") if head != "fv" else None
        wall = trained(cfg, data, cb, run_dir)
        report = None
        if add:  # each variant from the catalogue as trained (the run directory is the benchmark's own)
            catalog.clear(run_dir)
            rec = Recommender.load(run_dir, device="cpu")
            info = rec.add_items(cold_table, id_col="item", vectors=add)
            report = {k: info.get(k) for k in ("version", "added", "ids", "seconds", "embed_seconds", "total_seconds",
                                               "item_vectors")}
        else:
            rec = Recommender.load(run_dir, device="cpu")
        per_split = {split: split_metrics(model_ranks(rec, *cases[split]), is_cold[split]) for split in SPLITS}
        runs[label] = {"run": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
                       "train_wall_s": wall, "catalogue_items": int(rec.model.n_items), "add_items": report,
                       **per_split["test"], "valid": per_split["valid"]}
        print(label, runs[label]["overall"], runs[label]["cold"], file=sys.stderr)
    emb = get_embeddings(full, "text", model=base["tokenizer"]["text_model"])
    for label, fn in (("Content only (text neighbours of the history)", content_scores(emb)),
                      ("Most popular (warm training data)", popularity_scores(full, warm))):
        per_split = {split: split_metrics(baseline_ranks(fn, full, split), is_cold[split]) for split in SPLITS}
        runs[label] = {**per_split["test"], "valid": per_split["valid"]}
    chosen = max(RULES, key=lambda rule: (runs[RULES[rule]]["valid"]["overall"]["ndcg@10"], rule == "content"))
    ref = runs["AR-NTP, text IDs, trained on the full catalogue (reference)"]["warm"]["ndcg@10"]
    ours = runs[RULES[chosen]]["warm"]["ndcg@10"]
    res = {"command": "python -m bench.coldstart " + " ".join(sys.argv[1:]), "dataset": "beauty",
           "cold_share": a.cold_share, "seed": a.seed, "cold_items": int(len(cold)), "items": full.n_items,
           "warm_users": warm.n_users, "test_users": full.n_users, "cold_test_users": int(is_cold["test"].sum()),
           "cold_valid_users": int(is_cold["valid"].sum()),
           "vectors_rule": {"chosen": chosen, "on": "overall validation NDCG@10", "row": RULES[chosen]},
           "protocol": "valid and test splits of the full data, full ranking over each model's catalogue, "
                       "seen items excluded",
           "rows": runs, "warm_ndcg10_vs_full_catalogue": round((ours - ref) / ref, 4) if ref > 0 else None,
           "config": {k: v for k, v in base.items() if not k.startswith("_")},
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    path = write_result(a.name, res, Path(a.results_dir))
    io.write_text(path.with_suffix(".md"), coldstart_table(io.read_json(path)))


if __name__ == "__main__":
    main()
