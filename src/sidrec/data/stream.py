"""Out-of-core preparation: a Parquet log larger than memory -> sharded sequences, run by DuckDB.

The same steps and the same result as `prepare.prepare` (a test compares every array), executed by
DuckDB under a memory limit: its sorts, joins and aggregates spill to a work directory inside the
output's temporary directory, so peak memory is the limit plus one part being written, whatever the
log's size. The output is `sidrec.data.shards`' format (Parquet parts of whole users) plus the same
`items.parquet`, `prepare.json` and `stats.json` as the in-memory path.

Why DuckDB: an embedded engine made for larger-than-memory sorts and group-bys on Parquet, a pip
wheel with no server, and SQL a Spark job can mirror. Raw ids are dictionary-encoded once, so the
big intermediate tables hold integers only.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sidrec import io
from sidrec.data import shards
from sidrec.data.prepare import MIN_USER_LEN, join_item_table, stats_from, target_hits
from sidrec.errors import UserError

RESERVED = ("filename", "file_row_number")  # DuckDB's own columns of a Parquet scan


def _lit(text: str | Path) -> str:
    """A SQL string literal (paths may hold quotes)."""
    return "'" + str(text).replace("'", "''") + "'"


def _ident(name: str) -> str:
    """A SQL identifier (column names may hold double quotes)."""
    return '"' + name.replace('"', '""') + '"'


def parquet_files(path: str | Path) -> list[Path]:
    """A Parquet file, or every `*.parquet` below a directory (sorted by path: the file order that
    breaks timestamp ties)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
        if not files:
            raise UserError("no *.parquet files in this directory", str(p))
        return files
    if not p.is_file():
        raise UserError("file not found" if not p.exists() else "not a file or directory", str(p))
    if p.suffix != ".parquet":
        raise UserError("--engine duckdb reads Parquet (a .parquet file or a directory of them)", str(p))
    return [p]


def prepare_parquet(path: str | Path, out: str | Path, *, user_col: str = "user_id", item_col: str = "item_id",
                    time_col: str | None = "timestamp", kcore_k: int = 5, dedup: str = "exact",
                    max_seq_len: int | None = None, meta: str | Path | None = None, item_id_col: str | None = None,
                    memory_limit: str = "4GB", shard_rows: int = 20_000_000, threads: int | None = None,
                    marker: dict | None = None) -> dict:
    """Prepare the Parquet log at `path` into the sharded data directory `out` (atomically); returns
    its prepare.json. `shard_rows`: interactions per part (whole users); `memory_limit`: DuckDB's."""
    import duckdb

    t0 = time.perf_counter()
    files, limit = parquet_files(path), _size(memory_limit)
    if dedup not in ("exact", "user-item", "none"):
        raise UserError(f"unknown dedup mode {dedup!r} (exact, user-item, none)")
    for opt, col in (("--user-col", user_col), ("--item-col", item_col), ("--time-col", time_col)):
        if col in RESERVED:
            raise UserError(f"{opt}: {col!r} is a name DuckDB gives its own column; rename the column in the log")
    with io.atomic_dir(out, "data", **(marker or {})) as tmp:
        work = tmp / ".work"
        work.mkdir()
        con = duckdb.connect(str(work / "db.duckdb"))
        try:
            con.execute(f"SET memory_limit = {_lit(limit)}; SET temp_directory = {_lit(work / 'spill')}; "
                        "SET TimeZone = 'UTC'")
            if threads:
                con.execute(f"SET threads = {int(threads)}")
            n_raw = _load_log(con, files, user_col, item_col, time_col)
            n_dedup = _dedup(con, dedup)
            _kcore(con, kcore_k, str(path))
            _final_ids(con, max_seq_len)
            lengths, hits, parts = _write_parts(con, tmp, shard_rows, time_col is not None)
            table = _write_items(con, tmp, meta, item_id_col or item_col)
        except duckdb.Error as e:  # out of memory or disk, an unreadable file: the engine's one line
            raise UserError(f"DuckDB: {str(e).splitlines()[0]}", str(path)) from None
        finally:
            con.close()
            shutil.rmtree(work, ignore_errors=True)
        info = {
            "source": str(path), "has_time": time_col is not None, "kcore": kcore_k, "dedup": dedup,
            "max_seq_len": max_seq_len, "raw_interactions": n_raw, "after_dedup": n_dedup,
            "tie_break": "file order (stable sort on user, timestamp, file row)",
            "engine": "duckdb", "memory_limit": memory_limit, "parts": parts,
            "prepare_seconds": round(time.perf_counter() - t0, 3), "notes": [],
        }
        io.write_json(tmp / "stats.json", stats_from(lengths, table["n_items"], hits, time_col is not None,
                                                    table["fields"], str(path)))
        io.write_json(tmp / "prepare.json", info)
    return info


