"""Tokenizers and the Codebook: bijection, trie masks, round-trips, real quantization."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidrec.tokenize import Codebook, RQVAEConfig, fit_codebook
from sidrec.tokenize.quantizers import balanced_kmeans

FAST_VAE = RQVAEConfig(hidden=(32,), latent_dim=8, epochs=3, batch_size=256)


def _emb(n, d, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, d))
    return (centers[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(20, 300), d=st.sampled_from([4, 8, 12]), seed=st.integers(0, 10_000),
    method=st.sampled_from(["rq-kmeans", "rq-kmeans-balanced", "rq-vae", "pq", "opq"]),
    strategy=st.sampled_from(["reassign", "extra-token"]),
)
def test_resolved_codebook_is_bijective(n, d, seed, method, strategy):
    x = _emb(n, d, seed)
    cb = fit_codebook(x, method, levels=2, codebook_size=32,
                      resolve_strategy=strategy, seed=seed, rqvae=FAST_VAE)
    assert cb.bijective and cb.n_collisions == 0
    items = np.arange(n)
    np.testing.assert_array_equal(cb.decode(cb.encode(items)), items)
    assert len(np.unique(cb.keys)) == n


def _check_trie(cb: Codebook):
    codes = cb.codes
    for j in range(cb.levels):
        # every depth-j prefix node's mask allows exactly the tokens that extend it
        nodes = torch.arange(cb.trie.n_nodes(j))
        mask = cb.trie.valid_mask(j, nodes).numpy()
        prefixes = {}
        for row in codes:
            prefixes.setdefault(tuple(row[:j]), set()).add(int(row[j]))
        assert len(prefixes) == len(nodes)
        node_of = cb.trie.item_node[j]
        for i in range(len(codes)):
            assert set(np.flatnonzero(mask[node_of[i]])) == prefixes[tuple(codes[i, :j])]
        # child() follows exactly the valid edges
        toks = torch.arange(cb.sizes[j]).repeat(len(nodes))
        par = nodes.repeat_interleave(cb.sizes[j])
        ch = cb.trie.child(j, par, toks).numpy()
        assert np.array_equal(ch >= 0, mask.reshape(-1))
    # the leaf reached by an item's tokens is the item itself
    node = torch.zeros(cb.n_items, dtype=torch.long)
    for j in range(cb.levels):
        node = cb.trie.child(j, node, torch.from_numpy(codes[:, j]))
    assert np.array_equal(cb.trie.leaf_item[node.numpy()], np.arange(cb.n_items))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 2)), min_size=1, max_size=40,
                unique=True))
def test_trie_masks_match_existing_children(rows):
    cb = Codebook(np.array(rows), [4, 5, 3])
    _check_trie(cb)
    bad = np.array([[3, 4, 2], [0, 0, 0], [9, 0, 0]])
    dec = cb.decode(bad)
    present = {tuple(r) for r in rows}
    for r, d in zip(bad, dec):
        assert (d >= 0) == (tuple(r) in present)


def test_save_load_round_trip_bit_exact(tmp_path):
    cb = fit_codebook(_emb(400, 16, 0), "rq-kmeans", 3, 16)
    cb.save(tmp_path / "cb")
    back = Codebook.load(tmp_path / "cb")
    assert np.array_equal(back.codes, cb.codes) and back.sizes == cb.sizes
    for k, v in cb.extras.items():
        assert np.array_equal(back.extras[k], v) and back.extras[k].dtype == v.dtype
    assert back.to_json() == cb.to_json()
    with np.load(tmp_path / "cb" / "codebook.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def test_refuses_non_bijective_unless_allowed():
    codes = np.array([[0, 1], [0, 1], [1, 0]])
    with pytest.raises(ValueError, match="not bijective"):
        Codebook(codes, [2, 2])
    cb = Codebook(codes, [2, 2], allow_collisions=True)
    assert not cb.bijective and cb.n_collisions == 1


def test_collisions_recorded_and_resolved():
    x = _emb(300, 8, 1)
    x[1] = x[0]  # identical embeddings must collide
    raw = fit_codebook(x, "rq-kmeans", 2, 32, resolve_strategy="none")
    assert not raw.bijective and raw.meta["collisions_before_resolution"] >= 1
    fixed = fit_codebook(x, "rq-kmeans", 2, 32, resolve_strategy="reassign")
    assert fixed.bijective and fixed.meta["collisions_before_resolution"] == raw.n_collisions
    # only colliding items move
    moved = np.any(fixed.codes != raw.codes, axis=1)
    assert moved.sum() <= raw.n_collisions
    extra = fit_codebook(x, "rq-kmeans", 2, 32, resolve_strategy="extra-token")
    assert extra.levels == 3 and extra.bijective
    assert np.array_equal(extra.codes[:, :2], raw.codes)


def test_deterministic_for_a_seed():
    x = _emb(500, 16, 2)
    for m in ["rq-kmeans", "opq"]:
        a = fit_codebook(x, m, 2, 32, seed=5)
        b = fit_codebook(x, m, 2, 32, seed=5)
        assert np.array_equal(a.codes, b.codes)


def test_reconstruction_error_falls_with_levels():
    x = _emb(2000, 32, 3)
    errs = [fit_codebook(x, "rq-kmeans", L, 32, resolve_strategy="none").meta["reconstruction_error"]
            for L in (1, 2, 3, 4)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    cfg = RQVAEConfig(hidden=(64,), latent_dim=16, epochs=30, batch_size=256)
    vae = [fit_codebook(x, "rq-vae", L, 16, rqvae=cfg, resolve_strategy="none").meta["reconstruction_error"]
           for L in (1, 3)]
    assert vae[1] < vae[0]


def test_balanced_kmeans_near_equal_sizes():
    rng = np.random.default_rng(0)
    # very unequal natural clusters
    x = np.concatenate([rng.normal(0, 0.1, (900, 4)), rng.normal(5, 0.1, (100, 4))]).astype(np.float32)
    _, a = balanced_kmeans(x, 10, seed=0)
    cnt = np.bincount(a, minlength=10)
    assert cnt.max() - cnt.min() <= 1
    cb = fit_codebook(x, "rq-kmeans-balanced", 1, 10, resolve_strategy="none")
    assert np.bincount(cb.codes[:, 0], minlength=10).max() <= 100


def test_opq_beats_pq_on_correlated_data():
    rng = np.random.default_rng(0)
    n, d = 3000, 16
    latent = rng.normal(size=(n, 4))
    mix = rng.normal(size=(4, d))
    x = (latent @ mix + 0.05 * rng.normal(size=(n, d))).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    x = x @ q.astype(np.float32)  # spread correlated energy unevenly over the sub-spaces
    pq = fit_codebook(x, "pq", 4, 16, resolve_strategy="none").meta["reconstruction_error"]
    opq = fit_codebook(x, "opq", 4, 16, resolve_strategy="none").meta["reconstruction_error"]
    assert opq < pq


def test_too_small_id_space_is_a_user_error():
    from sidrec.errors import UserError

    with pytest.raises(UserError, match="cannot get distinct IDs"):
        fit_codebook(_emb(300, 8, 0), "rq-kmeans", 2, 8)


@pytest.mark.parametrize("method", ["rq-kmeans", "opq"])
def test_reassign_handles_crowded_prefixes(method):
    # 300 identical embeddings + 100 others in a 3 x 8 space (512 IDs): whole subtrees overflow
    x = np.concatenate([np.ones((300, 8)), _emb(100, 8, 0)]).astype(np.float32)
    cb = fit_codebook(x, method, 3, 8, resolve_strategy="reassign")
    assert cb.bijective and cb.meta["collisions_before_resolution"] >= 299


def test_streamed_rq_kmeans_reads_a_memory_map_and_assigns_exactly(tmp_path):
    """Above fit_rows items: centroids from a sample, every item assigned in batches from a
    memory-mapped file; each item's tokens are the nearest centroids of its residual cascade, its
    error is its true squared error, and resolution makes the IDs bijective as in memory."""
    from sidrec.tokenize.quantizers import rq_kmeans
    from sidrec.tokenize.resolve import resolve

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(50, 8))[rng.integers(0, 50, 30_000)] + 0.3 * rng.normal(size=(30_000, 8))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    q = rq_kmeans(mm, 3, 40, seed=0, fit_rows=4_000)
    cents = [q.extras[f"centroids_{j}"] for j in range(3)]
    res = x.astype(np.float64)
    for j, c in enumerate(cents):
        d = ((res[:, None, :] - c[None].astype(np.float64)) ** 2).sum(-1)
        best = d.min(1)
        assert np.all(d[np.arange(len(x)), q.codes[:, j]] <= best + 1e-4 * (1 + best))  # nearest, up to float32 ties
        res -= c[q.codes[:, j]]
    np.testing.assert_allclose(q.err, (res**2).sum(1), rtol=1e-3, atol=1e-4)
    full = rq_kmeans(x, 3, 40, seed=0)
    assert q.rel_err < 1.25 * full.rel_err  # a sample fit is about as good
    codes, sizes, stats = resolve(q, mm, "reassign")
    assert len(np.unique(codes @ np.array([40 * 40, 40, 1]))) == len(x) and stats["collisions_before_resolution"] > 0


def test_level_distances_are_in_code_order_for_large_batches(tmp_path):
    """level_dist's column j is the distance to code j, also past the size where faiss computes it
    (it lists each row's codes nearest first), for rows read from a file in any order."""
    from sidrec.tokenize.quantizers import rq_kmeans

    rng = np.random.default_rng(5)
    x = rng.normal(size=(40_000, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    for q in (rq_kmeans(x, 2, 256, seed=0), rq_kmeans(mm, 2, 256, seed=0, fit_rows=10_000)):
        idx = rng.permutation(len(x))[:20_000]  # 20,000 x 256 distances: faiss' path
        d = q.level_dist(1, idx, np.asarray(q.codes)[idx])
        c0, c1 = q.extras["centroids_0"], q.extras["centroids_1"]
        r = x[idx].astype(np.float64) - c0[np.asarray(q.codes)[idx, 0]]
        want = ((r[:, None, :] - c1[None].astype(np.float64)) ** 2).sum(-1)
        np.testing.assert_allclose(d, want, rtol=1e-3, atol=1e-3)
