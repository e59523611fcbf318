"""Bad input: one clear message naming the file (and line), exit 2, nothing half-written."""

import gzip

import pytest

from sidrec.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _prepare(capsys, tmp_path, fmt, path, *extra):
    out = tmp_path / "out"
    code, err = run(capsys, "data", "prepare", "--format", fmt, "--path", str(path), "--out", str(out), *extra)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("sidrec: error:")
    assert not out.exists(), "nothing may be written on error"
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir()), "no temp dirs left behind"
    return err


def test_empty_file(capsys, tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("")
    err = _prepare(capsys, tmp_path, "csv", p)
    assert str(p) in err and "empty" in err


def test_missing_column(capsys, tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id,item\n1,2\n")
    err = _prepare(capsys, tmp_path, "csv", p)
    assert str(p) in err and "item_id" in err and "missing column" in err


def test_non_numeric_timestamp_names_line(capsys, tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id,timestamp\n1,a,10\n1,b,11\n1,c,yesterday\n")
    err = _prepare(capsys, tmp_path, "csv", p)
    assert f"{p}, line 4" in err and "yesterday" in err


def test_truncated_gzip(capsys, tmp_path):
    data = gzip.compress(b"".join(
        b'{"reviewerID": "A%d", "asin": "B%d", "unixReviewTime": 1}\n' % (i, i) for i in range(2000)))
    p = tmp_path / "reviews_Beauty_5.json.gz"
    p.write_bytes(data[: len(data) // 2])
    err = _prepare(capsys, tmp_path, "amazon", p)
    assert str(p) in err and "truncated" in err


def test_wrong_separator(capsys, tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id\titem_id\ttimestamp\n1\ta\t1\n")
    err = _prepare(capsys, tmp_path, "csv", p)
    assert "wrong --sep" in err and str(p) in err


def test_wrong_separator_in_sequence_file(capsys, tmp_path):
    p = tmp_path / "seq.txt"
    p.write_text("1 2 3 4\n2,3,4,5\n")
    err = _prepare(capsys, tmp_path, "seq", p)
    assert f"{p}, line 2" in err


def test_kcore_empties_data(capsys, tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id,item_id,timestamp\n1,a,1\n1,b,2\n2,a,3\n")
    err = _prepare(capsys, tmp_path, "csv", p, "--kcore", "5")
    assert "no interactions left after 5-core" in err


def test_malformed_json_line(capsys, tmp_path):
    p = tmp_path / "reviews.json"
    p.write_text('{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n{"reviewerID": \n')
    err = _prepare(capsys, tmp_path, "amazon", p)
    assert f"{p}, line 2" in err


def test_ml1m_bad_field_count(capsys, tmp_path):
    p = tmp_path / "ratings.dat"
    p.write_text("1::2::3::4\n1::2::3\n")
    err = _prepare(capsys, tmp_path, "ml-1m", p)
    assert f"{p}, line 2" in err


def test_missing_file(capsys, tmp_path):
    err = _prepare(capsys, tmp_path, "seq", tmp_path / "nope.txt")
    assert "not found" in err


def test_stats_on_non_data_dir(capsys, tmp_path):
    code, err = run(capsys, "data", "stats", str(tmp_path))
    assert code == 2 and "not a prepared data directory" in err


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "--format", "xml", "--path", "x", "--out", "y"])
    assert e.value.code == 2


def test_nul_in_an_item_id_names_its_line(capsys, tmp_path):
    p = tmp_path / "log.csv"  # NumPy strings would turn "b\0" into "b" and merge two items
    p.write_text("user_id,item_id,timestamp\n1,a,10\n1,b\x00,11\n1,b,12\n")
    err = _prepare(capsys, tmp_path, "csv", p)
    assert f"{p}, line 3" in err and "NUL" in err


def test_nul_ids_are_refused_by_every_other_entry(capsys, tmp_path):
    """S3-Rec lines, JSON item tables and DataFrames reach the same check (prepare, item tables)."""
    import pandas as pd

    import sidrec

    seq = tmp_path / "seq.txt"
    seq.write_text("u1 a b\x00 c\nu2 a b c\n")
    assert "NUL" in _prepare(capsys, tmp_path, "seq", seq)
    frame = pd.DataFrame({"user_id": ["1", "1", "2"], "item_id": ["a", "b\x00", "a"], "timestamp": [1, 2, 3]})
    with pytest.raises(sidrec.errors.UserError, match="NUL"):
        sidrec.from_frame(frame, kcore=0)
    items = pd.DataFrame({"item_id": ["a", "a\x00"], "title": ["x", "y"]})
    with pytest.raises(sidrec.errors.UserError, match="NUL"):
        sidrec.from_frame(frame.assign(item_id=["a", "b", "a"]), items=items, kcore=0)
