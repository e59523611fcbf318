"""The synthetic generator's ground truth P*."""

import numpy as np
import torch

from sidrec.data.synth import bayes_optimal, make_synthetic, make_world, padded_histories, sample_sequences


def test_pstar_normalised_and_deterministic():
    d1, w1 = make_synthetic(300, 200, seed=3)
    d2, w2 = make_synthetic(300, 200, seed=3)
    np.testing.assert_array_equal(d1.items, d2.items)
    np.testing.assert_array_equal(w1.latent, w2.latent)
    hist, lens = padded_histories(d1, "test")
    lp = w1.log_prob(hist, lens)
    np.testing.assert_allclose(lp.exp().sum(1).numpy(), 1.0, atol=1e-10)
    d3, _ = make_synthetic(300, 200, seed=4)
    assert not np.array_equal(d1.items[:200], d3.items[:200])


def test_pstar_matches_empirical_frequencies():
    """The marginal of the 2nd item equals sum_a P*(a) P*(. | a): check on 40k sampled users."""
    w = make_world(40, dim=8, seed=1, beta=4.0)
    offsets, items = sample_sequences(w, 40_000, min_len=2, mean_len=2, max_len=2, seed=5)
    seqs = items.reshape(-1, 2)
    p1 = torch.softmax(torch.from_numpy(w.bias).double(), 0)
    cond = w.log_prob(np.arange(40)[:, None], np.ones(40, dtype=int)).exp()  # [40 prev, 40 next]
    p2 = (p1[:, None] * cond).sum(0).numpy()
    emp1 = np.bincount(seqs[:, 0], minlength=40) / len(seqs)
    emp2 = np.bincount(seqs[:, 1], minlength=40) / len(seqs)
    assert 0.5 * np.abs(emp1 - p1.numpy()).sum() < 0.03  # total variation
    assert 0.5 * np.abs(emp2 - p2).sum() < 0.03
    # conditional of the most common first item
    a = int(np.argmax(emp1))
    sel = seqs[seqs[:, 0] == a, 1]
    emp_c = np.bincount(sel, minlength=40) / len(sel)
    assert 0.5 * np.abs(emp_c - cond[a].numpy()).sum() < 0.08


def test_bayes_optimal_metrics_are_consistent():
    d, w = make_synthetic(400, 600, seed=0)
    b = bayes_optimal(w, d, "test")
    assert 0 < b["recall@1"] <= b["recall@5"] <= b["recall@10"] <= b["recall@20"] <= 1
    assert b["ndcg@10"] <= b["recall@10"]
    assert b["entropy"] < np.log(400)
    # the realised-target NLL is an unbiased estimate of the entropy
    assert abs(b["nll"] - b["entropy"]) < 0.25


def test_items_have_hierarchy_and_text():
    d, w = make_synthetic(500, 50, seed=0)
    t = d.item_table
    assert len(t) == 500 and (t["title"].str.len() > 10).all()
    # items of the same subcategory are closer in latent space than random pairs
    z = w.latent
    same = w.subcategory[:, None] == w.subcategory[None, :]
    sims = z @ z.T
    assert sims[same].mean() > sims[~same].mean() + 0.3
