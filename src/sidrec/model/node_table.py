"""The centred node table: item vectors stored as one row per trie node.

Item i's vector is the sum of the rows on its root-to-leaf path, e_i = u_root + sum_j u_{n_j(i)}. The
table is kept *centred*: for every node p, sum over its children c of |c| u_c = 0 (|c| = items below c).
Then the mean of the item vectors below any node n is the sum of the rows from the root down to n, so
the AR head's node vectors (its item terms are "the mean item vector below n") need no pass over the
items: between the children of one prefix the rows above them are shared and cancel in the softmax,
so scoring a prefix's children reads only the children's own rows. `from_items` maps free item vectors
to the centred table and back is a lookup: a bijection, so the head's function class is unchanged.

Training reads the table through sparse lookups (the backbone's inputs: an embedding bag over each
item's k + 1 path rows; the AR head: the rows of each target prefix's children), so the gradient has
rows only where it was read, and a row-sparse optimizer (`sidrec.train.sparse`) updates only those.
`recentre_(rows)` then restores the constraint for the sibling groups whose rows changed, bottom-up:
the group's weighted mean moves from the children into the parent (every item vector stays exactly
the same), then the parent's group, up to the root: O(fan-out · d) per changed group, nothing that
visits all N items.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sidrec.model import lowp
from sidrec.tokenize.codebook import Codebook

#: rows per block of the passes over many rows (initialisation, re-centring): temporaries of a few MB,
#: served from the heap (glibc maps every block over 32 MB afresh: a page fault per 4 KB) and kept in cache
ROW_BLOCK = 1 << 14


class NodeTable(nn.Module):
    """rows [R + 1, d]: row 0 the root, then every depth-1 node, ..., every leaf (one per item), then a
    zero padding row; node_bias [R + 1, 1]: the AR head's per-node bias, started at log(items below)."""

    def __init__(self, codebook: Codebook, d: int, init_std: float = 0.02):
        super().__init__()
        trie = codebook.trie
        k, n = trie.depth, codebook.n_items
        if trie.n_nodes(k) != n:
            raise ValueError("a node table needs a bijective codebook (one leaf per item)")
        self.trie, self.n_items, self.dim = trie, n, d
        self.off = self.offsets(trie)  # first row of each depth
        self.pad = self.off[-1]
        paths = np.stack([self.off[j] + trie.item_node[j] for j in range(k + 1)], 1)
        paths = np.vstack([paths, np.full((1, k + 1), self.pad)])  # item id n (padding) -> the zero row
        below = np.concatenate([trie.n_items_below(j) for j in range(k + 1)] + [[0]]).astype(np.float64)
        self.register_buffer("paths", torch.as_tensor(paths, dtype=torch.long), persistent=False)
        self.register_buffer("below", torch.as_tensor(below), persistent=False)
        self.rows = nn.Parameter(torch.zeros(self.pad + 1, d))
        self.node_bias = nn.Parameter(torch.log(self.below.clamp(min=1)).float()[:, None])
        self.sparse = False  # set by the trainer: lookups then give row-sparse gradients
        self._cache = self._narrow = None
        with torch.no_grad():  # item vectors N(0, init_std^2): the leaf rows, then centred in place
            leaves = self.rows[self.depth_slice(k)]
            for lo in range(0, n, ROW_BLOCK):
                leaves[lo:lo + ROW_BLOCK].normal_(0.0, init_std)
            self.recentre_()

    @staticmethod
    def offsets(trie) -> list[int]:
        """The first row of each depth (and, last, the padding row)."""
        return [int(x) for x in np.concatenate([[0], np.cumsum([trie.n_nodes(j) for j in range(trie.depth + 1)])])]

    # -- reading ---------------------------------------------------------------------------------
    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Item vectors [..., d] of item ids (n_items: the padding item, a zero vector)."""
        flat = self.paths[items.reshape(-1)]
        if self._narrow is not None:  # reduced-precision serving: widened rows, summed in float32
            out = self._narrow.gather(flat.reshape(-1)).view(*flat.shape, self.dim).sum(1)
        elif self._sparse():
            out = self._read(self.rows, flat.reshape(-1)).view(*flat.shape, self.dim).sum(1)
        else:
            out = F.embedding_bag(flat, self.rows, mode="sum", padding_idx=self.pad)
        return out.view(*items.shape, self.dim)

    def node_rows(self, depth: int, nodes: torch.Tensor) -> torch.Tensor:
        """The own rows [M, d] of depth-`depth` nodes."""
        return self._read(self.rows, nodes + self.off[depth])

    def node_biases(self, depth: int, nodes: torch.Tensor) -> torch.Tensor:
        return self._read(self.node_bias, nodes + self.off[depth]).squeeze(-1)

    def _read(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """table[ids]. Sparse: each distinct row is read once through a sparse lookup, so the gradient
        holds one row per distinct id (not one per read: children and paths repeat within a batch)."""
        if not self._sparse():
            return torch.index_select(table, 0, ids)
        uniq, inv = torch.unique(ids, return_inverse=True)
        return torch.index_select(F.embedding(uniq, table, sparse=True), 0, inv)

    def depth_slice(self, depth: int) -> slice:
        return slice(self.off[depth], self.off[depth + 1])

    @property
    def weight(self) -> torch.Tensor:
        """All item vectors [N, d] (differentiable; without grad cached until the rows change)."""
        if torch.is_grad_enabled() or self._narrow is not None:  # narrow: no float32 [N, d] copy kept
            return self(torch.arange(self.n_items, device=self.rows.device))
        key = (self.rows.data_ptr(), self.rows._version, str(self.rows.device))
        if self._cache is None or self._cache[0] != key:
            self._cache = None
            self._cache = (key, self(torch.arange(self.n_items, device=self.rows.device)))
        return self._cache[1]

    def node_means(self, depth: int) -> torch.Tensor:
        """[P_depth, d] the sum of the rows from the root to each depth-`depth` node: under the centring
        constraint, the mean item vector below it."""
        trie, u = self.trie, self.rows
        acc = u[:1]
        for j in range(1, depth + 1):
            acc = acc[trie.torch("node_parent", j, u.device)] + u[self.depth_slice(j)]
        return acc

    @torch.no_grad()
    def narrow_(self, precision: str) -> None:
        """Keep the rows in `precision` only (`sidrec.model.lowp`; the float32 rows are freed): for
        serving. The item vectors are then read from the narrow rows; nothing can train or extend
        the table any more (its `rows` parameter is empty)."""
        self._narrow = lowp.LowPrecisionRows(self.rows, precision)
        self.rows = nn.Parameter(self.rows.new_zeros(0, self.dim), requires_grad=False)
        self._cache = None

    @property
    def nbytes(self) -> int:
        """Bytes of the rows (narrow or not) and the node biases."""
        return (self._narrow.nbytes if self._narrow is not None else 0) + self.rows.nbytes + self.node_bias.nbytes

    def _sparse(self) -> bool:
        return self.sparse and torch.is_grad_enabled()

    # -- writing ---------------------------------------------------------------------------------
    def from_items(self, e: torch.Tensor) -> torch.Tensor:
        """The centred rows [R + 1, d] whose path sums are the item vectors `e` [N, d]."""
        trie, k = self.trie, self.trie.depth
        dev, dt = e.device, e.dtype
        means = [None] * (k + 1)
        means[k] = e[trie.torch("leaf_item", None, dev)]
        for j in range(k, 0, -1):  # mean below each depth-(j-1) node from its children's, weighted by size
            w = self.below[self.depth_slice(j)].to(dev, dt)[:, None]
            parent = trie.torch("node_parent", j, dev)
            sums = e.new_zeros(trie.n_nodes(j - 1), e.shape[1]).index_add_(0, parent, means[j] * w)
            means[j - 1] = sums / self.below[self.depth_slice(j - 1)].to(dev, dt)[:, None]
        rows = [means[0]]
        for j in range(1, k + 1):
            rows.append(means[j] - means[j - 1][trie.torch("node_parent", j, dev)])
        return torch.cat([*rows, e.new_zeros(1, e.shape[1])])

    @torch.no_grad()
    def recentre_(self, changed: torch.Tensor | None = None) -> None:
        """Restore the centring constraint after an update of the rows `changed` (row ids; None: all),
        bottom-up, leaving every item vector unchanged (see the module doc)."""
        u, trie = self.rows, self.trie
        dev = u.device
        if changed is None:  # every group: one pass per depth over its rows, in blocks (bounded memory)
            for depth in range(trie.depth, 0, -1):
                rows, parent = u[self.depth_slice(depth)], trie.torch("node_parent", depth, dev)
                w = self.below[self.depth_slice(depth)].to(u.dtype)[:, None]
                up = self.depth_slice(depth - 1)
                mu = u.new_zeros(up.stop - up.start, u.shape[1])
                for lo in range(0, len(rows), ROW_BLOCK):
                    mu.index_add_(0, parent[lo:lo + ROW_BLOCK], rows[lo:lo + ROW_BLOCK] * w[lo:lo + ROW_BLOCK])
                mu /= self.below[up].to(u.dtype)[:, None]
                for lo in range(0, len(rows), ROW_BLOCK):
                    rows[lo:lo + ROW_BLOCK] -= mu[parent[lo:lo + ROW_BLOCK]]
                u[up] += mu
            u[self.pad].zero_()
            return
        changed = changed[(changed > 0) & (changed < self.pad)]
        for depth in range(trie.depth, 0, -1):
            lo, hi = self.off[depth], self.off[depth + 1]
            mine = changed[(changed >= lo) & (changed < hi)] - lo
            if not len(mine):
                continue
            parents = torch.unique(trie.torch("node_parent", depth, dev)[mine])
            group, kids = trie.children(depth - 1, parents)
            kid_rows = kids + lo
            w = self.below[kid_rows].to(u.dtype)[:, None]
            sums = u.new_zeros(len(parents), u.shape[1])
            blocks = range(0, len(kid_rows), ROW_BLOCK)  # bounded temporaries: heap-served, in cache
            for b in blocks:
                sums.index_add_(0, group[b:b + ROW_BLOCK], u[kid_rows[b:b + ROW_BLOCK]] * w[b:b + ROW_BLOCK])
            mu = sums / self.below[parents + self.off[depth - 1]].to(u.dtype)[:, None]
            for b in blocks:
                u.index_add_(0, kid_rows[b:b + ROW_BLOCK], -mu[group[b:b + ROW_BLOCK]])
            u.index_add_(0, parents + self.off[depth - 1], mu)
            changed = torch.cat([changed, parents + self.off[depth - 1]])
        u[self.pad].zero_()

    def extended_rows(self, new: "NodeTable", base_keys: list[np.ndarray]) -> torch.Tensor:
        """The rows of `new`, a table over an extended trie, from this trained one: trained nodes keep
        their rows, a new node gets a zero row, so a new item's vector is the mean of the trained items
        below its deepest trained prefix (the prefix mean) until `set_items_` gives it another."""
        rows = self.rows.detach().new_zeros(new.rows.shape)
        rows[0] = self.rows.detach()[0]
        for depth in range(1, new.trie.depth + 1):
            keys, old_keys = new.trie.keys[depth], base_keys[depth]
            pos = np.searchsorted(old_keys, keys).clip(max=len(old_keys) - 1)
            known = old_keys[pos] == keys
            rows[torch.as_tensor(np.flatnonzero(known)) + new.off[depth]] = \
                self.rows.detach()[torch.as_tensor(pos[known]) + self.off[depth]]
        return rows

    @torch.no_grad()
    def set_items_(self, items: torch.Tensor, vectors: torch.Tensor) -> None:
        """Give `items` exactly the vectors [m, d] through their leaf rows (the rows above stay)."""
        above = self.rows[self.paths[items, :-1]].sum(1)
        self.rows[self.paths[items, -1]] = vectors.to(self.rows.dtype) - above
