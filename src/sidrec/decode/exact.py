"""Exact ranking: score all N items with the head's exact log-probabilities, then top-K."""

from __future__ import annotations

import torch


@torch.no_grad()
def exact_scores(head, h: torch.Tensor, tables=None, normalized: bool = True) -> torch.Tensor:
    """[B, N] exact log-probabilities (AR heads reuse precomputed trie-node tables if given).

    normalized=False may leave out a per-row constant (FV-MLE's and the parallel head's log-partition
    over items): the same ranking for one pass less over [B, N], which is what evaluation needs.
    """
    return head.log_prob_all(h, tables) if normalized else head.rank_scores(h, tables)


@torch.no_grad()
def exact_topk(head, h: torch.Tensor, k: int, tables=None) -> tuple[torch.Tensor, torch.Tensor]:
    s = exact_scores(head, h, tables)
    v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
    return i, v
