"""Readers for the interaction formats people actually have, each into one `Dataset`.

Every reader turns malformed input into a `UserError` that names the file (and the line where
one is known); none lets a pandas/json traceback through.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from sidrec import io as sio
from sidrec.data.dataset import Dataset
from sidrec.errors import UserError

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError("file not found", str(p))
    if p.is_dir():
        raise UserError("expected a file, got a directory", str(p))
    if p.stat().st_size == 0:
        raise UserError("file is empty", str(p))
    return p


def _open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    """Open plain or gzip text (by magic bytes, not by name)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding)
    return open(path, encoding=encoding)


def _iter_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) and turn gzip/decoding failures into UserErrors."""
    lineno = 0
    try:
        with _open_text(path, encoding) as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"truncated or corrupt gzip data after line {lineno} ({e})", str(path)) from None
    except UnicodeDecodeError as e:
        raise UserError(f"not valid {encoding} text near line {lineno + 1} ({e.reason})", str(path)) from None


def _numeric_timestamps(values: pd.Series, path: Path, first_line: int) -> np.ndarray:
    """Numbers as float64; ISO-8601 date strings are accepted; anything else names its line."""
    num = pd.to_numeric(values, errors="coerce")
    bad = num.isna() & values.notna()
    if not bad.any():
        if values.isna().any():
            i = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise UserError("missing timestamp", str(path), first_line + i)
        return num.to_numpy(dtype=np.float64)
    try:
        dt = pd.to_datetime(values, format="ISO8601", utc=True)  # seconds, whatever unit pandas stores
        return ((dt - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(
            f"timestamp {values.iloc[i]!r} is neither a number nor an ISO-8601 date", str(path), first_line + i
        ) from None


def _require_ids(df: pd.DataFrame, cols: list[str], path: Path, first_line: int) -> None:
    """Every row names a user and an item (an empty id would silently join no one) and no id holds a
    NUL character (refuse_nul), each refusal naming its line."""
    for c in cols:
        missing = df[c].isna().to_numpy() | (df[c].astype(str).str.strip() == "").to_numpy()
        if missing.any():
            raise UserError(f"empty {c!r}", str(path), first_line + int(np.flatnonzero(missing)[0]))
        refuse_nul(df[c], repr(c), str(path), first_line)


def _frame(users, items, ts) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": pd.Series(users, dtype=str).to_numpy(dtype=object),
            "item": pd.Series(items, dtype=str).to_numpy(dtype=object),
            "timestamp": np.asarray(ts, dtype=np.float64),
        }
    )


def _read_table(path: Path, sep: str | None, **kw) -> pd.DataFrame:
    """pandas read_csv with errors turned into UserErrors (pandas reports the line)."""
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""], **kw)
    except pd.errors.EmptyDataError:
        raise UserError("file has no data", str(path)) from None
    except pd.errors.ParserError as e:
        raise UserError(f"malformed table ({str(e).strip()})", str(path)) from None
    except UnicodeDecodeError as e:
        raise UserError(f"not valid {kw.get('encoding', 'utf-8')} text ({e.reason})", str(path)) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise UserError(f"truncated or corrupt compressed data ({e})", str(path)) from None


def _require_columns(df: pd.DataFrame, cols: list[str], path: Path, sep: str | None) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        hint = ""
        if len(df.columns) == 1:
            hint = f" (only one column was found with separator {sep!r}: wrong --sep?)"
        raise UserError(
            f"missing column(s) {missing}; found {list(df.columns)[:12]}{hint}", str(path)
        )


def read_csv(
    path: str | Path,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    sep: str | None = None,
    items_path: str | Path | None = None,
    item_id_col: str | None = None,
) -> Dataset:
    """Generic CSV / TSV / Parquet log with user, item and (optional) timestamp columns.

    The separator defaults to the file extension (.tsv -> tab, otherwise comma).
    """
    p = _check_file(path)
    if p.suffix == ".parquet":
        try:
            df = pd.read_parquet(p).astype(str)
        except Exception as e:  # pyarrow raises many types for corrupt files
            raise UserError(f"cannot read Parquet ({e})", str(p)) from None
        sep = None
    else:
        if sep is None:
            sep = "\t" if p.suffix in (".tsv", ".tab") or p.name.endswith(".tsv.gz") else ","
        df = _read_table(p, sep)
    cols = [user_col, item_col] + ([time_col] if time_col else [])
    if len(set(cols)) < len(cols):
        raise UserError(f"the user, item and time columns must differ, got {cols}", str(p))
    _require_columns(df, cols, p, sep)
    if len(df) == 0:
        raise UserError("file has a header but no rows", str(p))
    _require_ids(df, [user_col, item_col], p, 1 if p.suffix == ".parquet" else 2)
    ts = _numeric_timestamps(df[time_col], p, 2) if time_col else np.arange(len(df), dtype=np.float64)
    items = read_item_table(items_path, item_id_col or item_col) if items_path else None
    return Dataset(_frame(df[user_col], df[item_col], ts), items, source=str(p), has_time=time_col is not None)


def read_item_table(path: str | Path, id_col: str = "item_id", unique: bool = False) -> pd.DataFrame:
    """Item side information from JSON lines, CSV/TSV or Parquet, keyed by `id_col`. A repeated id
    keeps its first row, or is a user error with `unique` (rows must line up with other inputs)."""
    p = _check_file(path)
    if p.suffix in (".jsonl", ".json") or p.name.endswith(".jsonl.gz"):
        rows = [_json_line(line, p, n) for n, line in _iter_lines(p) if line.strip()]
        df = pd.DataFrame(rows)
    elif p.suffix == ".parquet":
        with sio.reading(p, "Parquet item table"):
            df = pd.read_parquet(p)
    else:
        df = _read_table(p, "\t" if p.suffix == ".tsv" else ",")
    _require_columns(df, [id_col], p, None)
    df = df.rename(columns={id_col: "item"})
    df["item"] = df["item"].astype(str)
    return normalise_item_table(df, unique=unique, where=str(p))


def _json_line(line: str, path: Path, lineno: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON ({e.msg})", str(path), lineno) from None
    if not isinstance(obj, dict):
        raise UserError("expected a JSON object per line", str(path), lineno)
    return obj


def _join_text(value) -> str:
    """Flatten lists (and lists of category paths) into one readable string."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (list, tuple, np.ndarray)):
        parts = [_join_text(v) for v in value]
        sep = " | " if any(isinstance(v, (list, tuple, np.ndarray)) for v in value) else ", "
        return sep.join(p for p in parts if p)
    return str(value)


