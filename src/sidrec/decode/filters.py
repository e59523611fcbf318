"""Per-row item filters applied *inside* decoding: allow lists, deny lists and seen items.

Row r may return item i iff (r has no allow list or i is in it) and i is not excluded for r
(its deny list, its own history when seen items are excluded). A post-filter would return fewer
than k items; instead,

- exact ranking sets the scores of forbidden items to -inf before the top-k;
- beam search never extends a beam into a trie node whose items are all forbidden, so every
  live beam has at least one allowed item below it and the search returns min(k, #allowed)
  allowed items whenever beam >= k.

Rows are stored sparsely (flat (row, item) pairs), so the cost is O(total list length) rather
than O(rows x items): a node is alive for row r iff (allow list) some allowed item lies below it,
or (no allow list) fewer of its items are excluded than lie below it. Both counts are looked up
per depth with one `searchsorted` over sorted (row, node) keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def _pairs(lists: list[np.ndarray | None], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat (row, item) arrays of per-row id lists (None or empty: no pairs), duplicates removed."""
    sizes = np.array([0 if x is None else len(x) for x in lists], dtype=np.int64)
    if len(lists) != n_rows:
        raise ValueError(f"{len(lists)} lists for {n_rows} rows")
    if not sizes.sum():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), sizes)
    items = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists if x is not None and len(x)])
    return rows, items


@dataclass
class ItemFilter:
    """What each of `n_rows` rows may return among `n_items` items (see the module doc).

    has_allow[r]: row r returns only items of its allow list (allow_rows/allow_items, already
    without its excluded items); excl_rows/excl_items: items row r never returns.
    """

    n_rows: int
    n_items: int
    has_allow: np.ndarray
    allow_rows: np.ndarray
    allow_items: np.ndarray
    excl_rows: np.ndarray
    excl_items: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, n_items: int, n_rows: int, *, exclude: list[np.ndarray | None] | None = None,
              allow: list[np.ndarray | None] | None = None) -> "ItemFilter":
        """exclude[r]: items row r must not return (history, deny list); allow[r]: None (every item)
        or the only items row r may return. Ids must lie in [0, n_items) (ValueError otherwise)."""
        er, ei = _pairs(exclude or [None] * n_rows, n_rows)
        return cls._from_pairs(n_items, n_rows, er, ei, allow)

    @classmethod
    def from_padded(cls, n_items: int, items: np.ndarray) -> "ItemFilter":
        """Rows excluding the items of a right-padded [B, L] history matrix (padding = n_items)."""
        rows, cols = np.nonzero(items < n_items)
        return cls._from_pairs(n_items, len(items), rows.astype(np.int64), items[rows, cols].astype(np.int64), None)

    @classmethod
    def _from_pairs(cls, n_items: int, n_rows: int, er: np.ndarray, ei: np.ndarray, allow) -> "ItemFilter":
        ar, ai = _pairs(allow or [None] * n_rows, n_rows)
        if (len(ei) and (ei.min() < 0 or ei.max() >= n_items)) or (len(ai) and (ai.min() < 0 or ai.max() >= n_items)):
            raise ValueError(f"item ids must lie in [0, {n_items})")
        keys = np.unique(er * n_items + ei)
        er, ei = keys // n_items, keys % n_items
        has_allow = np.array([a is not None for a in (allow or [None] * n_rows)], dtype=bool)
        if not len(ai):  # no allow list (the common case): skip the set difference
            return cls(n_rows, n_items, has_allow, ar, ai, er, ei)
        akeys = np.unique(ar * n_items + ai)
        akeys = akeys[~np.isin(akeys, keys, assume_unique=True)]
        return cls(n_rows, n_items, has_allow, akeys // n_items, akeys % n_items, er, ei)

    @property
    def empty(self) -> bool:
        """True when the filter lets every row return every item."""
        return not self.has_allow.any() and not len(self.excl_rows)

    def n_allowed(self) -> np.ndarray:
        """[n_rows] how many items each row may return."""
        n_excl = np.bincount(self.excl_rows, minlength=self.n_rows)
        n_allow = np.bincount(self.allow_rows, minlength=self.n_rows)
        return np.where(self.has_allow, n_allow, self.n_items - n_excl)

    # -- exact ranking ---------------------------------------------------------------------
    def mask_scores(self, s: torch.Tensor) -> torch.Tensor:
        """Scores [n_rows, n_items] with every forbidden item at -inf (in place when possible)."""
        dev = s.device
        if self.has_allow.any():
            keep = torch.zeros(s.shape, dtype=torch.bool, device=dev)
            keep[~torch.from_numpy(self.has_allow).to(dev)] = True
            keep[torch.from_numpy(self.allow_rows).to(dev), torch.from_numpy(self.allow_items).to(dev)] = True
            s = s.masked_fill(~keep, float("-inf"))
        if len(self.excl_rows):
            s[torch.from_numpy(self.excl_rows).to(dev), torch.from_numpy(self.excl_items).to(dev)] = float("-inf")
        return s

    # -- trie nodes (beam search) -------------------------------------------------------------
    def _counts(self, trie, depth: int, which: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted keys row * P_depth + node and how many of the row's `which` items lie below the node."""
        key = (which, depth, str(device))
        if key not in self._cache:
            rows, items = (self.allow_rows, self.allow_items) if which == "allow" else (self.excl_rows, self.excl_items)
            keys = torch.from_numpy(rows * trie.n_nodes(depth) + trie.item_node[depth][items]).to(device)
            self._cache[key] = torch.unique(keys, return_counts=True)  # sorted; one op (np.unique: ~8x slower here)
        return self._cache[key]

    def _lookup(self, trie, depth: int, which: str, rows: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        keys, counts = self._counts(trie, depth, which, nodes.device)
        if not len(keys):
            return torch.zeros_like(nodes)
        want = rows * trie.n_nodes(depth) + nodes
        pos = torch.searchsorted(keys, want).clamp(max=len(keys) - 1)
        return torch.where(keys[pos] == want, counts[pos], torch.zeros_like(pos))

    def alive(self, trie, depth: int, rows: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """Boolean, same shape as `nodes` (depth-`depth` nodes, >= 0) and `rows`: does the row
        have an allowed item below the node? Without allow lists (the common case: seen items and
        deny lists only) one lookup over every node, no masked indexing: a handful of ops per level,
        which is what a request of one user pays. With allow lists only the nodes that could be
        dead are looked up: an allow list's row, or a node with no more items below it than the row
        excludes."""
        dev = nodes.device
        below = trie.torch("items_below", depth, dev)[nodes]
        if not self.has_allow.any():
            return below > self._lookup(trie, depth, "excl", rows, nodes)
        has_allow = self._row_tensor("has_allow", dev)[rows]
        check = has_allow | (below <= self._row_tensor("n_excl", dev)[rows])
        out = torch.ones_like(nodes, dtype=torch.bool)
        r, n = rows[check], nodes[check]
        free = below[check] - self._lookup(trie, depth, "excl", r, n)
        allowed = self._lookup(trie, depth, "allow", r, n)
        out[check] = torch.where(has_allow[check], allowed > 0, free > 0)
        return out

    def _row_tensor(self, name: str, device) -> torch.Tensor:
        """Per row: has_allow, or n_excl (how many items it excludes)."""
        key = (name, str(device))
        if key not in self._cache:
            value = self.has_allow if name == "has_allow" else np.bincount(self.excl_rows, minlength=self.n_rows)
            self._cache[key] = torch.from_numpy(value).to(device)
        return self._cache[key]
