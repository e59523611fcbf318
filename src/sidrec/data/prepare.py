"""Preparation: raw log -> chronological per-user sequences with a leave-one-out split.

Steps (in order): drop duplicates, iterative k-core, stable chronological sort, contiguous ids,
optional truncation to the most recent `max_seq_len` interactions, leave-one-out split.

Tie-break: interactions with equal timestamps keep the order they have in the source file
(stable sort on (user, timestamp, file row)). Sorting ties by item id would leak the answer
whenever ids were assigned in purchase order (it inflates ranking metrics on ML-1M).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from sidrec import io
from sidrec.data import shards
from sidrec.data.dataset import Dataset
from sidrec.data.readers import refuse_nul
from sidrec.errors import UserError

#: Leave-one-out needs a training prefix, a validation item and a test item.
MIN_USER_LEN = 3


@dataclass
class SequenceData:
    """Prepared sequences in CSR form plus id maps; the split is derived, never stored twice.

    offsets: int64 [U+1]; user u's chronological items are items[offsets[u]:offsets[u+1]].
    items: int32 [nnz], contiguous internal ids 0..N-1.
    user_ids: raw user ids (unicode array), index = internal user id.
    item_table: one row per internal item id: raw id in column `item` plus side information.
    """

    offsets: np.ndarray
    items: np.ndarray
    user_ids: np.ndarray
    item_table: pd.DataFrame
    timestamps: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    user_index: np.ndarray | None = None  # global user ids of a rank's part (load(part=...)); None: 0..U-1

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_items(self) -> int:
        return len(self.item_table)

    @property
    def n_interactions(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def history_end(self, split: str) -> np.ndarray:
        """End (exclusive) of each user's input history for a split.

        train: everything but the last two items (the same prefix the validation target
        follows); valid: predicts the second-to-last item; test: predicts the last item.
        """
        drop = {"train": 2, "valid": 2, "test": 1}[split]
        return self.offsets[1:] - drop

    def targets(self, split: str) -> np.ndarray:
        """The held-out item of each user for `valid` or `test`."""
        return self.items[self.history_end(split)]

    def train_target_counts(self) -> np.ndarray:
        """[N] how often each item occurs in the training prefixes (popularity: never the valid or
        test items)."""
        user = np.repeat(np.arange(self.n_users), self.lengths)
        in_train = np.arange(self.n_interactions) < self.history_end("train")[user]
        return np.bincount(self.items[in_train], minlength=self.n_items)

    def raw_item_ids(self) -> np.ndarray:
        return self.item_table["item"].to_numpy(dtype=str)

    def stats(self) -> dict:
        return compute_stats(self)

    def save(self, out: str | Path, extra: Callable[[Path], None] | None = None, marker: dict | None = None) -> None:
        """Write the data directory atomically (a half-written directory never appears). An existing
        `out` is replaced only if it is a sidrec data directory (see `sidrec.io`).

        `extra(tmp_dir)` may add files (e.g. the synthetic world) before the directory is renamed;
        `marker`: fields for the directory's marker (the fingerprint of what it was made from).
        """
        with io.atomic_dir(out, "data", **(marker or {})) as tmp:
            arrays = {"offsets": self.offsets, "items": self.items, "user_ids": self.user_ids}
            if self.timestamps is not None:
                arrays["timestamps"] = self.timestamps
            io.save_npz(tmp / "sequences.npz", **arrays)
            self.item_table.to_parquet(tmp / "items.parquet", index=False)
            io.write_json(tmp / "stats.json", self.stats())
            io.write_json(tmp / "prepare.json", self.meta)
            if extra is not None:
                extra(tmp)
        self.path = Path(out)

    def cache_file(self, name: str) -> Path | None:
        """Where derived arrays of this data (its items' embeddings) are cached, inside its directory;
        None for in-memory data."""
        return None if self.path is None else Path(self.path) / "embeddings" / name

    @classmethod
    def load(cls, path: str | Path, part: tuple[int, int] | None = None) -> "SequenceData":
        """Read a data directory: `sequences.npz`, or the Parquet parts of a sharded one
        (`sidrec.data.shards`); `part=(rank, world)` reads only that rank's parts (its users alone, their
        global ids in `user_index`; a `sequences.npz` directory is read whole)."""
        p = Path(path)
        parts = shards.part_files(p)
        if not (p / "sequences.npz").exists() and not parts:
            raise UserError("not a prepared data directory (no sequences.npz or sequences/ parts); run "
                            "`sidrec data prepare`", str(p))
        with io.reading(p / "items.parquet", "item table"):
            table = pd.read_parquet(p / "items.parquet")
            if "item" not in table.columns:
                raise ValueError("no 'item' column")
        meta = io.read_json(p / "prepare.json") if (p / "prepare.json").exists() else {}
        if parts and not (p / "sequences.npz").exists():
            where = p / shards.DIR
            with io.reading(where, "sequence parts"):
                arr = shards.read_parts(shards.select(parts, part))
                _check_index(arr["user_index"], whole=part is None)
        else:
            arr = io.load_npz(p / "sequences.npz", required=("offsets", "items", "user_ids"))
            where = p / "sequences.npz"
        with io.reading(where, "sequences"):
            _check_arrays(arr, len(table))
        return cls(arr["offsets"], arr["items"], arr["user_ids"], table, arr.get("timestamps"),
                   meta if isinstance(meta, dict) else {}, p, arr.get("user_index") if part is not None else None)


def _check_index(index: np.ndarray, whole: bool) -> None:
    """Parts list users in ascending internal id, and all of them together are 0..U-1."""
    if len(index) and np.any(np.diff(index) <= 0):
        raise ValueError("user_index is not ascending across the parts")
    if whole and not np.array_equal(index, np.arange(len(index))):
        raise ValueError("the parts' user_index is not 0..U-1 (a part is missing or extra)")


def _check_arrays(arr: dict, n_items: int) -> None:
    """The invariants every loader relies on (a truncated or edited file fails here, not later)."""
    off, items = arr["offsets"], arr["items"]
    if not np.issubdtype(off.dtype, np.integer) or arr["user_ids"].ndim != 1:
        raise ValueError("offsets must be integers and user_ids a vector")
    if off.ndim != 1 or len(off) < 2 or off[0] != 0 or off[-1] != len(items) or np.any(np.diff(off) < MIN_USER_LEN):
        raise ValueError("offsets are not a CSR index of sequences of length >= 3")
    if items.ndim != 1 or not np.issubdtype(items.dtype, np.integer) or (len(items) and (
            items.min() < 0 or items.max() >= n_items)):
        raise ValueError(f"item ids outside 0..{n_items - 1} (does items.parquet belong to these sequences?)")
    if len(arr["user_ids"]) != len(off) - 1:
        raise ValueError("user_ids and offsets disagree on the number of users")
    ts = arr.get("timestamps")
    if ts is not None and ts.shape != items.shape:
        raise ValueError("timestamps and items differ in length")


def compute_stats(d: SequenceData) -> dict:
    hits = {s: target_hits(d.offsets, d.items, s) for s in ("valid", "test")}
    return stats_from(d.lengths, d.n_items, hits, bool(d.meta.get("has_time", d.timestamps is not None)),
                      [c for c in d.item_table.columns if c != "item"], d.meta.get("source", ""))


def stats_from(lengths: np.ndarray, n_items: int, hits: dict[str, int], has_time: bool, item_fields: list[str],
               source: str) -> dict:
    """The statistics of prepared data from its sequence lengths and repeat-target counts (so that
    sharded data can be summed part by part)."""
    n_users, nnz = len(lengths), int(lengths.sum())
    return {
        "users": n_users,
        "items": n_items,
        "interactions": nnz,
        "seq_len_min": int(lengths.min()),
        "seq_len_max": int(lengths.max()),
        "seq_len_mean": round(float(lengths.mean()), 2),
        "seq_len_median": float(np.median(lengths)),
        "seq_len_p90": float(np.percentile(lengths, 90)),
        "density": round(nnz / max(1, n_users * n_items), 6),
        "valid_target_in_history": round(hits["valid"] / max(1, n_users), 4),
        "test_target_in_history": round(hits["test"] / max(1, n_users), 4),
        "has_timestamps": has_time,
        "item_fields": item_fields,
        "source": source,
    }


def target_in_history(d: SequenceData, split: str) -> float:
    """Share of users whose held-out `split` target already occurs in their own history: the
    repeats that a seen-excluded protocol can never score."""
    return target_hits(d.offsets, d.items, split) / d.n_users if d.n_users else 0.0


def target_hits(offsets: np.ndarray, items: np.ndarray, split: str) -> int:
    """How many users' `split` target occurs in their own history (CSR arrays)."""
    lengths = np.diff(offsets)
    n_users = len(lengths)
    user = np.repeat(np.arange(n_users), lengths)
    end = offsets[1:] - {"valid": 2, "test": 1}[split]
    target = items[end]
    hit = (np.arange(len(items)) < end[user]) & (items == target[user])
    return int(np.bincount(user[hit], minlength=n_users).astype(bool).sum())