def refuse_nul(values: pd.Series, what: str, where: str | None, first_line: int | None = None) -> None:
    """No id may hold a NUL character: NumPy's fixed-width strings drop trailing NULs, so "1\\x00"
    would become item "1" once the ids are arrays (a second "1", or someone else's item). With
    `first_line`, the message names the file line of the first offending row."""
    nul = values.astype(str).str.contains("\x00", regex=False).to_numpy()
    if nul.any():
        i = int(np.flatnonzero(nul)[0])
        raise UserError(f"{what} {values.to_numpy()[i]!r} holds a NUL character", where,
                        None if first_line is None else first_line + i)


def normalise_item_table(df: pd.DataFrame, unique: bool = False, where: str | None = None) -> pd.DataFrame:
    """One row per item (the first; with `unique`, a repeated id is a user error); list-valued side
    information as plain strings."""
    refuse_nul(df["item"], "item id", where)
    dup = df["item"].duplicated()
    if unique and dup.any():
        raise UserError(f"item id {df['item'][dup].iloc[0]!r} appears more than once", where)
    df = df[~dup.to_numpy()].reset_index(drop=True)
    for c in df.columns:
        if c != "item" and df[c].dtype == object:
            df[c] = df[c].map(_join_text)
    return df


def read_recbole(inter_path: str | Path, item_path: str | Path | None = None) -> Dataset:
    """RecBole atomic files: typed headers like `user_id:token item_id:token timestamp:float`."""
    p = _check_file(inter_path)
    df = _read_table(p, "\t", quoting=3)
    df.columns = [c.split(":")[0] for c in df.columns]
    _require_columns(df, ["user_id", "item_id"], p, "\t")
    _require_ids(df, ["user_id", "item_id"], p, 2)
    has_time = "timestamp" in df.columns
    ts = _numeric_timestamps(df["timestamp"], p, 2) if has_time else np.arange(len(df), dtype=np.float64)
    items = None
    if item_path:
        ip = _check_file(item_path)
        it = _read_table(ip, "\t", quoting=3)
        it.columns = [c.split(":")[0] for c in it.columns]
        _require_columns(it, ["item_id"], ip, "\t")
        it = it.rename(columns={"item_id": "item", "movie_title": "title", "class": "genres"})
        items = normalise_item_table(it)
    return Dataset(_frame(df["user_id"], df["item_id"], ts), items, source=str(p), has_time=has_time)


def read_ml100k(data_path: str | Path, item_path: str | Path | None = None) -> Dataset:
    """MovieLens-100k: `u.data` (tab: user item rating ts) and `u.item` (`|`, latin-1)."""
    p = _check_file(data_path)
    df = _read_table(p, "\t", header=None, names=["user", "item", "rating", "timestamp"])
    if df["item"].isna().all():
        raise UserError("expected 4 tab-separated fields per line (user item rating timestamp)", str(p))
    ts = _numeric_timestamps(df["timestamp"], p, 1)
    items = None
    if item_path:
        ip = _check_file(item_path)
        names = ["item", "title", "release_date", "video_release_date", "url"] + [f"g{i}" for i in range(19)]
        it = _read_table(ip, "|", header=None, names=names, encoding="latin-1", quoting=3)
        flags = it[[f"g{i}" for i in range(19)]].fillna("0").to_numpy() == "1"
        it["genres"] = ["|".join(np.array(ML100K_GENRES)[row]) for row in flags]
        items = normalise_item_table(it[["item", "title", "release_date", "genres"]].fillna(""))
    return Dataset(_frame(df["user"], df["item"], ts), items, source=str(p))


