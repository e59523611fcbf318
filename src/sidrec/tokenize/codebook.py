"""`Codebook`: the item <-> k-token semantic-ID map, its prefix trie as flat arrays, and I/O.

Trie layout. Depth-j nodes are the distinct ID prefixes of length j (depth 0: the root; depth
k: the full IDs). Nodes of each depth are sorted by their mixed-radix key, so the children of a
depth-j node form one contiguous, token-sorted block of depth-(j+1) nodes:

    child_ptr[j][p] : child_ptr[j][p+1]   the depth-(j+1) children of depth-j node p
    node_tok[j+1][c]                      the token that leads to child c
    node_parent[j+1][c]                   its parent (a depth-j node)
    item_node[j][i]                       the depth-j node on item i's path (teacher forcing)

A batch of prefixes therefore gets its mask of valid next tokens in one vectorized scatter, and
moving down the trie is one `searchsorted` on the sorted keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sidrec import io
from sidrec.errors import UserError


def mixed_radix(codes: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Encode [n, j] token rows as int64 keys (row-major mixed radix)."""
    key = np.zeros(len(codes), dtype=np.int64)
    for j in range(codes.shape[1]):  # in place: no [n] temporaries beyond the key (10^8-item catalogues)
        key *= int(sizes[j])
        key += codes[:, j]
    return key


