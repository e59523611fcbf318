"""Out-of-core preparation (DuckDB) equals the in-memory one; sharded data loads whole or by rank."""

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidrec.cli import main
from sidrec.data import SequenceData, prepare, read
from sidrec.data.stream import prepare_parquet

ARRAYS = ("offsets", "items", "user_ids", "timestamps")


def _log(n=20_000, seed=0, users=900, items=600) -> pd.DataFrame:
    """A skewed log with duplicates, timestamp ties, string item ids and integer user ids."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"user_id": rng.integers(0, users, n), "item_id": [f"i{v}" for v in rng.zipf(1.3, n) % items],
                       "timestamp": rng.integers(0, 300, n).astype(float)})
    return pd.concat([df, df.iloc[: n // 40]], ignore_index=True)  # exact repeats


def _same(ref: SequenceData, got: SequenceData) -> None:
    for a in ARRAYS:
        x, y = getattr(ref, a), getattr(got, a)
        assert (x is None and y is None) or np.array_equal(x, y), a
    assert ref.item_table.equals(got.item_table)


@pytest.mark.parametrize("kw", [dict(kcore_k=5, dedup="exact"), dict(kcore_k=3, dedup="user-item", max_seq_len=7),
                                dict(kcore_k=0, dedup="none")])
def test_duckdb_equals_in_memory(tmp_path, kw):
    _log().to_parquet(tmp_path / "log.parquet", index=False)
    ref = prepare(read("csv", tmp_path / "log.parquet"), **kw)
    info = prepare_parquet(tmp_path / "log.parquet", tmp_path / "out", shard_rows=2_500, **kw)
    got = SequenceData.load(tmp_path / "out")
    _same(ref, got)
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == ref.stats()
    assert len(info["parts"]) > 2 and sum(p["interactions"] for p in info["parts"]) == ref.n_interactions
    assert not list((tmp_path / "out").glob(".work*"))  # the engine's files are gone


def test_directory_of_parts_keeps_file_order_and_ranks_split_users(tmp_path):
    """A log split over files reads as their concatenation in path order (the tie-break); each rank
    loads whole users, the ranks together exactly the data."""
    df = _log(seed=1).assign(timestamp=lambda d: d["timestamp"] // 50)  # many ties
    (tmp_path / "log").mkdir()
    for j, rows in enumerate(np.array_split(np.arange(len(df)), 3)):
        df.iloc[rows].to_parquet(tmp_path / "log" / f"part-{j}.parquet", index=False)
    df.to_parquet(tmp_path / "one.parquet", index=False)
    ref = prepare(read("csv", tmp_path / "one.parquet"))
    prepare_parquet(tmp_path / "log", tmp_path / "out", shard_rows=1_000)
    whole = SequenceData.load(tmp_path / "out")
    _same(ref, whole)
    halves = [SequenceData.load(tmp_path / "out", part=(r, 2)) for r in range(2)]
    assert sum(h.n_users for h in halves) == ref.n_users and min(h.n_users for h in halves) > 0
    assert set(halves[0].user_ids).isdisjoint(halves[1].user_ids)
    for h in halves:  # each rank knows its users' global ids
        assert np.array_equal(ref.user_ids[h.user_index], h.user_ids)
    seqs = {u: tuple(h.sequence(i)) for h in halves for i, u in enumerate(h.user_ids)}
    assert seqs == {u: tuple(ref.sequence(i)) for i, u in enumerate(ref.user_ids)}


def test_no_time_column_and_side_table(tmp_path):
    df = _log(seed=2, n=5_000, users=200, items=150).drop(columns="timestamp")
    df.to_parquet(tmp_path / "log.parquet", index=False)
    meta = pd.DataFrame({"item_id": [f"i{v}" for v in range(0, 150, 2)], "title": [f"t{v}" for v in range(0, 150, 2)]})
    meta.to_parquet(tmp_path / "meta.parquet", index=False)
    ref = prepare(read("csv", tmp_path / "log.parquet", tmp_path / "meta.parquet", time_col=None))
    prepare_parquet(tmp_path / "log.parquet", tmp_path / "out", time_col=None, meta=tmp_path / "meta.parquet")
    got = SequenceData.load(tmp_path / "out")
    _same(ref, got)
    assert got.timestamps is None and set(got.item_table.columns) == {"item", "title"}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["7", "10", "u3", "2", "b"]), st.integers(0, 6), st.integers(0, 3)),
                min_size=1, max_size=60),
       st.integers(0, 3), st.sampled_from(["exact", "user-item", "none"]))
def test_duckdb_equals_in_memory_on_any_small_log(tmp_path_factory, rows, k, dedup):
    d = tmp_path_factory.mktemp("p")
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_parquet(d / "log.parquet", index=False)
    try:
        ref = prepare(read("csv", d / "log.parquet"), kcore_k=k, dedup=dedup)
    except Exception as e:  # nothing survives the k-core: both refuse
        with pytest.raises(type(e), match="core filtering"):
            prepare_parquet(d / "log.parquet", d / "out", kcore_k=k, dedup=dedup, threads=1)
        return
    prepare_parquet(d / "log.parquet", d / "out", kcore_k=k, dedup=dedup, shard_rows=7, threads=1)
    _same(ref, SequenceData.load(d / "out"))


def test_cli_engine_duckdb_and_its_errors(tmp_path, capsys):
    _log(n=4_000, users=150, items=100).to_parquet(tmp_path / "log.parquet", index=False)
    out = tmp_path / "data"
    assert main(["data", "prepare", "--format", "csv", "--path", str(tmp_path / "log.parquet"), "--engine", "duckdb",
                 "--out", str(out), "--shard-rows", "1000", "--memory-limit", "512MB"]) == 0
    assert len(list((out / "sequences").glob("part-*.parquet"))) >= 3
    assert main(["data", "stats", str(out)]) == 0
    assert "interactions" in capsys.readouterr().out
    assert main(["data", "prepare", "--format", "ml-100k", "--path", str(tmp_path / "log.parquet"), "--engine",
                 "duckdb", "--out", str(tmp_path / "x")]) == 2
    assert main(["data", "prepare", "--format", "csv", "--path", str(tmp_path / "log.parquet"), "--engine", "duckdb",
                 "--out", str(tmp_path / "y"), "--memory-limit", "lots"]) == 2
    bad = pd.DataFrame({"user_id": ["1", "2", " ", "3"], "item_id": ["a", "b", "c", "d"], "timestamp": [1.0] * 4})
    bad.to_parquet(tmp_path / "bad.parquet", index=False)
    capsys.readouterr()
    assert main(["data", "prepare", "--format", "csv", "--path", str(tmp_path / "bad.parquet"), "--engine",
                 "duckdb", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "bad.parquet, line 3" in err and "user_id" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_parts_written_by_another_engine_are_a_data_directory(tmp_path, capsys):
    """The documented contract (docs/scale-out.md), written with pyarrow as a Spark job would: the
    CLI reads it, fingerprints it and fits semantic IDs on it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(4)
    d = tmp_path / "spark"
    (d / "sequences").mkdir(parents=True)
    lens = rng.integers(3, 12, 300)
    seqs = [rng.integers(0, 40, n).astype(np.int32) for n in lens]
    for j, users in enumerate(np.array_split(np.arange(300), 4)):
        pq.write_table(pa.table({"user_index": pa.array(users, pa.int64()), "user": [f"u{u}" for u in users],
                                 "items": pa.array([seqs[u] for u in users], pa.list_(pa.int32()))}),
                       d / "sequences" / f"part-{j:05d}.parquet")
    pq.write_table(pa.table({"item": [f"i{v}" for v in range(40)]}), d / "items.parquet")
    (d / ".sidrec.json").write_text('{"kind": "data"}')
    data = SequenceData.load(d)
    assert data.n_users == 300 and data.n_interactions == lens.sum() and data.timestamps is None
    assert np.array_equal(data.sequence(7), seqs[7]) and data.user_ids[7] == "u7"
    np.save(tmp_path / "emb.npy", rng.normal(size=(40, 8)).astype(np.float32))
    assert main(["tokenize", str(d), "--embeddings", str(tmp_path / "emb.npy"), "--codebook-size", "8", "--out",
                 str(tmp_path / "ids")]) == 0
    (d / "sequences" / "part-00002.parquet").unlink()  # a missing part is refused, not read as fewer users
    capsys.readouterr()
    assert main(["data", "stats", str(d)]) == 2
    assert "user_index" in capsys.readouterr().err


