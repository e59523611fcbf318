"""The committed tiny fixtures: made by their script, and every reader yields the same sequences."""

from pathlib import Path

import pandas as pd
import pytest

from sidrec.cli import main
from sidrec.data import SequenceData, prepare, read

from .fixtures import make_fixtures as mf

FIX = Path(__file__).resolve().parent / "fixtures"

# format, interaction file, item file, how a raw user / item id maps back to the fixture's numbers
CASES = [
    ("csv", "csv/log.csv", "csv/items.jsonl", str, str),
    ("csv", "csv/log.tsv", "csv/items.jsonl", str, str),
    ("csv", "csv/log.parquet", "csv/items.jsonl", str, str),
    ("recbole", "recbole/tiny.inter", "recbole/tiny.item", str, str),
    ("ml-100k", "ml-100k/u.data", "ml-100k/u.item", str, str),
    ("ml-1m", "ml-1m/ratings.dat", "ml-1m/movies.dat", str, str),
    ("amazon", "amazon/reviews_Tiny_5.json.gz", "amazon/meta_Tiny.json.gz", lambda u: f"A{u}", lambda i: f"B{int(i):03d}"),
    ("amazon", "amazon/reviews_Tiny_5.json", "amazon/meta_Tiny.json", lambda u: f"A{u}", lambda i: f"B{int(i):03d}"),
    ("seq", "seq/seq.txt", "seq/items.jsonl", str, str),
]


def test_fixtures_are_what_the_script_makes(tmp_path):
    mf.write(tmp_path)
    for rel, data in mf.files().items():
        assert (FIX / rel).read_bytes() == data, f"{rel}: run python tests/fixtures/make_fixtures.py"
    pd.testing.assert_frame_equal(pd.read_parquet(FIX / "csv/log.parquet"), pd.read_parquet(tmp_path / "csv/log.parquet"))
    assert all(p.stat().st_size < 8192 for p in FIX.rglob("*") if p.is_file() and p.suffix != ".py")


def _expected(user_id, item_id) -> dict[str, list[str]]:
    rows, _ = mf.world()
    out: dict[str, list[tuple[int, str]]] = {}
    for u, i, t in rows:
        out.setdefault(user_id(u), []).append((t, item_id(i)))
    return {u: [i for _, i in sorted(v)] for u, v in out.items()}


@pytest.mark.parametrize("fmt, path, meta, user_id, item_id", CASES, ids=[c[1] for c in CASES])
def test_every_reader_gives_the_same_sequences(fmt, path, meta, user_id, item_id):
    data = prepare(read(fmt, FIX / path, FIX / meta), kcore_k=0)
    raw = data.raw_item_ids()
    got = {str(u): raw[data.sequence(n)].tolist() for n, u in enumerate(data.user_ids)}
    assert got == _expected(user_id, item_id)
    titles = data.item_table.set_index("item")["title"]
    assert titles[item_id(3)].startswith("Item 3 Été")  # text survives every encoding (latin-1 for MovieLens)


@pytest.mark.parametrize("fmt, path, meta", [(c[0], c[1], c[2]) for c in CASES], ids=[c[1] for c in CASES])
def test_cli_prepares_every_fixture(fmt, path, meta, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "prepare", "--format", fmt, "--path", str(FIX / path), "--meta", str(FIX / meta),
                 "--kcore", "0", "--out", str(out)]) == 0
    assert SequenceData.load(out).n_interactions == mf.N_USERS * mf.PER_USER