def _size(limit: str) -> str:
    """A DuckDB memory size ('4GB', '512MB'); refused here, not deep in the engine."""
    s = str(limit).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    if not num.replace(".", "", 1).isdigit() or unit not in ("KB", "MB", "GB", "TB", "KIB", "MIB", "GIB", "TIB"):
        raise UserError(f"--memory-limit: {limit!r} is not a size such as 4GB or 512MB")
    return s


def _load_log(con, files: list[Path], user_col: str, item_col: str, time_col: str | None) -> int:
    """Dictionary-encode the log: `users` / `items` (raw id -> code, first row), `x` (codes, time, row)."""
    starts = np.concatenate([[0], np.cumsum([pq.ParquetFile(f).metadata.num_rows for f in files])])
    con.execute("CREATE TEMP TABLE files (filename VARCHAR, start BIGINT)")
    con.executemany("INSERT INTO files VALUES (?, ?)", [(str(f), int(s)) for f, s in zip(files, starts)])
    src = f"read_parquet([{', '.join(_lit(f) for f in files)}], filename = true, file_row_number = true)"
    cols = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    for c in [user_col, item_col] + ([time_col] if time_col else []):
        if c not in cols:
            raise UserError(f"missing column {c!r}; found {[k for k in cols if k not in ('filename', 'file_row_number')][:12]}",
                            str(files[0]))
    row = "f.start + r.file_row_number"
    con.execute(f"""CREATE TEMP VIEW log AS SELECT CAST(r.{_ident(user_col)} AS VARCHAR) AS u,
        CAST(r.{_ident(item_col)} AS VARCHAR) AS i, {_time_expr(time_col, cols.get(time_col), row)} AS t,
        {row} AS row FROM {src} r JOIN files f USING (filename)""")
    for side, col in (("users", "u"), ("items", "i")):
        con.execute(f"CREATE TABLE {side} AS SELECT {col} AS raw, min(row) AS first, "
                    f"row_number() OVER () - 1 AS code FROM log GROUP BY {col}")
        bad = con.execute(f"SELECT min(first) FROM {side} WHERE raw IS NULL OR trim(raw) = '' OR "
                          "contains(raw, chr(0))").fetchone()[0]
        if bad is not None:
            what = {"users": user_col, "items": item_col}[side]
            raise UserError(f"empty {what!r} or a NUL character in it", *_where(files, starts, bad))
    con.execute("""CREATE TABLE x AS SELECT uu.code AS uc, ii.code AS ic, log.t, log.row FROM log
        JOIN users uu ON log.u = uu.raw JOIN items ii ON log.i = ii.raw""")
    bad = con.execute("SELECT min(row) FROM x WHERE t IS NULL OR isnan(t)").fetchone()[0]
    if bad is not None:
        raise UserError("missing timestamp, or neither a number nor an ISO-8601 date", *_where(files, starts, bad))
    return int(starts[-1])


def _time_expr(time_col: str | None, dtype: str | None, row: str) -> str:
    """Seconds as DOUBLE from a numeric, date/timestamp or string column (file order without one)."""
    if time_col is None:
        return f"CAST({row} AS DOUBLE)"
    c = f"r.{_ident(time_col)}"
    if dtype and ("TIMESTAMP" in dtype or dtype == "DATE"):  # nanoseconds kept: TIMESTAMP_NS ties stay apart
        return f"epoch_ns(CAST({c} AS {'TIMESTAMP_NS' if dtype == 'TIMESTAMP_NS' else 'TIMESTAMPTZ'})) / 1e9"
    if dtype == "VARCHAR":
        return f"COALESCE(TRY_CAST({c} AS DOUBLE), epoch_ns(TRY_CAST({c} AS TIMESTAMPTZ)) / 1e9)"
    return f"CAST({c} AS DOUBLE)"


def _where(files: list[Path], starts: np.ndarray, row: int) -> tuple[str, int]:
    """(file, line) of a global row key: the line as the in-memory reader counts it (1 = first row)."""
    i = int(np.searchsorted(starts, row, side="right") - 1)
    return str(files[i]), int(row - starts[i]) + 1


def _dedup(con, dedup: str) -> int:
    """Keep the first row (file order) of each repeated (user, item, time) or (user, item)."""
    if dedup == "exact":
        con.execute("CREATE OR REPLACE TABLE x AS SELECT uc, ic, t, min(row) AS row FROM x GROUP BY uc, ic, t")
    elif dedup == "user-item":
        con.execute("CREATE OR REPLACE TABLE x AS SELECT uc, ic, arg_min(t, row) AS t, min(row) AS row "
                    "FROM x GROUP BY uc, ic")
    return con.execute("SELECT count(*) FROM x").fetchone()[0]


