"""Beam search: never invalid or duplicate, exhaustive when the beam covers the trie."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidrec.decode import beam_search, exact_topk
from sidrec.model import BackboneConfig, ModelConfig, SeqRecModel
from sidrec.tokenize import Codebook


def _head(codes, sizes, seed, constrained=True, scale=1.0, item_vectors=None):
    """item_vectors: the recipe's item terms (mean item vectors + node biases); None: as constrained."""
    cb = Codebook(codes, sizes)
    cfg = ModelConfig(head="ar", constrained=constrained,
                      item_vectors=constrained if item_vectors is None else item_vectors,
                      backbone=BackboneConfig(d_model=8, n_heads=2, max_len=4))
    torch.manual_seed(seed)
    m = SeqRecModel(cfg, len(codes), cb).double()
    with torch.no_grad():
        for p in [*m.head.parameters(), m.backbone.item_emb.weight]:
            p.normal_(0, scale)
    return m.head


def _random_codes(rng, n, sizes):
    space = int(np.prod(sizes))
    keys = rng.choice(space, size=min(n, space), replace=False)
    codes = np.stack(np.unravel_index(keys, sizes), 1)
    return codes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(1, 60), beam=st.integers(1, 12),
       sizes=st.sampled_from([[4, 4], [3, 5, 2], [8, 2, 3], [2, 2, 2, 2]]), iv=st.booleans())
def test_beam_returns_distinct_valid_items(seed, n, beam, sizes, iv):
    rng = np.random.default_rng(seed)
    codes = _random_codes(rng, n, sizes)
    head = _head(codes, sizes, seed, item_vectors=iv)
    h = torch.randn(6, 8, dtype=torch.float64)
    k = min(beam, len(codes))
    r = beam_search(head, h, beam=beam, k=k)
    assert r.n_invalid == 0
    items = r.items.numpy()
    for row, lp in zip(items, r.log_probs.numpy()):
        valid = row[row >= 0]
        assert len(valid) == len(set(valid.tolist()))  # distinct
        assert np.all(valid < len(codes))
        assert np.all(np.diff(lp[np.isfinite(lp)]) <= 1e-12)  # sorted by log-prob
    # returned scores are the exact log Q of the returned items
    full = head.log_prob_all(h).detach()
    ok = r.items >= 0
    np.testing.assert_allclose(r.log_probs[ok].numpy(), full.gather(1, r.items.clamp(min=0))[ok].numpy(), atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), sizes=st.sampled_from([[4, 4], [3, 5, 2], [6, 7]]),
       iv=st.booleans())
def test_full_beam_equals_exhaustive_search(seed, n, sizes, iv):
    rng = np.random.default_rng(seed)
    codes = _random_codes(rng, n, sizes)
    head = _head(codes, sizes, seed, item_vectors=iv)
    h = torch.randn(5, 8, dtype=torch.float64)
    k = len(codes)
    r = beam_search(head, h, beam=int(np.prod(sizes)), k=k)
    ex_i, ex_v = exact_topk(head, h, k)
    np.testing.assert_allclose(r.log_probs.numpy(), ex_v.numpy(), atol=1e-9)
    assert np.array_equal(np.sort(r.items.numpy(), 1), np.sort(ex_i.numpy(), 1))


def test_unconstrained_beam_reports_invalid_ids():
    rng = np.random.default_rng(0)
    codes = _random_codes(rng, 5, [8, 8])  # 5 valid IDs out of 64
    head = _head(codes, [8, 8], 0, constrained=False)
    r = beam_search(head, torch.randn(20, 8, dtype=torch.float64), beam=10, k=10)
    assert r.n_invalid > 0
    assert (r.items < 0).any()
    rc = beam_search(head, torch.randn(20, 8, dtype=torch.float64), beam=10, k=5, constrained=True)
    assert rc.n_invalid == 0 and (rc.items >= 0).all()


def _random_filter(rng, n_items, rows):
    """Per row: maybe an allow list, maybe excluded items (a history or a deny list)."""
    from sidrec.decode import ItemFilter

    allow = [None if rng.random() < 0.5 else rng.choice(n_items, rng.integers(0, n_items + 1), replace=False)
             for _ in range(rows)]
    excl = [rng.choice(n_items, rng.integers(0, n_items + 1), replace=False) for _ in range(rows)]
    return ItemFilter.build(n_items, rows, exclude=excl, allow=allow), allow, excl


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(1, 50), beam=st.integers(1, 12),
       sizes=st.sampled_from([[4, 4], [3, 5, 2], [8, 2, 3], [2, 2, 2, 2]]), iv=st.booleans())
