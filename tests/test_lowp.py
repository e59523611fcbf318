"""Reduced-precision item tables for serving: the numbers, the memory, and what a model so loaded may do."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sidrec
from sidrec.errors import UserError
from sidrec.model import lowp

SMALL = {"train": {"epochs": 3, "batch_size": 64}, "tokenizer": {"codebook_size": 8, "levels": 3, "embeddings": "latent"},
         "model": {"backbone": {"d_model": 32, "d_ff": 64, "n_heads": 1}}}


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.sampled_from(["float16", "bfloat16", "int8"]), st.integers(0, 99))
def test_narrow_rows_read_back_within_their_rounding(p, d, precision, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p, d, generator=g) * torch.rand(p, 1, generator=g) * 10
    t = lowp.LowPrecisionRows(x, precision)
    idx = torch.randint(0, p, (50,), generator=g)
    got = t.gather(idx)
    assert got.dtype == torch.float32
    if precision == "int8":  # half a quantisation step of the row's scale
        bound = x.abs().amax(1, keepdim=True)[idx] / 127 / 2 + 1e-6
    else:
        bound = x[idx].abs() * {"float16": 2**-11, "bfloat16": 2**-8}[precision] + 1e-6
    assert torch.all((got - x[idx]).abs() <= bound)
    q, c = torch.randn(7, d, generator=g), torch.randn(p, generator=g)
    old, lowp.BLOCK = lowp.BLOCK, 13  # several widening blocks
    try:
        s = lowp.scores_t(t, q, c)
    finally:
        lowp.BLOCK = old
    torch.testing.assert_close(s, c[:, None] + t.gather(torch.arange(p)) @ q.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lowp.scores(t, q, c), s.T)
    assert t.nbytes == (p * d + 4 * p if precision == "int8" else 2 * p * d)  # float32: 4 * p * d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowp")
    data = sidrec.synthetic(root / "data", n_items=400, n_users=2000)
    return {h: sidrec.Recommender(head=h, **SMALL).fit(data, out=root / h) for h in ("ar", "joint", "fv")}


@pytest.mark.parametrize("head", ["ar", "joint"])
def test_narrow_tables_keep_the_ranking_at_a_fraction_of_the_memory(runs, head, monkeypatch):
    monkeypatch.setattr(lowp, "NARROW_MIN_ROWS", 0)  # this catalogue's levels are small: narrow them all
    monkeypatch.setattr(lowp, "BLOCK", 64)  # and widen them in several blocks
    base = runs[head]
    data = base.data
    hist = [data.raw_item_ids()[data.sequence(u)].tolist() for u in range(300)]
    full = base.model.table_bytes()
    for precision, overlap, share in (("float16", 0.995, 0.55), ("bfloat16", 0.98, 0.55), ("int8", 0.98, 0.35)):
        rec = sidrec.Recommender.load(base.run.path, table_precision=precision)
        assert rec.model.precision == precision and rec.model.table_bytes() <= share * full
        for decode in ("beam", "exact"):
            a, sa = base.recommend(hist, k=10, decode=decode)
            b, sb = rec.recommend(hist, k=10, decode=decode)
            assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)]) >= overlap, (precision, decode)
            if decode == "exact":
                assert np.abs(np.asarray(sa) - np.asarray(sb)).max() < 0.05


def test_narrow_model_serves_only(runs, tmp_path):
    rec = sidrec.Recommender.load(runs["ar"].run.path, table_precision="int8")
    with pytest.raises(UserError, match="table_precision='float32' to add items"):
        rec.add_items(tmp_path / "new.jsonl")
    with pytest.raises(UserError, match="node-table model"):
        sidrec.Recommender.load(runs["fv"].run.path, table_precision="float16")
    with pytest.raises(UserError, match="table_precision must be one of"):
        sidrec.Recommender.load(runs["ar"].run.path, table_precision="fp8")
