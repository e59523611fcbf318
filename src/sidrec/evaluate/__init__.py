"""Evaluation: full-ranking leave-one-out metrics with exact ranking or beam search."""

from __future__ import annotations

import numpy as np
import torch

from sidrec.data.batching import eval_batches, seen_items
from sidrec.data.prepare import SequenceData
from sidrec.decode.beam import beam_search
from sidrec.decode.filters import ItemFilter
from sidrec.decode.exact import exact_scores
from sidrec.evaluate.metrics import metrics_from_ranks, ranks_in_lists

LIST_K = 20


def _history_mask(items: torch.Tensor, pad_id: int, n_items: int) -> torch.Tensor:
    """[B, N] True where the item occurs in the user's input history."""
    m = torch.zeros(items.shape[0], n_items + 1, dtype=torch.bool, device=items.device)
    m.scatter_(1, items, True)
    return m[:, :n_items]


def exact_ranks(s: torch.Tensor, tgt: torch.Tensor, history: torch.Tensor | None, pad_id: int) -> torch.Tensor:
    """1 + the number of items scored above the target [B] (inf if the target cannot be ranked).

    With a history [B, L], its items leave the ranking (and a target among them gets rank inf). They are
    subtracted from the count rather than masked out of s: L gathers instead of a pass over [B, N]."""
    ts = s.gather(1, tgt[:, None])
    above = (s > ts).sum(1, dtype=torch.int32)
    ok = torch.isfinite(ts.squeeze(1))
    if history is not None:
        hist, _ = torch.sort(history, 1)
        real = hist != pad_id
        real[:, 1:] &= hist[:, 1:] != hist[:, :-1]  # each distinct history item once
        above -= ((s.gather(1, hist.clamp(max=s.shape[1] - 1)) > ts) & real).sum(1, dtype=torch.int32)
        ok &= ~((hist == tgt[:, None]) & real).any(1)
    r = above.double() + 1
    return torch.where(ok, r, torch.full_like(r, float("inf")))


@torch.no_grad()
def evaluate_split(
    model, data: SequenceData, split: str, *, decode: str = "exact", beam: int = 20, batch_size: int = 512,
    exclude_seen: bool = False, device: str | torch.device = "cpu", users: np.ndarray | None = None,
    return_lists: bool = False,
) -> dict:
    """Recall@{1,5,10,20}, NDCG@{5,10,20}, MRR of the held-out item for every user of a split.

    exact: all N items are scored exactly and the target's full rank is used.
    beam: the top-20 list of beam search is used (MRR is then truncated at 20).
    exclude_seen: remove every item of the user's history from the ranking (the whole history, not
    only the max_len window the model reads; off by default; with repeat consumption it can remove
    the target itself).
    """
    model.eval()
    head = model.head
    if decode == "beam" and not head.supports_beam:
        raise ValueError("beam search needs an auto-regressive head; use decode='exact'")
    max_len = model.cfg.backbone.max_len
    targets_all = data.targets(split)
    tables = head.eval_cache(device)
    ranks, lists, order, n_invalid = [], [], [], 0
    for u, items, lengths in eval_batches(data, split, max_len, batch_size, users):
        items, lengths = items.to(device), lengths.to(device)
        h = model.encode(items, lengths)
        tgt = torch.from_numpy(targets_all[u].astype(np.int64)).to(device)
        seen = seen_items(data, split, u).to(device) if exclude_seen else None
        if decode == "exact":
            s = exact_scores(head, h, tables, normalized=False).float()  # ranks need no normaliser
            r = exact_ranks(s, tgt, seen, data.n_items)
            if return_lists:  # training's per-epoch validation needs ranks only
                if exclude_seen:
                    s = s.masked_fill(_history_mask(seen, data.n_items, data.n_items), float("-inf"))
                lists.append(torch.topk(s, min(LIST_K, s.shape[1]), dim=1).indices.cpu().numpy())
            ranks.append(r.cpu().numpy())
        else:
            filt = None
            if exclude_seen:  # seen items are masked inside the search, as `recommend` and the server do
                filt = ItemFilter.from_padded(data.n_items, seen.cpu().numpy())
            res = beam_search(head, h, beam=beam, k=min(beam, LIST_K), item_filter=filt)
            n_invalid += res.n_invalid
            top = res.items
            ranks.append(ranks_in_lists(top.cpu().numpy(), tgt.cpu().numpy()))
            lists.append(top.cpu().numpy())
        order.append(u)
    order = np.concatenate(order)
    ranks_arr = np.concatenate(ranks)
    out = metrics_from_ranks(ranks_arr)
    out["n_users"] = int(len(order))
    if decode == "beam":
        out["beam"] = beam
        out["invalid_ids"] = n_invalid
    if return_lists:
        lists_arr = np.concatenate([np.pad(x, ((0, 0), (0, LIST_K - x.shape[1])), constant_values=-1)
                                    for x in lists])
        srt = np.argsort(order)
        out["_lists"] = lists_arr[srt]
        out["_users"] = order[srt]
        out["_ranks"] = ranks_arr[srt]
    return out