def test_filtered_beam_returns_only_allowed_items_and_k_when_k_allowed(seed, n, beam, sizes, iv):
    """Allow/deny/seen filters act inside the search: only allowed items, min(k, #allowed) of them,
    each with its exact (unfiltered) log Q."""
    rng = np.random.default_rng(seed)
    codes = _random_codes(rng, n, sizes)
    head = _head(codes, sizes, seed, item_vectors=iv)
    h = torch.randn(6, 8, dtype=torch.float64)
    filt, allow, excl = _random_filter(rng, len(codes), 6)
    k = min(beam, len(codes))
    r = beam_search(head, h, beam=beam, k=k, item_filter=filt)
    full = head.log_prob_all(h).detach()
    for row in range(6):
        got = r.items[row].numpy()
        ok = set(range(len(codes))) if allow[row] is None else set(allow[row].tolist())
        ok -= set(excl[row].tolist())
        assert set(got[got >= 0].tolist()) <= ok
        assert (got >= 0).sum() == min(k, len(ok)) and len(ok) == filt.n_allowed()[row]
        live = got >= 0
        np.testing.assert_allclose(r.log_probs[row].numpy()[live], full[row, got[live]].numpy(), atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), sizes=st.sampled_from([[4, 4], [3, 5, 2], [6, 7]]))
def test_filtered_full_beam_equals_masked_exact_ranking(seed, n, sizes):
    rng = np.random.default_rng(seed)
    codes = _random_codes(rng, n, sizes)
    head = _head(codes, sizes, seed)
    h = torch.randn(5, 8, dtype=torch.float64)
    filt, _, _ = _random_filter(rng, len(codes), 5)
    k = len(codes)
    r = beam_search(head, h, beam=int(np.prod(sizes)), k=k, item_filter=filt)
    ex_v, ex_i = torch.topk(filt.mask_scores(head.log_prob_all(h).detach().clone()), k, dim=1)
    np.testing.assert_allclose(r.log_probs.numpy(), ex_v.numpy(), atol=1e-9)
    same = torch.isfinite(ex_v)
    assert np.array_equal(np.sort(np.where(same, r.items, -1), 1), np.sort(np.where(same, ex_i, -1), 1))


def _dense_beam(head, h, beam):
    """The reference: each level's dense [B * W, V_j] child scores, log-softmax, one top-k."""
    trie, tables, b = head.trie, head.eval_cache(h.device), len(h)
    nodes, logp = torch.zeros(b, 1, dtype=torch.long), torch.zeros(b, 1)
    for j, q in enumerate(head.contexts(h)):
        w, v = nodes.shape[1], head.sizes[j]
        lp = torch.log_softmax(head.child_scores(j, q, nodes.reshape(-1), tables), -1).nan_to_num(nan=float("-inf"))
        logp, top = torch.topk((logp.reshape(-1, 1) + lp).reshape(b, w * v), min(beam, w * v), dim=1)
        parent = torch.gather(nodes, 1, top // v)
        nodes = torch.full_like(parent, -1)
        ok = parent >= 0
        nodes[ok] = trie.child(j, parent[ok], (top % v)[ok])
    return trie.torch("first_item", trie.depth, h.device)[nodes.clamp(min=0)], logp


def test_flat_constrained_step_matches_dense_scoring():
    """Beam search's flat level step (the live beams' real children, normalised over their siblings)
    returns the items and log Q of the dense per-level scoring it replaced."""
    from sidrec.model import AutoregressiveHead
    from sidrec.tokenize import fit_codebook

    torch.manual_seed(0)
    cb = fit_codebook(np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32), "rq-kmeans", 3, 8, seed=0)
    head = AutoregressiveHead(16, cb).eval()
    for p in head.parameters():  # away from the uniform start, so that beams differ
        torch.nn.init.normal_(p, std=0.5)
    h = torch.randn(7, 16)
    r = beam_search(head, h, beam=12, k=12)
    items, logp = _dense_beam(head, h, 12)
    assert torch.equal(r.items, items)
    torch.testing.assert_close(r.log_probs, logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(r.log_probs, head.log_prob_all(h).gather(1, r.items), rtol=0, atol=1e-5)