def _id_order(raw: np.ndarray) -> np.ndarray:
    """Sort raw ids numerically when they are all integers, else lexicographically."""
    try:
        keys = raw.astype(np.int64)
        return np.argsort(keys, kind="stable")
    except (ValueError, OverflowError):
        return np.argsort(raw, kind="stable")


def kcore(users: np.ndarray, items: np.ndarray, k: int, min_user: int = MIN_USER_LEN) -> np.ndarray:
    """Boolean mask of rows kept by iterative k-core (users need max(k, min_user) rows)."""
    keep = np.ones(len(users), dtype=bool)
    ku = max(k, min_user)
    while True:
        u, i = users[keep], items[keep]
        ucnt = np.bincount(u, minlength=users.max() + 1)
        icnt = np.bincount(i, minlength=items.max() + 1)
        ok = (ucnt[users] >= ku) & (icnt[items] >= k) & keep
        if ok.sum() == keep.sum():
            return keep
        keep = ok


def prepare(
    ds: Dataset,
    kcore_k: int = 5,
    dedup: str = "exact",
    max_seq_len: int | None = None,
) -> SequenceData:
    """Turn a raw `Dataset` into `SequenceData` (see module docstring for the exact steps).

    dedup: "exact" drops rows repeating (user, item, timestamp); "user-item" keeps only the
    first interaction of each (user, item) pair; "none" keeps everything.
    """
    t0 = time.perf_counter()
    df = ds.interactions
    n_raw = len(df)
    if n_raw == 0:
        raise UserError("no interactions", ds.source)
    for col in ("user", "item"):  # every reader and from_frame pass here (CSV also names the line)
        refuse_nul(df[col], f"{col} id", ds.source)
    if ds.items is not None:
        refuse_nul(ds.items["item"], "item id (item table)", ds.source)
    if dedup == "exact":
        df = df.drop_duplicates(["user", "item", "timestamp"], keep="first")
    elif dedup == "user-item":
        df = df.drop_duplicates(["user", "item"], keep="first")
    elif dedup != "none":
        raise UserError(f"unknown dedup mode {dedup!r} (exact, user-item, none)")
    n_dedup = len(df)
    row = np.arange(len(df))  # file order after dedup: the tie-break
    ucode, uraw = pd.factorize(df["user"])
    icode, iraw = pd.factorize(df["item"])
    keep = kcore(ucode, icode, kcore_k)
    if not keep.any():
        raise UserError(
            f"no interactions left after {kcore_k}-core filtering (users need >= {max(kcore_k, MIN_USER_LEN)} "
            f"interactions, items >= {kcore_k}); lower --kcore",
            ds.source,
        )
    ucode, icode, row = ucode[keep], icode[keep], row[keep]
    ts = df["timestamp"].to_numpy()[keep]
    # contiguous ids in sorted raw-id order (not in order of appearance)
    used_u, used_i = np.unique(ucode), np.unique(icode)
    u_raw, i_raw = np.asarray(uraw, dtype=str)[used_u], np.asarray(iraw, dtype=str)[used_i]
    u_perm, i_perm = _id_order(u_raw), _id_order(i_raw)
    u_map = np.empty(len(uraw), dtype=np.int64)
    u_map[used_u[u_perm]] = np.arange(len(used_u))
    i_map = np.empty(len(iraw), dtype=np.int64)
    i_map[used_i[i_perm]] = np.arange(len(used_i))
    uid, iid = u_map[ucode], i_map[icode]
    order = np.lexsort((row, ts, uid))  # user, then time, then file row
    uid, iid, ts = uid[order], iid[order], ts[order]
    counts = np.bincount(uid, minlength=len(used_u))
    if max_seq_len:
        # keep the most recent max_seq_len interactions of each user
        start = np.repeat(np.cumsum(counts) - counts, counts)
        pos_from_end = counts[uid] - (np.arange(len(uid)) - start)
        m = pos_from_end <= max_seq_len
        uid, iid, ts = uid[m], iid[m], ts[m]
        counts = np.minimum(counts, max_seq_len)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    item_table = join_item_table(i_raw[i_perm], ds.items)
    meta = {
        "source": ds.source,
        "has_time": ds.has_time,
        "kcore": kcore_k,
        "dedup": dedup,
        "max_seq_len": max_seq_len,
        "raw_interactions": n_raw,
        "after_dedup": n_dedup,
        "tie_break": "file order (stable sort on user, timestamp, file row)",
        "prepare_seconds": round(time.perf_counter() - t0, 3),
        "notes": list(ds.notes),
    }
    return SequenceData(
        offsets=offsets,
        items=iid.astype(np.int32),
        user_ids=u_raw[u_perm],
        item_table=item_table,
        timestamps=ts.astype(np.float64) if ds.has_time else None,
        meta=meta,
    )


def join_item_table(raw_ids: np.ndarray, side: pd.DataFrame | None) -> pd.DataFrame:
    """One row per internal item id, with side information joined by raw id (missing -> '')."""
    base = pd.DataFrame({"item": raw_ids.astype(str)})
    if side is None:
        return base
    side = side.copy()
    side["item"] = side["item"].astype(str)
    out = base.merge(side, on="item", how="left")
    for c in out.columns:
        if out[c].dtype == object or str(out[c].dtype).startswith("str"):
            out[c] = out[c].fillna("").astype(str)
    return out
