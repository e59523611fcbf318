"""Metrics against hand-computed values and an independent brute-force reference."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sidrec.evaluate import overlap_at
from sidrec.evaluate.metrics import metrics_from_ranks, ranks_in_lists


def test_hand_computed():
    m = metrics_from_ranks(np.array([1, 3, 11, np.inf]))
    assert m["recall@1"] == 0.25
    assert m["recall@5"] == 0.5 and m["recall@10"] == 0.5 and m["recall@20"] == 0.75
    assert math.isclose(m["ndcg@5"], (1 + 1 / math.log2(4)) / 4)
    assert math.isclose(m["ndcg@20"], (1 + 1 / math.log2(4) + 1 / math.log2(12)) / 4)
    assert math.isclose(m["mrr"], (1 + 1 / 3 + 1 / 11) / 4)


def _reference(scores, targets, k):
    """Brute force: sort every row, find the target, DCG with one relevant item (IDCG = 1)."""
    rec, ndcg = [], []
    for s, t in zip(scores, targets):
        order = sorted(range(len(s)), key=lambda i: -s[i])
        top = order[:k]
        rec.append(1.0 if t in top else 0.0)
        ndcg.append(sum(1 / math.log2(r + 2) for r, i in enumerate(top) if i == t))
    return np.mean(rec), np.mean(ndcg)


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 60), st.integers(1, 30), st.integers(0, 10_000))
def test_agrees_with_brute_force(n_items, n_users, seed):
    rng = np.random.default_rng(seed)
    scores = rng.permutation(n_users * n_items).reshape(n_users, n_items).astype(float)  # no ties
    targets = rng.integers(0, n_items, n_users)
    ranks = (scores > scores[np.arange(n_users), targets][:, None]).sum(1) + 1
    m = metrics_from_ranks(ranks)
    for k in (5, 10, 20):
        r, n = _reference(scores, targets, k)
        assert math.isclose(m[f"ndcg@{k}"], n, abs_tol=1e-12)
        assert math.isclose(m[f"recall@{k}"], r, abs_tol=1e-12)
    # list-based ranks agree with score-based ranks inside the list
    top = np.argsort(-scores, 1)[:, :20]
    lr = ranks_in_lists(top, targets)
    inside = ranks <= 20
    assert np.array_equal(lr[inside], ranks[inside]) and np.all(np.isinf(lr[~inside]))


def test_overlap():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    b = np.array([[3, 2, 9], [7, 8, 9]])
    assert math.isclose(overlap_at(a, b, 3), (2 / 3 + 0) / 2)


def test_popularity_ranking_hand_example():
    import pandas as pd

    from sidrec.data import SequenceData
    from sidrec.evaluate import popularity_ranking

    # train prefixes: u0 [0,0,1], u1 [0]; item 0 is most popular, then 1, then 2
    seqs = [[0, 0, 1, 2, 1], [0, 2, 0]]
    offsets = np.array([0, 5, 8])
    data = SequenceData(offsets, np.concatenate(seqs).astype(np.int32), np.array(["a", "b"]),
                        pd.DataFrame({"item": ["x", "y", "z"]}))
    m = popularity_ranking(data, "test")  # targets: 1 (rank 2) and 0 (rank 1)
    assert m["recall@1"] == 0.5 and m["recall@5"] == 1.0
    assert math.isclose(m["mrr"], (1 / 2 + 1) / 2)


@settings(max_examples=40, deadline=None)
@given(n_items=st.integers(2, 40), n_users=st.integers(1, 12), hist_len=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_exact_ranks_match_masking_the_history(n_items, n_users, hist_len, seed):
    """Subtracting the history's items from the count equals masking them out of the score matrix,
    with ties, repeated history items, padding, -inf scores and targets inside the history."""
    import torch

    from sidrec.evaluate import _history_mask, exact_ranks

    rng = np.random.default_rng(seed)
    s = torch.from_numpy(rng.integers(-3, 3, (n_users, n_items)).astype(np.float32))  # many ties
    s[torch.from_numpy(rng.random((n_users, n_items)) < 0.1)] = float("-inf")
    hist = torch.from_numpy(rng.integers(0, n_items + 1, (n_users, hist_len)))  # n_items = padding
    tgt = torch.from_numpy(rng.integers(0, n_items, n_users))
    masked = s.masked_fill(_history_mask(hist, n_items, n_items), float("-inf"))
    for scores, history in ((s, None), (s, hist)):
        ref = masked if history is not None else scores
        ts = ref.gather(1, tgt[:, None])
        want = np.where(np.isfinite(ts.squeeze(1).numpy()), (ref > ts).sum(1).numpy() + 1.0, np.inf)
        got = exact_ranks(scores, tgt, history, n_items).numpy()
        np.testing.assert_array_equal(got, want)
        assert np.array_equal(exact_ranks(scores.T.contiguous().T, tgt, history, n_items).numpy(), want)
