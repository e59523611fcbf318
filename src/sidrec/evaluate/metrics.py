"""Full-ranking leave-one-out metrics from the rank of each user's held-out item.

rank is 1-based; rank = inf when the item is not in a (beam) list. With one relevant item,
Recall@K (= hit rate) is [rank <= K], NDCG@K is 1 / log2(rank + 1) when rank <= K, MRR is 1/rank.
"""

from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)


def metrics_from_ranks(ranks: np.ndarray, recall_ks=RECALL_KS, ndcg_ks=NDCG_KS) -> dict[str, float]:
    r = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in recall_ks:
        out[f"recall@{k}"] = float(np.mean(r <= k))
    for k in ndcg_ks:
        out[f"ndcg@{k}"] = float(np.mean(np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)))
    out["mrr"] = float(np.mean(np.where(np.isfinite(r), 1.0 / r, 0.0)))
    return out


def ranks_in_lists(topk: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based position of each target in its top-K list, inf when absent."""
    hit = topk == targets[:, None]
    pos = np.argmax(hit, axis=1).astype(np.float64) + 1
    return np.where(hit.any(1), pos, np.inf)