def _kcore(con, k: int, source: str) -> None:
    """Iterative k-core (users need max(k, 3) rows, items k) to its fixed point, which is unique."""
    ku = max(k, MIN_USER_LEN)
    n = con.execute("SELECT count(*) FROM x").fetchone()[0]
    while True:
        con.execute(f"""CREATE OR REPLACE TABLE x AS SELECT * FROM x
            WHERE uc IN (SELECT uc FROM x GROUP BY uc HAVING count(*) >= {ku})
              AND ic IN (SELECT ic FROM x GROUP BY ic HAVING count(*) >= {k})""")
        m = con.execute("SELECT count(*) FROM x").fetchone()[0]
        if m == 0:
            raise UserError(f"no interactions left after {k}-core filtering (users need >= {ku} interactions, "
                            f"items >= {k}); lower --kcore", source)
        if m == n:
            return
        n = m


def _final_ids(con, max_seq_len: int | None) -> None:
    """Contiguous ids in sorted raw-id order (numeric when every kept id is an integer; ties of equal
    numbers keep first-appearance order, as numpy's stable argsort does), then `seq`: every kept
    interaction sorted by (user, time, file row), truncated to each user's most recent max_seq_len."""
    for side, code in (("users", "uc"), ("items", "ic")):
        kept = f"(SELECT s.* FROM {side} s WHERE s.code IN (SELECT DISTINCT {code} FROM x))"
        numeric = con.execute(f"SELECT bool_and(regexp_full_match(trim(raw), '[+-]?[0-9]+') AND "
                              f"TRY_CAST(trim(raw) AS BIGINT) IS NOT NULL) FROM {kept}").fetchone()[0]
        key = "TRY_CAST(trim(raw) AS BIGINT), first" if numeric else "raw"
        con.execute(f"CREATE TABLE {side}_final AS SELECT code, raw, row_number() OVER (ORDER BY {key}) - 1 "
                    f"AS id FROM {kept}")
    trunc = (f"QUALIFY row_number() OVER (PARTITION BY uf.id ORDER BY x.t DESC, x.row DESC) <= {int(max_seq_len)}"
             if max_seq_len else "")
    con.execute(f"""CREATE TABLE seq AS SELECT uf.id AS uid, CAST(itf.id AS INTEGER) AS iid, x.t, x.row FROM x
        JOIN users_final uf ON x.uc = uf.code JOIN items_final itf ON x.ic = itf.code {trunc}
        ORDER BY uid, x.t, x.row""")
    con.execute("DROP TABLE x")


def _write_parts(con, tmp: Path, shard_rows: int, has_time: bool) -> tuple[np.ndarray, dict, list]:
    """Write `sequences/part-*.parquet` (whole users, about `shard_rows` interactions each) and sum
    their statistics part by part: (lengths, repeat-target counts, parts' user ranges)."""
    lengths = con.execute("SELECT count(*) FROM seq GROUP BY uid ORDER BY uid").fetchnumpy()["count_star()"]
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    cuts = np.unique(np.searchsorted(ends, np.arange(shard_rows, ends[-1], shard_rows), side="left") + 1)
    bounds = np.concatenate([[0], cuts[cuts < len(lengths)], [len(lengths)]])
    (tmp / shards.DIR).mkdir()
    hits, parts = {"valid": 0, "test": 0}, []
    ts = ", list(t ORDER BY t, row) AS timestamps" if has_time else ""
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        f = tmp / shards.DIR / shards.part_name(j)
        con.execute(f"""COPY (SELECT g.uid AS user_index, uf.raw AS user, g.items{', g.timestamps' if has_time else ''}
            FROM (SELECT uid, list(iid ORDER BY t, row) AS items{ts} FROM seq WHERE uid >= {a} AND uid < {b}
                  GROUP BY uid) g JOIN users_final uf ON g.uid = uf.id ORDER BY g.uid)
            TO {_lit(f)} (FORMAT parquet)""")
        arr = shards.read_parts([f])
        for s in hits:
            hits[s] += target_hits(arr["offsets"], arr["items"], s)
        parts.append({"file": f.name, "users": [int(a), int(b)], "interactions": int(arr["offsets"][-1])})
    return lengths, hits, parts


def _write_items(con, tmp: Path, meta: str | Path | None, id_col: str) -> dict:
    """`items.parquet`: row i = item i's raw id (+ side information joined by raw id from `meta`)."""
    n = con.execute("SELECT count(*) FROM items_final").fetchone()[0]
    if meta is None:  # straight from the engine: no 10^8 Python strings
        con.execute(f"COPY (SELECT raw AS item FROM items_final ORDER BY id) TO {_lit(tmp / 'items.parquet')} "
                    "(FORMAT parquet)")
        return {"n_items": n, "fields": []}
    from sidrec.data.readers import read_item_table

    raw = con.execute("SELECT raw FROM items_final ORDER BY id").fetchnumpy()["raw"]
    table = join_item_table(np.asarray(raw, dtype=str), read_item_table(meta, id_col))
    table.to_parquet(tmp / "items.parquet", index=False)
    return {"n_items": n, "fields": [c for c in table.columns if c != "item"]}
