"""Collision resolution: make the item -> ID map injective.

- "extra-token" (TIGER): append one token that numbers the items sharing an ID (closest to the
  quantized vector first). The last level's size is the largest collision group.
- "reassign": keep the closest item of each group on its ID and move the others to the nearest
  *free* code of the last level under the same prefix (vectorized rounds: each round every
  unresolved item proposes its next-nearest code; a code goes to its closest proposer; the few
  left then take the prefix's remaining free codes). Prefixes with more items than codes first
  spill their worst-fitting excess items to their next-nearest code one level up (checked from the
  coarsest level down, so every prefix ends with room for its items).
"""

from __future__ import annotations

import numpy as np

from sidrec.errors import UserError
from sidrec.tokenize.codebook import mixed_radix
from sidrec.tokenize.quantizers import Quantized


def collision_stats(codes: np.ndarray, sizes: list[int]) -> dict:
    keys = mixed_radix(codes, sizes)
    keys.sort()  # group sizes from one sorted copy (no inverse index: 10^8 items stay within memory)
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    del keys
    cnt = np.diff(np.append(starts, len(codes)))
    n = len(codes)
    dup = n - len(cnt)
    return {
        "collisions_before_resolution": int(dup),
        "collision_rate_before": round(dup / n, 6),
        "colliding_items_before": int(cnt[cnt > 1].sum()),
        "max_collision_group": int(cnt.max()),
    }