def test_quotes_in_paths_and_columns_iso_and_typed_times(tmp_path):
    """Paths and column names with quotes reach the engine intact; ISO-8601 strings and typed
    timestamps become the same seconds on both engines."""
    df = _log(seed=6, n=4_000, users=150, items=100).rename(columns={"user_id": 'us"er', "item_id": "it'em"})
    t0 = pd.Timestamp("2021-03-04T05:06:07Z")
    iso = df.assign(timestamp=[(t0 + pd.Timedelta(seconds=int(v))).isoformat() for v in df["timestamp"]])
    typed = iso.assign(timestamp=pd.to_datetime(iso["timestamp"], utc=True))
    for name, frame in (("iso", iso), ("typed", typed)):
        d = tmp_path / f"it's {name}"
        d.mkdir()
        frame.to_parquet(d / "log.parquet", index=False)
        ref = prepare(read("csv", d / "log.parquet", user_col='us"er', item_col="it'em"))
        prepare_parquet(d / "log.parquet", d / "o'ut", user_col='us"er', item_col="it'em")
        got = SequenceData.load(d / "o'ut")
        _same(ref, got)
        assert abs(got.timestamps.min() - t0.timestamp()) < 300  # seconds since 1970, not micro- or milli-


def test_reserved_column_names_and_too_few_parts_are_user_errors(tmp_path, capsys):
    from sidrec.errors import UserError

    _log(n=2_000, users=80, items=60).rename(columns={"user_id": "filename"}).to_parquet(tmp_path / "l.parquet")
    assert main(["data", "prepare", "--format", "csv", "--path", str(tmp_path / "l.parquet"), "--engine", "duckdb",
                 "--user-col", "filename", "--out", str(tmp_path / "x")]) == 2
    assert "--user-col" in capsys.readouterr().err
    _log(n=2_000, users=80, items=60).to_parquet(tmp_path / "ok.parquet")
    prepare_parquet(tmp_path / "ok.parquet", tmp_path / "one")  # one part
    with pytest.raises(UserError, match="smaller --shard-rows"):
        SequenceData.load(tmp_path / "one", part=(1, 2))