def _split_dat(path: Path, n_fields: int) -> list[list[str]]:
    rows = []
    for n, line in _iter_lines(path, encoding="latin-1"):
        line = line.rstrip("\r\n")
        if not line:
            continue
        parts = line.split("::")
        if len(parts) != n_fields:
            raise UserError(f"expected {n_fields} '::'-separated fields, got {len(parts)}", str(path), n)
        rows.append(parts)
    if not rows:
        raise UserError("file has no data", str(path))
    return rows


def read_ml1m(ratings_path: str | Path, movies_path: str | Path | None = None) -> Dataset:
    """MovieLens-1M: `ratings.dat` (UserID::MovieID::Rating::Timestamp) and `movies.dat`, latin-1."""
    p = _check_file(ratings_path)
    rows = _split_dat(p, 4)
    arr = np.array(rows, dtype=object)
    ts = _numeric_timestamps(pd.Series(arr[:, 3]), p, 1)
    items = None
    if movies_path:
        mp = _check_file(movies_path)
        m = np.array(_split_dat(mp, 3), dtype=object)
        items = normalise_item_table(pd.DataFrame({"item": m[:, 0], "title": m[:, 1], "genres": m[:, 2]}))
    return Dataset(_frame(arr[:, 0], arr[:, 1], ts), items, source=str(p))


def _parse_loose_json(line: str, path: Path, lineno: int) -> dict:
    """Amazon 2014 metadata lines are Python literals (single quotes), reviews are JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        pass
    try:
        obj = ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise UserError("neither JSON nor a Python literal", str(path), lineno) from None
    if not isinstance(obj, dict):
        raise UserError("expected an object per line", str(path), lineno)
    return obj


def _read_records(path: Path, keys: list[str]) -> list[dict]:
    out = []
    for n, line in _iter_lines(path):
        if not line.strip():
            continue
        rec = _parse_loose_json(line, path, n)
        missing = [k for k in keys if k not in rec]
        if missing:
            raise UserError(f"record lacks field(s) {missing}", str(path), n)
        out.append(rec)
    if not out:
        raise UserError("file has no records", str(path))
    return out


def read_amazon(reviews_path: str | Path, meta_path: str | Path | None = None) -> Dataset:
    """Amazon 2014 reviews (reviewerID, asin, unixReviewTime) + metadata (title, categories, brand)."""
    p = _check_file(reviews_path)
    recs = _read_records(p, ["reviewerID", "asin", "unixReviewTime"])
    df = pd.DataFrame.from_records(recs, columns=["reviewerID", "asin", "unixReviewTime"])
    ts = _numeric_timestamps(df["unixReviewTime"].astype(str), p, 1)
    items = None
    if meta_path:
        mp = _check_file(meta_path)
        meta = _read_records(mp, ["asin"])
        cols = ["asin", "title", "categories", "brand", "description"]
        it = pd.DataFrame.from_records([{c: r.get(c) for c in cols} for r in meta], columns=cols)
        items = normalise_item_table(it.rename(columns={"asin": "item"}))
    return Dataset(_frame(df["reviewerID"], df["asin"], ts), items, source=str(p))


def read_sequences(
    path: str | Path, items_path: str | Path | None = None, item_id_col: str = "item_id"
) -> Dataset:
    """Sequence files (`user item1 item2 ...` per line, S3-Rec/SASRec style), chronological.

    There are no timestamps: each item's position in its line is stored as its timestamp, so
    the chronological order is exactly the file's order.
    """
    p = _check_file(path)
    users, items, pos = [], [], []
    seen = set()
    for n, line in _iter_lines(p):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise UserError("expected 'user item1 item2 ...' (a user with no items)", str(p), n)
        if "," in line or ";" in line:
            raise UserError("expected whitespace-separated ids (found ',' or ';': wrong format?)", str(p), n)
        if parts[0] in seen:
            raise UserError(f"user {parts[0]!r} appears on more than one line", str(p), n)
        seen.add(parts[0])
        k = len(parts) - 1
        users.extend([parts[0]] * k)
        items.extend(parts[1:])
        pos.extend(range(k))
    if not users:
        raise UserError("file has no sequences", str(p))
    table = read_item_table(items_path, item_id_col) if items_path else None
    return Dataset(_frame(users, items, pos), table, source=str(p), has_time=False)


READERS: dict[str, Callable[..., Dataset]] = {
    "csv": read_csv,
    "recbole": read_recbole,
    "ml-100k": read_ml100k,
    "ml-1m": read_ml1m,
    "amazon": read_amazon,
    "seq": read_sequences,
}


def read(fmt: str, path: str | Path, meta: str | Path | None = None, **kw) -> Dataset:
    """Dispatch on format name; `meta` is the item-side file (u.item, movies.dat, meta_*.json...)."""
    if fmt not in READERS:
        raise UserError(f"unknown format {fmt!r}; choose one of {sorted(READERS)}")
    if fmt == "csv":
        return read_csv(path, items_path=meta, **kw)
    if fmt == "seq":
        return read_sequences(path, meta, **kw)
    return READERS[fmt](path, meta)