@torch.no_grad()
def mix_curve(model, data: SequenceData, grid: list[float], *, split: str = "valid", exclude_seen: bool = False,
              batch_size: int = 1024, device: str | torch.device = "cpu") -> dict:
    """Metrics of a joint head's exact ranking at every mixture weight of `grid` (one encoding and one
    AR and FV scoring per batch, shared by all weights): {mix: metrics}."""
    model.eval()
    head = model.head
    tables = head.ar.eval_cache(device)
    targets_all = data.targets(split)
    ranks: dict[float, list[np.ndarray]] = {m: [] for m in grid}
    for u, items, lengths in eval_batches(data, split, model.cfg.backbone.max_len, batch_size):
        items, lengths = items.to(device), lengths.to(device)
        h = model.encode(items, lengths)
        tgt = torch.from_numpy(targets_all[u].astype(np.int64)).to(device)
        ar, fv = head.ar.log_prob_all(h, tables).float(), head.fv.logits(h).float()
        seen = seen_items(data, split, u).to(device) if exclude_seen else None
        for m in grid:
            r = exact_ranks((1 - m) * ar + m * fv, tgt, seen, data.n_items)
            ranks[m].append(r.cpu().numpy())
    return {m: metrics_from_ranks(np.concatenate(r)) for m, r in ranks.items()}


def validator(data: SequenceData, *, exclude_seen: bool = False, batch_size: int = 1024, n_users: int = 0,
              seed: int = 0):
    """The per-epoch validation a Trainer selects checkpoints with: exact full ranking on the valid
    split (on a fixed random subset of `n_users` users when 0 < n_users < all)."""
    users = None
    if n_users and n_users < data.n_users:
        users = np.sort(np.random.default_rng(seed).choice(data.n_users, n_users, replace=False))

    def validate(model) -> dict:
        device = next(model.parameters()).device
        return evaluate_split(model, data, "valid", batch_size=batch_size, device=device, users=users,
                              exclude_seen=exclude_seen)

    return validate


def popularity_ranking(data: SequenceData, split: str) -> dict:
    """Metrics of ranking every item by its count in the training prefixes (a sanity baseline;
    full ranking, same protocol as the models)."""
    counts = data.train_target_counts().astype(np.float64)
    order = np.argsort(-counts, kind="stable")
    rank_of = np.empty(data.n_items, dtype=np.float64)
    rank_of[order] = np.arange(1, data.n_items + 1)
    out = metrics_from_ranks(rank_of[data.targets(split)])
    out["n_users"] = data.n_users
    return out


def overlap_at(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean |top-k(a) ∩ top-k(b)| / k over users (lists aligned by user)."""
    aa, bb = a[:, :k], b[:, :k]
    inter = ((aa[:, :, None] == bb[:, None, :]) & (aa[:, :, None] >= 0)).any(-1).sum(1)
    return float(np.mean(inter / k))