@dataclass
class Trie:
    """Flat-array prefix trie (see module docstring); numpy arrays plus lazily built torch copies."""

    sizes: list[int]
    keys: list[np.ndarray]  # keys[j]: sorted keys of depth-j nodes
    child_ptr: list[np.ndarray]  # for j < k: [P_j + 1]
    node_tok: list[np.ndarray]  # for j >= 1: [P_j]
    node_parent: list[np.ndarray]  # for j >= 1: [P_j]
    item_node: np.ndarray  # [k + 1, N]
    first_item: list[np.ndarray]  # first_item[j]: [P_j] the lowest item id under each depth-j node
    _t: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, codes: np.ndarray, sizes: list[int]) -> "Trie":
        n, k = codes.shape
        keys, ptrs, toks, parents = [np.zeros(1, np.int64)], [], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        firsts = [np.zeros(1, np.int64)]
        item_node = np.zeros((k + 1, n), dtype=np.int64)
        for j in range(1, k + 1):
            key_j = mixed_radix(codes[:, :j], sizes)
            uniq, first, inv = np.unique(key_j, return_index=True, return_inverse=True)
            keys.append(uniq)
            firsts.append(first.astype(np.int64))
            item_node[j] = inv
            # parent of each depth-j node = the depth-(j-1) node of the first item below it
            parent = item_node[j - 1][first]
            toks.append(codes[first, j - 1].astype(np.int64))
            parents.append(parent)
            ptrs.append(np.searchsorted(parent, np.arange(len(keys[j - 1]) + 1)).astype(np.int64))
        return cls(list(sizes), keys, ptrs, toks, parents, item_node, firsts)

    @property
    def leaf_item(self) -> np.ndarray:
        """[P_k] the item of each leaf (the first one, if a codebook allows collisions)."""
        return self.first_item[-1]

    @property
    def depth(self) -> int:
        return len(self.sizes)

    def n_nodes(self, j: int) -> int:
        return len(self.keys[j])

    def n_items_below(self, j: int) -> np.ndarray:
        """[P_j] how many items lie below each depth-j node (1 at the leaves of a bijection)."""
        return np.bincount(self.item_node[j], minlength=self.n_nodes(j))

    def max_children(self, j: int) -> int:
        """The largest number of children of a depth-j node (the widest sibling group below depth j;
        cached: beam search asks at every level of every call)."""
        key = ("max_children", j)
        if key not in self._t:
            self._t[key] = int(np.diff(self.child_ptr[j]).max(initial=0))
        return self._t[key]

    @property
    def items_below(self) -> list[np.ndarray]:
        """n_items_below for every depth (what `torch("items_below", j)` caches)."""
        return [self.n_items_below(j) for j in range(self.depth + 1)]

    def torch(self, name: str, j: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Cached torch copy of a trie array on `device`."""
        key = (name, j, str(device))
        if key not in self._t:
            arr = getattr(self, name) if j is None else getattr(self, name)[j]
            self._t[key] = torch.as_tensor(np.ascontiguousarray(arr)).to(device)
        return self._t[key]

    def sibling_groups(self, j: int, device) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Depth-j nodes grouped by their number of children L: (nodes, their children flattened
        [n_L * L], L). Children of a node are contiguous, so a group is a dense [n_L, L] block and
        a per-node reduction over children is one dense reduction per distinct L (cached)."""
        key = ("groups", j, str(device))
        if key not in self._t:
            ptr = self.child_ptr[j]
            lengths = np.diff(ptr)
            groups = []
            for n_children in np.unique(lengths):
                nodes = np.flatnonzero(lengths == n_children)
                kids = (ptr[nodes][:, None] + np.arange(n_children)[None, :]).ravel()
                groups.append((torch.as_tensor(nodes).to(device), torch.as_tensor(kids).to(device), int(n_children)))
            self._t[key] = groups
        return self._t[key]

    def children(self, j: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The children of depth-j `nodes` [M] as a flat ragged list: (row of each child in `nodes`,
        its depth-(j+1) node id), in row order. Rows with node -1 (dead beams) have none. Only real
        children are listed (no padding to the largest fan-out), so work is proportional to them."""
        dev = nodes.device
        start = self.torch("child_ptr", j, dev)[nodes]  # node -1 reads the last entry: any start will do
        counts = self.torch("n_children", j, dev)[nodes]  # ... and its last entry is 0: no children
        rows = torch.repeat_interleave(counts)
        first = (start - torch.cumsum(counts, 0) + counts)[rows]
        return rows, first + torch.arange(len(rows), device=dev)

    @property
    def n_children(self) -> list[np.ndarray]:
        """Per depth j < depth: the number of children of each depth-j node, then a 0, which is what
        node -1 (a dead beam) reads."""
        return [np.append(np.diff(ptr), 0) for ptr in self.child_ptr]

    def valid_mask(self, j: int, nodes: torch.Tensor) -> torch.Tensor:
        """Boolean [B, V_j]: which tokens extend each depth-j prefix node to a valid prefix."""
        rows, child = self.children(j, nodes)
        mask = torch.zeros(len(nodes), self.sizes[j], dtype=torch.bool, device=nodes.device)
        mask[rows, self.torch("node_tok", j + 1, nodes.device)[child]] = True
        return mask

    def child(self, j: int, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Depth-(j+1) node reached from depth-j `nodes` by `tokens`; -1 where that prefix is invalid."""
        dev = nodes.device
        keys = self.torch("keys", j + 1, dev)
        parent_keys = self.torch("keys", j, dev)
        want = parent_keys[nodes] * self.sizes[j] + tokens
        pos = torch.searchsorted(keys, want).clamp(max=len(keys) - 1)
        return torch.where(keys[pos] == want, pos, torch.full_like(pos, -1))


class Codebook:
    """A semantic-ID codebook: codes[N, k] with per-level vocabulary sizes.

    It refuses to be built non-bijective unless `allow_collisions=True` (needed only to build the
    verifier's counter-examples): AR-NTP equals full-vocabulary MLE only for an injective map.
    """

    def __init__(self, codes: np.ndarray, sizes: list[int], *, allow_collisions: bool = False,
                 meta: dict | None = None, extras: dict[str, np.ndarray] | None = None):
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] == 0:
            raise ValueError(f"codes must be a non-empty [N, k] array, got shape {codes.shape}")
        sizes = [int(s) for s in sizes]
        if len(sizes) != codes.shape[1]:
            raise ValueError(f"{len(sizes)} sizes for {codes.shape[1]} levels")
        if codes.min() < 0 or np.any(codes.max(0) >= np.array(sizes)):
            raise ValueError("a code is outside its level's vocabulary")
        if float(np.prod(np.array(sizes, dtype=np.float64))) >= 2**62:
            raise ValueError("ID space too large for int64 keys")
        self.codes = codes.astype(np.int64)
        self.sizes = sizes
        self.keys = mixed_radix(self.codes, sizes)
        self._order = np.argsort(self.keys, kind="stable")
        self._sorted_keys = self.keys[self._order]
        n_unique = len(np.unique(self.keys))
        self.n_collisions = self.n_items - n_unique
        self.bijective = self.n_collisions == 0
        if not self.bijective and not allow_collisions:
            raise ValueError(
                f"codebook is not bijective: {self.n_collisions} items share an ID with another item "
                "(resolve collisions, or pass allow_collisions=True for a deliberate counter-example)"
            )
        self.meta = dict(meta or {})
        self.extras = dict(extras or {})
        self.trie = Trie.build(self.codes, sizes)

    @property
    def n_items(self) -> int:
        return len(self.codes)

    @property
    def levels(self) -> int:
        return len(self.sizes)

    def encode(self, items) -> np.ndarray:
        return self.codes[np.asarray(items, dtype=np.int64)]

    def decode(self, codes) -> np.ndarray:
        """Item id for each k-token row; -1 for an ID that belongs to no item (or is malformed)."""
        codes = np.atleast_2d(np.asarray(codes, dtype=np.int64))
        ok = (codes.shape[1] == self.levels) and np.all((codes >= 0) & (codes < np.array(self.sizes)), axis=1)
        out = np.full(len(codes), -1, dtype=np.int64)
        if codes.shape[1] != self.levels:
            return out
        key = mixed_radix(np.where(ok[:, None], codes, 0), self.sizes)
        pos = np.searchsorted(self._sorted_keys, key).clip(max=self.n_items - 1)
        hit = ok & (self._sorted_keys[pos] == key)
        out[hit] = self._order[pos[hit]]
        return out

    def extend(self, new_codes: np.ndarray, meta: dict | None = None) -> "Codebook":
        """A codebook with `new_codes` [m, k] appended as items N..N+m-1 (existing codes unchanged;
        refused if the result is not bijective). The fitted parameters travel with it."""
        codes = np.concatenate([self.codes, np.asarray(new_codes, dtype=np.int64).reshape(-1, self.levels)])
        return Codebook(codes, self.sizes, meta={**self.meta, **(meta or {})}, extras=self.extras)

    def diagnostics(self) -> dict:
        return codebook_diagnostics(self.codes, self.sizes)

    def save(self, out: str | Path, marker: dict | None = None) -> None:
        """codebook.npz (codes + fitted arrays) and codebook.json (metadata, diagnostics); no pickle.
        An existing `out` is replaced only if it is a sidrec codebook directory (see `sidrec.io`)."""
        with io.atomic_dir(out, "codebook", **(marker or {})) as tmp:
            io.save_npz(tmp / "codebook.npz", codes=self.codes, sizes=np.array(self.sizes), **self.extras)
            io.write_json(tmp / "codebook.json", self.to_json())

    def to_json(self) -> dict:
        return {
            **self.meta,
            "sizes": self.sizes, "levels": self.levels, "n_items": self.n_items,
            "bijective": bool(self.bijective), "collisions": int(self.n_collisions),
            **self.diagnostics(),
        }

    @staticmethod
    def saved_in(path: str | Path) -> bool:
        """Whether `path` holds a saved codebook (a run without semantic IDs has none)."""
        return (Path(path) / "codebook.npz").is_file()

    @classmethod
    def load(cls, path: str | Path, allow_collisions: bool = True) -> "Codebook":
        p = Path(path)
        if not (p / "codebook.npz").exists():
            raise UserError("not a codebook directory (no codebook.npz); run `sidrec tokenize`", str(p))
        arr = io.load_npz(p / "codebook.npz", required=("codes", "sizes"))
        meta = io.read_json(p / "codebook.json") if (p / "codebook.json").exists() else {}
        extras = {k: v for k, v in arr.items() if k not in ("codes", "sizes")}
        with io.reading(p / "codebook.npz", "codebook"):
            if not np.issubdtype(arr["codes"].dtype, np.integer) or arr["sizes"].ndim != 1:
                raise ValueError("codes must be integers and sizes a vector")
            return cls(arr["codes"], arr["sizes"].tolist(), allow_collisions=allow_collisions,
                       meta={k: v for k, v in (meta if isinstance(meta, dict) else {}).items()
                             if k not in _DERIVED_KEYS}, extras=extras)

    def collision_groups(self, limit: int = 10) -> list[list[int]]:
        """Up to `limit` groups of items that share one ID (internal ids, lowest first)."""
        if self.bijective:
            return []
        _, inv, counts = np.unique(self.keys, return_inverse=True, return_counts=True)
        shared = np.flatnonzero(counts[inv] > 1)
        order = shared[np.lexsort((shared, inv[shared]))]
        groups = np.split(order, np.flatnonzero(np.diff(inv[order])) + 1)
        return [g.tolist() for g in groups[:limit]]


# keys of codebook.json recomputed from the codes on load (everything else is fitting metadata)
_DERIVED_KEYS = {"sizes", "levels", "n_items", "bijective", "collisions", "utilization", "perplexity",
                 "max_items_per_prefix"}


def codebook_diagnostics(codes: np.ndarray, sizes: list[int]) -> dict:
    """Per-level utilization and perplexity, and the largest number of items under one prefix."""
    util, ppl, max_under = [], [], []
    for j, v in enumerate(sizes):
        cnt = np.bincount(codes[:, j], minlength=v)
        p = cnt[cnt > 0] / len(codes)
        util.append(round(float((cnt > 0).sum() / v), 4))
        ppl.append(round(float(np.exp(-(p * np.log(p)).sum())), 2))
        _, c = np.unique(mixed_radix(codes[:, : j + 1], sizes), return_counts=True)
        max_under.append(int(c.max()))
    return {"utilization": util, "perplexity": ppl, "max_items_per_prefix": max_under}
