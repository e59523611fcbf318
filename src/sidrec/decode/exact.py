"""Exact ranking: score all N items with the head's exact log-probabilities, then top-K."""

from __future__ import annotations

import torch


@torch.no_grad()
def exact_scores(head, h: torch.Tensor, tables=None) -> torch.Tensor:
    """[B, N] exact log-probabilities (AR heads reuse precomputed trie-node tables if given)."""
    if getattr(head, "kind", "") == "ar":
        return head.log_prob_all(h, tables)
    return head.log_prob_all(h)


@torch.no_grad()
def exact_topk(head, h: torch.Tensor, k: int, tables=None) -> tuple[torch.Tensor, torch.Tensor]:
    s = exact_scores(head, h, tables)
    v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
    return i, v
