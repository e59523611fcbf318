"""Every reader on real files (../shared/data) or on fixtures in the exact upstream format."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from sidrec.data import SequenceData, prepare, read
from sidrec.data.readers import read_csv

from .conftest import shared


@pytest.mark.shared
@pytest.mark.parametrize(
    "name,path,meta,counts",
    [
        ("beauty", "amazon-beauty/s3rec/Beauty.txt", "amazon-beauty/derived/items.jsonl", (22363, 12101, 198502)),
        ("sports", "amazon-sports/s3rec/Sports_and_Outdoors.txt", "amazon-sports/derived/items.jsonl",
         (35598, 18357, 296337)),
        ("yelp", "yelp/s3rec/Yelp.txt", "yelp/derived/items.jsonl", (30431, 20033, 316354)),
    ],
)
def test_sequence_files_standard_counts(name, path, meta, counts, tmp_path):
    data = prepare(read("seq", shared(path), shared(meta)), kcore_k=5)
    assert (data.n_users, data.n_items, data.n_interactions) == counts
    data.save(tmp_path / name)
    back = SequenceData.load(tmp_path / name)
    assert back.stats()["interactions"] == counts[2]
    np.testing.assert_array_equal(back.items, data.items)


def test_beauty_text_joins(beauty_data):
    t = beauty_data.item_table
    assert (t["title"] != "").all() and (t["categories"] != "").all()
    # S3-Rec id 1 is the OPI nail lacquer (items.jsonl) and maps to internal id 0
    assert t.loc[0, "item"] == "1" and t.loc[0, "title"].startswith("OPI Nail Lacquer")
    assert "Nail Polish" in t.loc[0, "categories"]


def test_beauty_sequences_keep_file_order(beauty_data):
    first = open(shared("amazon-beauty/s3rec/Beauty.txt")).readline().split()
    raw = beauty_data.raw_item_ids()
    u = int(np.flatnonzero(beauty_data.user_ids == first[0])[0])
    assert list(raw[beauty_data.sequence(u)]) == first[1:]


@pytest.mark.shared
def test_movielens_100k_raw_and_recbole_agree():
    raw = prepare(read("ml-100k", shared("movielens-100k/raw/u.data"), shared("movielens-100k/raw/u.item")), kcore_k=0)
    rb = prepare(read("recbole", shared("movielens-100k/recbole/ml-100k.inter"),
                      shared("movielens-100k/recbole/ml-100k.item")), kcore_k=0)
    assert (raw.n_users, raw.n_items, raw.n_interactions) == (943, 1682, 100000)
    assert (rb.n_users, rb.n_items, rb.n_interactions) == (943, 1682, 100000)
    np.testing.assert_array_equal(raw.offsets, rb.offsets)
    np.testing.assert_array_equal(raw.items, rb.items)
    assert raw.item_table.loc[0, "title"] == "Toy Story (1995)"
    assert "Comedy" in raw.item_table.loc[0, "genres"] and "Comedy" in rb.item_table.loc[0, "genres"]
    # chronological within each user
    ts = raw.timestamps
    same_user = np.repeat(np.arange(raw.n_users), raw.lengths)
    assert np.all((np.diff(ts) >= 0) | (np.diff(same_user) != 0))


def _write_ml1m(tmp_path):
    ratings = []
    rng = np.random.default_rng(0)
    for u in range(1, 8):
        for m in rng.choice(np.arange(1, 12), 6, replace=False):
            ratings.append(f"{u}::{m}::{rng.integers(1, 6)}::{978300000 + int(rng.integers(0, 10000))}")
    (tmp_path / "ratings.dat").write_text("\n".join(ratings) + "\n", encoding="latin-1")
    movies = [f"{m}::Movie {m} (19{80 + m})::Comedy|Drama" for m in range(1, 12)]
    movies[0] = "1::Amélie (2001)::Comedy|Romance"
    (tmp_path / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    return len(ratings)


def test_ml1m_reader(tmp_path):
    n = _write_ml1m(tmp_path)
    ds = read("ml-1m", tmp_path / "ratings.dat", tmp_path / "movies.dat")
    assert len(ds.interactions) == n
    data = prepare(ds, kcore_k=0)
    t = data.item_table.set_index("item")
    assert t.loc["1", "title"] == "Amélie (2001)"
    assert t.loc["1", "genres"] == "Comedy|Romance"


def _amazon_fixture(tmp_path, compress: bool):
    reviews = []
    for u in range(7):
        for k in range(5):
            reviews.append({"reviewerID": f"A{u}", "asin": f"B00{(u + k) % 7}", "overall": 5.0,
                            "unixReviewTime": 1400000000 + 100 * k, "reviewText": "ok"})
    meta = [
        {"asin": f"B00{i}", "title": f"Lipstick {i}", "categories": [["Beauty", "Makeup", "Lips"]],
         "brand": "Acme", "price": 3.5}
        for i in range(7)
    ]
    rtxt = "\n".join(json.dumps(r) for r in reviews) + "\n"
    mtxt = "\n".join(repr(m) for m in meta) + "\n"  # python-literal lines, as upstream
    if compress:
        rp, mp = tmp_path / "reviews_Beauty_5.json.gz", tmp_path / "meta_Beauty.json.gz"
        rp.write_bytes(gzip.compress(rtxt.encode()))
        mp.write_bytes(gzip.compress(mtxt.encode()))
    else:
        rp, mp = tmp_path / "reviews_Beauty_5.json", tmp_path / "meta_Beauty.json"
        rp.write_text(rtxt)
        mp.write_text(mtxt)
    return rp, mp


@pytest.mark.parametrize("compress", [True, False])
def test_amazon_reader(tmp_path, compress):
    rp, mp = _amazon_fixture(tmp_path, compress)
    data = prepare(read("amazon", rp, mp), kcore_k=5)
    assert data.n_users == 7 and data.n_interactions == 35
    t = data.item_table.set_index("item")
    assert t.loc["B003", "title"] == "Lipstick 3"
    assert t.loc["B003", "categories"] == "Beauty, Makeup, Lips" and t.loc["B003", "brand"] == "Acme"


@pytest.mark.parametrize("ext", ["csv", "tsv", "parquet"])
def test_generic_table_reader(tmp_path, ext):
    df = pd.DataFrame({"uid": ["u1"] * 4 + ["u2"] * 3, "iid": list("abcdabc"),
                       "ts": [5, 1, 1, 9, 3, 2, 1]})
    p = tmp_path / f"log.{ext}"
    if ext == "parquet":
        df.to_parquet(p)
    else:
        df.to_csv(p, sep="\t" if ext == "tsv" else ",", index=False)
    data = prepare(read_csv(p, user_col="uid", item_col="iid", time_col="ts"), kcore_k=0)
    raw = data.raw_item_ids()
    # u1: ts (5,1,1,9) -> b, c (tie keeps file order), a, d
    assert list(raw[data.sequence(0)]) == ["b", "c", "a", "d"]
    assert list(raw[data.sequence(1)]) == ["c", "b", "a"]


def test_iso_dates_accepted(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id,timestamp\n1,x,2020-01-02\n1,y,2020-01-01\n1,z,2020-01-03\n")
    data = prepare(read_csv(p), kcore_k=0)
    assert list(data.raw_item_ids()[data.sequence(0)]) == ["y", "x", "z"]
