"""Batched trie-constrained beam search for the AR-NTP head.

All users and beams advance together: at level j the real children of the [B * W] live prefixes
are scored as one flat list (constrained mode; the unconstrained counter-example scores every
token), and one `topk` over [B, W * F_j] slots (F_j: the level's widest sibling group; at least
min(beam, W * V_j) wide) picks the next beams. Beams are ranked by summed log-probabilities
(never multiplied probabilities, which underflow) and chosen deterministically (top-k, no sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sidrec.decode.filters import ItemFilter


@dataclass
class BeamResult:
    items: torch.Tensor  # [B, K] item ids, -1 where the ID is invalid or the beam is empty
    log_probs: torch.Tensor  # [B, K] exact log Q of each returned ID (summed token log-probs)
    n_invalid: int  # generated IDs that map to no item (0 in constrained mode)


@torch.no_grad()
def beam_search(head, h: torch.Tensor, beam: int = 20, k: int = 10, constrained: bool | None = None,
                item_filter: ItemFilter | None = None) -> BeamResult:
    """Top-k items by beam search (beam width `beam` >= k).

    `constrained=None` follows the head's own normalisation. In constrained mode every returned
    ID is a valid item; unconstrained mode can generate invalid IDs and counts them.
    `item_filter` (constrained mode): per-row allow/deny/seen restrictions, applied by masking trie
    nodes with no allowed item below, so min(k, #allowed) allowed items come back.
    """
    if k > beam:
        raise ValueError(f"k={k} needs a beam of at least k (got {beam})")
    outer, head = head, head.proposer()  # e.g. a joint AR + FV head: its AR part proposes, it rescores
    if head is None:
        raise ValueError("beam search needs a head that decodes level by level (an AR-NTP head)")
    if item_filter is not None and not item_filter.empty and not (head.constrained if constrained is None else constrained):
        raise ValueError("item filters need constrained decoding")
    trie = head.trie
    cons = head.constrained if constrained is None else constrained
    b, dev = h.shape[0], h.device
    qs = head.contexts(h)
    # constrained: the live beams' real children, scored from the head's node tables (cached between
    # weight updates) as one flat list; the unconstrained counter-example scores all V_j tokens
    tables = head.eval_cache(dev) if cons else None
    nodes = torch.zeros(b, 1, dtype=torch.long, device=dev)
    logp = torch.zeros(b, 1, dtype=h.dtype, device=dev)
    codes = torch.zeros(b, 1, 0, dtype=torch.long, device=dev)
    for j, q in enumerate(qs):
        if cons:  # the node each candidate slot reaches is recorded while scoring
            total, child_at = _constrained_step(head, trie, j, q, nodes, logp, tables, item_filter)
            width = min(beam, nodes.shape[1] * head.sizes[j])  # as wide as over every token: dead beams pad it
            if total.shape[1] < width:
                total = torch.nn.functional.pad(total, (0, width - total.shape[1]), value=float("-inf"))
                child_at = torch.nn.functional.pad(child_at, (0, width - child_at.shape[1]), value=-1)
            top_lp, top_i = torch.topk(total, width, dim=1)
            child = torch.gather(child_at, 1, top_i)
        else:
            v = head.sizes[j]
            total = _free_step(head, trie, j, q, nodes, logp, codes)
            top_lp, top_i = torch.topk(total, min(beam, total.shape[1]), dim=1)
            parent_beam, tok = top_i // v, top_i % v
            parent_nodes = torch.gather(nodes, 1, parent_beam)
            child = torch.full_like(parent_nodes, -1)
            ok = parent_nodes >= 0
            child[ok] = trie.child(j, parent_nodes[ok], tok[ok])
            codes = torch.cat([torch.gather(codes, 1, parent_beam[..., None].expand(-1, -1, j)), tok[..., None]], 2)
        nodes, logp = child, top_lp
    leaf_item = trie.torch("first_item", trie.depth, dev)
    valid = (nodes >= 0) & torch.isfinite(logp)
    items = torch.where(valid, leaf_item[nodes.clamp(min=0)], torch.full_like(nodes, -1))
    n_invalid = int(((nodes[:, :k] < 0) & torch.isfinite(logp[:, :k])).sum())
    if outer is not head:  # rescore every beam candidate with the outer head, then keep the top k
        logp = torch.where(valid, outer.rescore(h, items, logp), logp)
        logp, order = torch.sort(logp, dim=1, descending=True, stable=True)
        items = torch.gather(items, 1, order)
    kk = min(k, items.shape[1])
    return BeamResult(items[:, :kk], logp[:, :kk], n_invalid)


def _constrained_step(head, trie, j: int, q: torch.Tensor, nodes: torch.Tensor, logp: torch.Tensor, tables,
                      item_filter: ItemFilter | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Level j of constrained search on the flat list of the live beams' real children (no dense
    [B * W, V_j] scores over every token): each child's log P(token | prefix), placed in a [B * W, F_j]
    grid (F_j the widest sibling group of the level; slot: the child's place among its siblings, which
    are in token order), normalised over its siblings by one logsumexp per row, filtered after
    normalising (scores stay log Q) and added to its beam's log Q: [B, W * F_j] for the top-k. Also
    returns the node each slot reaches (-1: none). Few ops per level: a request of one user pays
    for each op, not for its size."""
    b, w = nodes.shape
    v = trie.max_children(j)
    flat_nodes = nodes.reshape(-1)
    rows, child = trie.children(j, flat_nodes)  # dead beams (-1) have none
    s = head.child_logits(j, q, rows, child, w, tables)
    slot = rows * v + child - trie.torch("child_ptr", j, q.device)[flat_nodes[rows]]
    grid = s.new_full((b * w * v,), float("-inf")).index_copy_(0, slot, s).view(b * w, v)
    lse = torch.logsumexp(grid, 1)  # -inf for a beam with no children (dead)
    if item_filter is not None and not item_filter.empty:
        keep = item_filter.alive(trie, j + 1, torch.div(rows, w, rounding_mode="floor"), child)
        grid = grid.view(-1).index_copy_(0, slot, s.masked_fill(~keep, float("-inf"))).view(b * w, v)
    base = (logp.reshape(-1) - lse).nan_to_num_(nan=float("-inf"), neginf=float("-inf"))  # dead beam: -inf - -inf
    total = grid.add_(base[:, None])
    child_at = torch.full((b * w * v,), -1, dtype=torch.long, device=q.device).index_copy_(0, slot, child)
    return total.view(b, w * v), child_at.view(b, w * v)


def _free_step(head, trie, j: int, q: torch.Tensor, nodes: torch.Tensor, logp: torch.Tensor,
               codes: torch.Tensor) -> torch.Tensor:
    """Level j of the unconstrained counter-example: every V_j token after every beam, off the trie too."""
    b, w = nodes.shape
    s = head.level_scores(j, q.repeat_interleave(w, 0), codes.reshape(b * w, j), nodes.reshape(-1))
    lp = torch.log_softmax(s, -1).nan_to_num(nan=float("-inf"))  # dead beams: all -inf
    return (logp.reshape(-1, 1) + lp).reshape(b, w * s.shape[1])
