"""Where two trained runs differ, level by level of a semantic-ID trie.

Any model that scores all N items (FV-MLE, AR-NTP, the parallel head) defines a distribution Q over
items, and a trie of k-token IDs splits -log Q(i*) exactly into k conditional terms

    -log Q(i*) = sum_j -log Q(n_j(i*) | n_<j(i*)),   Q(n) = sum of Q(i) over the items below node n,

so FV-MLE and AR-NTP can be compared on the same footing: which level of the ID costs each of them
likelihood. Ranking quality is not likelihood, so the comparison also swaps levels: the hybrid
"A to depth j, then B" is Q_A(n_j(i)) * Q_B(i | n_j(i)), a proper distribution whose ranking metrics
say how much of the gap lies in the first j tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sidrec.data.batching import eval_batches, seen_items
from sidrec.decode.exact import exact_scores
from sidrec.evaluate import exact_ranks
from sidrec.evaluate.metrics import metrics_from_ranks
from sidrec.model.heads import segment_logsumexp
from sidrec.tokenize.codebook import Trie


def node_log_marginals(logq: torch.Tensor, trie: Trie) -> list[torch.Tensor]:
    """log Q(node) of every trie node, per depth j = 1..k: [B, P_j] each (logq [B, N] normalised)."""
    return [segment_logsumexp(logq, trie.torch("item_node", j, logq.device), trie.n_nodes(j))
            for j in range(1, len(trie.item_node))]


def level_nll(logq: torch.Tensor, trie: Trie, targets: torch.Tensor,
              marginals: list[torch.Tensor] | None = None) -> torch.Tensor:
    """[B, k]: -log Q(n_j | n_<j) of the target's depth-j node; the row sums are -log Q(target).
    `marginals`: node_log_marginals(logq, trie), if already computed."""
    marginals = marginals or node_log_marginals(logq, trie)
    on_path = [m.gather(1, trie.torch("item_node", j + 1, logq.device)[targets][:, None]).squeeze(1)
               for j, m in enumerate(marginals)]
    cum = torch.stack([torch.zeros_like(on_path[0]), *on_path], 1)
    return -(cum[:, 1:] - cum[:, :-1])


def hybrid(logq_top: torch.Tensor, logq_rest: torch.Tensor, trie: Trie, depth: int,
           marginals: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> torch.Tensor:
    """log of Q_top(n_depth(i)) * Q_rest(i | n_depth(i)) for all items [B, N]. `marginals`: both
    models' node_log_marginals, if already computed."""
    node = trie.torch("item_node", depth, logq_top.device)
    m_top, m_rest = marginals or (node_log_marginals(logq_top, trie), node_log_marginals(logq_rest, trie))
    return m_top[depth - 1][:, node] + logq_rest - m_rest[depth - 1][:, node]


def _trie_of(models: list, runs: list[str]) -> Trie:
    from sidrec.errors import UserError

    cbs = [(m.head.codebook, r) for m, r in zip(models, runs)]
    cbs = [(c, r) for c, r in cbs if c is not None]
    if not cbs:
        raise UserError("compare needs at least one run with semantic IDs (an AR-NTP run) for the trie", runs[0])
    if len(cbs) == 2 and not np.array_equal(cbs[0][0].codes, cbs[1][0].codes):
        raise UserError("the two runs use different semantic IDs; compare them on one codebook", cbs[1][1])
    return cbs[0][0].trie


def compare_runs(run_a: str | Path, run_b: str | Path, split: str = "valid", exclude_seen: bool | None = None,
                 batch_size: int = 512, users: np.ndarray | None = None) -> dict:
    """Per-level NLL of both runs and ranking metrics of A, B, the level-swapped hybrids and the
    geometric mean of the two (an ensemble, for scale: not a single model)."""
    from sidrec.errors import UserError
    from sidrec.run import RunDir

    (a, cfg_a), (b, cfg_b) = RunDir.open(run_a).load_model(), RunDir.open(run_b).load_model()
    if RunDir(run_a).data_dir(cfg_a).resolve() != RunDir(run_b).data_dir(cfg_b).resolve() or a.n_items != b.n_items:
        raise UserError("the two runs were trained on different data directories", str(run_b))
    trie = _trie_of([a, b], [str(run_a), str(run_b)])
    k = len(trie.item_node) - 1
    data = RunDir(run_a).data(cfg_a)
    if exclude_seen is None:
        exclude_seen = bool(cfg_a["eval"].get("exclude_seen", False))
    names = ["A", "B", *[f"A{j}+B" for j in range(1, k)], *[f"B{j}+A" for j in range(1, k)], "ensemble"]
    ranks = {n: [] for n in names}
    nll = {"A": [], "B": []}
    targets = data.targets(split)
    max_len = min(a.cfg.backbone.max_len, b.cfg.backbone.max_len)
    with torch.no_grad():
        for u, items, lengths in eval_batches(data, split, max_len, batch_size, users):
            tgt = torch.from_numpy(targets[u].astype(np.int64))
            la = exact_scores(a.head, a.encode(items, lengths), None, normalized=True).float()
            lb = exact_scores(b.head, b.encode(items, lengths), None, normalized=True).float()
            ma, mb = node_log_marginals(la, trie), node_log_marginals(lb, trie)  # once per batch and model
            nll["A"].append(level_nll(la, trie, tgt, ma))
            nll["B"].append(level_nll(lb, trie, tgt, mb))
            scores = {"A": la, "B": lb, "ensemble": (la + lb) / 2}
            for j in range(1, k):
                scores[f"A{j}+B"], scores[f"B{j}+A"] = hybrid(la, lb, trie, j, (ma, mb)), hybrid(lb, la, trie, j, (mb, ma))
            hist = seen_items(data, split, u) if exclude_seen else None
            for n, s in scores.items():
                ranks[n].append(exact_ranks(s, tgt, hist, data.n_items).numpy())
    level = {n: torch.cat(v).mean(0).tolist() for n, v in nll.items()}
    return {
        "kind": "sidrec-compare", "runs": {"A": str(run_a), "B": str(run_b)}, "split": split, "exclude_seen": exclude_seen,
        "n_users": int(sum(len(r) for r in ranks["A"])), "levels": k,
        "level_nll": {n: {"per_level": [round(x, 4) for x in v], "total": round(sum(v), 4)} for n, v in level.items()},
        "ranking": {n: metrics_from_ranks(np.concatenate(r)) for n, r in ranks.items()},
    }


def format_comparison(res: dict) -> str:
    """A short text table of compare_runs' result."""
    lines = [f"A = {res['runs']['A']}", f"B = {res['runs']['B']}",
             f"{res['split']} split, {res['n_users']} users, seen {'excluded' if res['exclude_seen'] else 'kept'}",
             "", "NLL per level (-log Q(node_j | node_<j)):"]
    for n, v in res["level_nll"].items():
        lines.append(f"  {n}: " + "  ".join(f"{x:.4f}" for x in v["per_level"]) + f"   total {v['total']:.4f}")
    lines += ["", "ranking (Aj+B: A's marginal over depth-j nodes, B's conditional below; ensemble: mean log Q):"]
    for n, m in res["ranking"].items():
        lines.append(f"  {n:<9} Recall@10 {m['recall@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}")
    return "\n".join(lines)
