"""The sharded sequence format: prepared sequences as Parquet files of whole users.

A data directory holds either `sequences.npz` (one CSR file, what the in-memory `prepare` writes) or
`sequences/part-NNNNN.parquet` (what `sidrec data prepare --engine duckdb` writes, and what a Spark or
Ray job may write itself; docs/scale-out.md). Each part holds whole users, in ascending `user_index`,
the parts together covering 0..U-1 in order, one row per user:

    user_index  int64               internal user id (contiguous over the parts)
    user        string              raw user id
    items       list<int32>         the user's items in chronological order, internal ids 0..N-1
    timestamps  list<float64>       the same interactions' times (absent when the log had none)

A rank reads only its parts (`read_parts(dir, part=(rank, world))`: parts rank, rank + world, ...),
so no process ever needs the whole log in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

DIR = "sequences"
COLUMNS = ("user_index", "user", "items", "timestamps")


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def part_files(data_dir: str | Path) -> list[Path]:
    """The parts of a sharded data directory, in order (empty if it is not one)."""
    d = Path(data_dir) / DIR
    return sorted(d.glob("part-*.parquet")) if d.is_dir() else []


def read_parts(files: list[Path]) -> dict[str, np.ndarray]:
    """Concatenate parts into CSR arrays: offsets [U+1], items [nnz], user_ids [U], user_index [U],
    timestamps [nnz] (if stored). The list columns' own offsets become the CSR offsets (no loop over
    users in Python)."""
    offsets, items, users, index, times = [np.zeros(1, np.int64)], [], [], [], []
    for f in files:
        t = pq.read_table(f)
        missing = [c for c in COLUMNS[:3] if c not in t.column_names]
        if missing:
            raise ValueError(f"{f.name}: missing column(s) {missing} (expected {list(COLUMNS)})")
        lists = t.column("items").combine_chunks()
        off = lists.offsets.to_numpy().astype(np.int64)
        offsets.append(off[1:] - off[0] + offsets[-1][-1])
        items.append(lists.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False))
        users.append(t.column("user").to_numpy(zero_copy_only=False).astype(str))
        index.append(t.column("user_index").to_numpy().astype(np.int64))
        if "timestamps" in t.column_names:
            ts = t.column("timestamps").combine_chunks()
            if not np.array_equal(ts.offsets.to_numpy() - ts.offsets[0].as_py(), off - off[0]):
                raise ValueError(f"{f.name}: timestamps and items differ in length for some user")
            times.append(ts.flatten().to_numpy(zero_copy_only=False).astype(np.float64))
    out = {"offsets": np.concatenate(offsets), "items": np.concatenate(items) if items else np.zeros(0, np.int32),
           "user_ids": np.concatenate(users) if users else np.zeros(0, str),
           "user_index": np.concatenate(index) if index else np.zeros(0, np.int64)}
    if times:
        if len(times) != len(files):
            raise ValueError("some parts have timestamps and others do not")
        out["timestamps"] = np.concatenate(times)
    return out


def select(files: list[Path], part: tuple[int, int] | None) -> list[Path]:
    """The parts rank `r` of `world` reads: r, r + world, ... (all of them without `part`)."""
    if part is None:
        return files
    rank, world = part
    if len(files) < world:
        raise ValueError(f"{len(files)} part(s) for {world} ranks: prepare with a smaller --shard-rows so that "
                         "every rank has one")
    return files[rank::world]