def _rank_in_group(keys: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Rank of each item within its ID group, closest (smallest error) first."""
    order = np.lexsort((np.arange(len(keys)), err, keys))
    sk = keys[order]
    pos = np.searchsorted(sk, sk, side="left")
    del sk
    np.subtract(np.arange(len(keys)), pos, out=pos)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = pos
    return rank


def extra_token(q: Quantized, err: np.ndarray) -> tuple[np.ndarray, list[int]]:
    rank = _rank_in_group(mixed_radix(q.codes, q.sizes), err)
    return np.concatenate([q.codes, rank[:, None]], 1), q.sizes + [int(rank.max()) + 1]


class KeySet:
    """A set of int64 keys: a large sorted base (the kept IDs) plus a small sorted list of
    additions, so membership tests stay O(log n) without re-sorting the base every round."""

    def __init__(self, base: np.ndarray):
        self.base = np.unique(base)
        self.added = np.zeros(0, dtype=np.int64)

    @staticmethod
    def _member(sorted_keys: np.ndarray, q: np.ndarray) -> np.ndarray:
        if not len(sorted_keys):
            return np.zeros(len(q), dtype=bool)
        pos = np.searchsorted(sorted_keys, q).clip(max=len(sorted_keys) - 1)
        return sorted_keys[pos] == q

    def contains(self, q: np.ndarray) -> np.ndarray:
        return self._member(self.base, q) | self._member(self.added, q)

    def add(self, q: np.ndarray) -> None:
        self.added = np.sort(np.concatenate([self.added, q]))


def _preference(q: Quantized, j: int, idx: np.ndarray, codes: np.ndarray, rank: np.ndarray,
                chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Each item's `rank`-th nearest level-j code (given its tokens above j; rank 0 = the nearest)
    and its distance, [m] each. Computed in chunks and never stored as lists: at 10^8 items a
    [movers, V] distance matrix, or even every spilled item's preference list, would not fit. Rounds
    recompute an item's list; small batches compute its distances identically every time, GEMM
    batches (>= 4M distances) may differ in the last bits, which can only reorder near-ties."""
    code = np.empty(len(idx), dtype=np.int64)
    dist = np.empty(len(idx), dtype=np.float32)
    for a in range(0, len(idx), chunk):
        d = q.level_dist(j, idx[a:a + chunk], codes[a:a + chunk])
        r = rank[a:a + chunk, None]
        if d.size < 4_000_000:
            p = np.take_along_axis(np.argsort(d, axis=1, kind="stable"), r, 1)
        else:  # GEMM-sized: select the r+1 nearest, then order those by (distance, code) as a stable sort would
            near = np.argpartition(d, int(r.max()), axis=1)[:, : int(r.max()) + 1]
            order = np.lexsort((near, np.take_along_axis(d, near, 1)))
            p = np.take_along_axis(near, np.take_along_axis(order, r, 1), 1)
        code[a:a + chunk], dist[a:a + chunk] = p[:, 0], np.take_along_axis(d, p, 1)[:, 0]
    return code, dist


def _spill_overfull_prefixes(q: Quantized, codes: np.ndarray, err: np.ndarray, depth: int,
                             n_prefs: int = 64) -> None:
    """A depth-d prefix can hold at most prod(sizes[d:]) items. The worst-fitting items of an
    overfull prefix move to their next-nearest code at level d-1 (the prefix's last token), until
    no depth-d prefix overflows (vectorized; each item's preference list is computed once)."""
    cap = int(np.prod(q.sizes[depth:]))
    j = depth - 1
    t = min(n_prefs, q.sizes[j])
    tried = np.zeros(len(codes), dtype=np.int32)
    cand = np.arange(len(codes))  # items whose prefix may overflow: all, then those of prefixes that gained items
    while True:
        prefix = mixed_radix(codes[cand, :depth], q.sizes[:depth])
        rank = _rank_in_group(prefix, err[cand])  # best-fitting items keep their prefix
        spill = cand[rank >= cap]
        del prefix, rank
        if not len(spill):
            return
        tried[spill] += 1
        if tried[spill].max() >= t:
            raise UserError(f"cannot make item {spill[0]}'s ID unique: every nearby code is taken; "
                            "use --resolve extra-token or a larger --codebook-size")
        # the next code of each spilled item's preference list (its tokens above j never change here)
        codes[spill, j] = _preference(q, j, spill, codes[spill], tried[spill])[0]
        # only the prefixes that received items can overflow now: the others kept or lost items
        gained = np.unique(mixed_radix(codes[spill, :depth], q.sizes[:depth]))
        every = mixed_radix(codes[:, :depth], q.sizes[:depth])
        pos = np.searchsorted(gained, every).clip(max=len(gained) - 1)
        cand = np.flatnonzero(gained[pos] == every)
        del every, pos


def _place_last_level(q: Quantized, codes: np.ndarray, movers: np.ndarray, occupied: KeySet,
                      rounds: int = 16) -> None:
    """Give each mover a free last-level code under its own prefix (every prefix has room).

    A few rounds of proposals to each mover's nearest codes (a code goes to its closest
    proposer); movers still unplaced then take their prefix's remaining free codes in order.
    """
    v = q.sizes[-1]
    prefix = mixed_radix(codes[movers], q.sizes) // v
    t = min(rounds, v)
    pending = np.arange(len(movers))
    for r in range(t):  # each round: the pending movers' r-th nearest code (recomputed: few are left after round 0)
        cand, cdist = _preference(q, len(q.sizes) - 1, movers[pending], codes[movers[pending]],
                                  np.full(len(pending), r))
        want = prefix[pending] * v + cand
        free = ~occupied.contains(want)
        order = np.lexsort((cdist, want))  # among equal keys, the closest wins
        w_sorted = want[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = w_sorted[1:] != w_sorted[:-1]
        win = np.zeros(len(pending), dtype=bool)
        win[order[first]] = True
        win &= free
        codes[movers[pending[win]], -1] = cand[win]
        occupied.add(want[win])
        pending = pending[~win]
        if not len(pending):
            return
    # fill: the i-th leftover mover of a prefix takes that prefix's i-th free code
    pp = prefix[pending]
    uniq = np.unique(pp)
    cand_keys = (uniq[:, None] * v + np.arange(v)[None, :]).ravel()
    free_keys = cand_keys[~occupied.contains(cand_keys)]  # sorted by (prefix, code)
    free_prefix = free_keys // v
    start_free = np.searchsorted(free_prefix, pp)
    order = np.argsort(pp, kind="stable")
    sp = pp[order]
    rank = np.arange(len(sp)) - np.searchsorted(sp, sp)
    take = free_keys[start_free[order] + rank]
    codes[movers[pending[order]], -1] = take % v
    occupied.add(take)


def reassign(q: Quantized, err: np.ndarray) -> np.ndarray:
    """The bijective codes; works in place on q.codes (a catalogue of 10^8 items holds one copy)."""
    codes = q.codes
    for depth in range(1, len(q.sizes)):  # coarse levels first: deeper spills then find room
        _spill_overfull_prefixes(q, codes, err, depth)
    keys = mixed_radix(codes, q.sizes)
    rank = _rank_in_group(keys, err)
    movers = np.flatnonzero(rank > 0)
    if len(movers):
        _place_last_level(q, codes, movers, KeySet(keys[rank == 0]))
    return codes


def resolve(q: Quantized, x: np.ndarray, strategy: str) -> tuple[np.ndarray, list[int], dict]:
    """Apply a strategy; returns the new codes, sizes and the collision statistics before it."""
    stats = collision_stats(q.codes, q.sizes)
    err = q.err
    if strategy == "none":
        return q.codes, q.sizes, stats
    if strategy == "extra-token":
        codes, sizes = extra_token(q, err)
        return codes, sizes, stats
    if strategy == "reassign":
        space = float(np.prod(np.array(q.sizes, dtype=np.float64)))
        if space < len(x):
            raise UserError(f"{len(x)} items cannot get distinct IDs in a space of {int(space)} codes "
                            f"({' x '.join(map(str, q.sizes))}): raise --codebook-size or --levels")
        return reassign(q, err), q.sizes, stats
    raise UserError(f"unknown collision strategy {strategy!r} (reassign, extra-token, none)")
