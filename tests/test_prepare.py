"""Preparation invariants: k-core, tie-break, id maps, leave-one-out split."""

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from sidrec.data import Dataset, prepare
from sidrec.data.prepare import kcore


def _brute_kcore(users, items, k, ku):
    rows = set(range(len(users)))
    while True:
        uc = pd.Series([users[r] for r in rows]).value_counts()
        ic = pd.Series([items[r] for r in rows]).value_counts()
        new = {r for r in rows if uc[users[r]] >= ku and ic[items[r]] >= k}
        if new == rows:
            return rows
        rows = new
        if not rows:
            return rows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=80), st.integers(1, 4))
def test_kcore_matches_brute_force(pairs, k):
    u = np.array([p[0] for p in pairs])
    i = np.array([p[1] for p in pairs])
    keep = kcore(u, i, k)
    assert set(np.flatnonzero(keep)) == _brute_kcore(u, i, k, max(k, 3))


def _ds(rows):
    df = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).astype({"user": str, "item": str, "timestamp": float})
    return Dataset(df, source="test")


def test_ties_keep_file_order_not_item_id():
    # equal timestamps: file order is 9, 1, 5 and must survive (sorting by id would give 1, 5, 9)
    data = prepare(_ds([("u", "9", 1), ("u", "1", 1), ("u", "5", 1), ("u", "2", 0)]), kcore_k=0)
    assert list(data.raw_item_ids()[data.sequence(0)]) == ["2", "9", "1", "5"]


def test_ids_contiguous_sorted_numerically():
    data = prepare(_ds([("10", "30", 1), ("10", "4", 2), ("10", "200", 3), ("2", "4", 1), ("2", "30", 2),
                        ("2", "200", 3)]), kcore_k=0)
    assert list(data.raw_item_ids()) == ["4", "30", "200"]
    assert list(data.user_ids) == ["2", "10"]


def test_dedup_modes():
    rows = [("u", "a", 1), ("u", "a", 1), ("u", "b", 2), ("u", "a", 3), ("u", "c", 4)]
    assert prepare(_ds(rows), kcore_k=0, dedup="exact").n_interactions == 4
    assert prepare(_ds(rows), kcore_k=0, dedup="user-item").n_interactions == 3
    assert prepare(_ds(rows), kcore_k=0, dedup="none").n_interactions == 5


def test_max_seq_len_keeps_most_recent():
    rows = [("u", str(i), i) for i in range(10)] + [("v", str(i), i) for i in range(4)]
    data = prepare(_ds(rows), kcore_k=0, max_seq_len=5)
    assert list(data.raw_item_ids()[data.sequence(0)]) == ["5", "6", "7", "8", "9"]
    assert data.lengths.tolist() == [5, 4]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 30), min_size=3, max_size=15), min_size=1, max_size=20))
def test_split_never_leaks(seqs):
    rows = [(str(u), str(it), t) for u, s in enumerate(seqs) for t, it in enumerate(s)]
    data = prepare(_ds(rows), kcore_k=0, dedup="none")
    for split, back in (("valid", 2), ("test", 1)):
        end = data.history_end(split)
        tgt = data.targets(split)
        for u in range(data.n_users):
            seq = data.sequence(u)
            hist = data.items[data.offsets[u] : end[u]]
            assert len(hist) == len(seq) - back  # history is exactly the prefix before the target
            assert tgt[u] == seq[-back]
        # the repeat statistic counts exactly the users whose target is in that history
        want = np.mean([tgt[u] in data.items[data.offsets[u]: end[u]] for u in range(data.n_users)])
        assert data.stats()[f"{split}_target_in_history"] == round(want, 4)
    # train prefix ends before the validation target, which precedes the test target
    assert np.all(data.history_end("train") < data.history_end("test"))
    assert np.all(data.history_end("train") - data.offsets[:-1] >= 1)


def test_beauty_round_trip(beauty_data, tmp_path):
    from sidrec.data import SequenceData

    beauty_data.save(tmp_path / "b")
    back = SequenceData.load(tmp_path / "b")
    np.testing.assert_array_equal(back.offsets, beauty_data.offsets)
    np.testing.assert_array_equal(back.items, beauty_data.items)
    assert back.raw_item_ids().tolist() == beauty_data.raw_item_ids().tolist()
