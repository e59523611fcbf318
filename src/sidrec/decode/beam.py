"""Batched trie-constrained beam search for the AR-NTP head.

All users and beams advance together: at level j the [B * W] live prefixes are scored in one
call, invalid continuations are masked with the trie's vectorized mask (constrained mode), and
one `topk` over [B, W * V_j] picks the next beams. Beams are ranked by summed log-probabilities
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
    # constrained: every valid child's score from the head's node tables (cached between weight
    # updates); the unconstrained counter-example scores all V_j tokens
    tables = head.eval_cache(dev) if cons else None
    nodes = torch.zeros(b, 1, dtype=torch.long, device=dev)
    logp = torch.zeros(b, 1, dtype=h.dtype, device=dev)
    codes = torch.zeros(b, 1, 0, dtype=torch.long, device=dev)
    for j, q in enumerate(qs):
        w = nodes.shape[1]
        v = head.sizes[j]
        flat_nodes = nodes.reshape(-1)
        live = flat_nodes >= 0
        if cons:  # -inf off the trie (and for dead beams)
            s = head.child_scores(j, q, flat_nodes, tables)
        else:
            s = head.level_scores(j, q.repeat_interleave(w, 0), codes.reshape(b * w, j), flat_nodes)
        lp = torch.log_softmax(s, -1).nan_to_num(nan=float("-inf"))  # dead beams: all -inf
        if item_filter is not None and not item_filter.empty:  # after normalising: scores stay log Q
            keep = torch.zeros_like(lp, dtype=torch.bool)
            rows = torch.arange(b, device=dev).repeat_interleave(w)
            keep[live] = item_filter.valid_mask(trie, j, flat_nodes[live], rows[live])
            lp = lp.masked_fill(~keep, float("-inf"))
        total = (logp.reshape(-1, 1) + lp).reshape(b, w * v)
        top_lp, top_i = torch.topk(total, min(beam, w * v), dim=1)
        parent_beam, tok = top_i // v, top_i % v
        parent_nodes = torch.gather(nodes, 1, parent_beam)
        child = torch.full_like(parent_nodes, -1)
        ok = parent_nodes >= 0
        child[ok] = trie.child(j, parent_nodes[ok], tok[ok])
        nodes, logp = child, top_lp
        codes = torch.cat([torch.gather(codes, 1, parent_beam[..., None].expand(-1, -1, j)), tok[..., None]], 2)
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
