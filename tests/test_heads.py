"""Heads: normalisation, loss identities, leaks, gradients — the maths the theorem rests on."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidrec.model import AutoregressiveHead, BackboneConfig, ModelConfig, SeqRecModel
from sidrec.tokenize import Codebook, fit_codebook


def _codebook(n=200, seed=0, levels=3, size=8):
    x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return fit_codebook(x, "rq-kmeans", levels, size, seed=seed)


def _model(head, cb, n, constrained=True, scale=0.3, item_input="id", dtype=torch.float64, **kw):
    kw.setdefault("item_vectors", constrained)  # the unconstrained counter-example is token-only
    cfg = ModelConfig(head=head, constrained=constrained, **kw,
                      backbone=BackboneConfig(d_model=16, n_heads=2, d_ff=32, max_len=8, item_input=item_input))
    torch.manual_seed(0)
    m = SeqRecModel(cfg, n, cb).to(dtype)
    with torch.no_grad():
        for p in m.head.parameters():
            p.normal_(0, scale)
    return m


@pytest.mark.parametrize("head,constrained", [("ar", True), ("fv", True), ("parallel", True)])
def test_log_prob_all_sums_to_one(head, constrained):
    cb = _codebook()
    m = _model(head, cb, cb.n_items, constrained)
    h = torch.randn(7, 16, dtype=torch.float64)
    lp = m.head.log_prob_all(h).detach()
    assert lp.shape == (7, cb.n_items)
    np.testing.assert_allclose(lp.exp().sum(1).numpy(), 1.0, atol=1e-10)


@pytest.mark.parametrize("head,constrained", [("ar", True), ("ar", False), ("fv", True), ("parallel", True)])
def test_loss_is_minus_log_prob_of_target(head, constrained):
    cb = _codebook()
    m = _model(head, cb, cb.n_items, constrained)
    h = torch.randn(9, 16, dtype=torch.float64)
    items = torch.randint(0, cb.n_items, (9,))
    nll = m.head.nll(h, items).detach()
    np.testing.assert_allclose(nll.numpy(), -m.head.log_prob(h, items).detach().numpy(), atol=1e-12)
    if head != "parallel":  # the parallel head's loss is over its own (unrenormalised) ID distribution
        full = m.head.log_prob_all(h).detach()
        np.testing.assert_allclose(nll.numpy(), -full.gather(1, items[:, None]).squeeze(1).numpy(), atol=1e-9)


def test_ar_identity_float32_tolerance():
    cb = _codebook(400, levels=3, size=16)
    m = _model("ar", cb, cb.n_items, scale=0.05, dtype=torch.float32)
    h = torch.randn(16, 16)
    items = torch.arange(16) * 7
    diff = (m.head.nll(h, items) + m.head.log_prob_all(h)[torch.arange(16), items]).abs().max()
    assert diff < 1e-5


def test_unconstrained_ar_leaks_mass():
    cb = _codebook(60, levels=2, size=16)  # 60 valid IDs out of 256
    m = _model("ar", cb, cb.n_items, constrained=False)
    lp = m.head.log_prob_all(torch.randn(5, 16, dtype=torch.float64)).detach()
    mass = lp.exp().sum(1)
    assert torch.all(mass < 1 - 1e-3), mass


def test_parallel_head_unrenormalised_mass_below_one():
    cb = _codebook(60, levels=2, size=16)
    m = _model("parallel", cb, cb.n_items)
    lp = m.head.rank_scores(torch.randn(5, 16, dtype=torch.float64)).detach()
    assert torch.all(lp.exp().sum(1) < 1)


@pytest.mark.parametrize("head", ["ar", "fv", "parallel"])
@pytest.mark.parametrize("item_input", ["id", "sid", "both"])
def test_gradients_reach_every_parameter(head, item_input):
    cb = _codebook()
    m = _model(head, cb, cb.n_items, item_input=item_input, dtype=torch.float32, scale=0.1)
    items = torch.randint(0, cb.n_items, (4, 6))
    targets = torch.randint(0, cb.n_items, (4, 6))
    m.train()
    m.nll(items, targets).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_codebook_with_collisions_is_flagged():
    codes = np.array([[0, 0], [0, 0], [1, 1]])
    cb = Codebook(codes, [2, 2], allow_collisions=True)
    assert not cb.bijective


@pytest.mark.parametrize("head", ["ar", "parallel"])
def test_tied_token_vectors_are_the_input_token_table(head):
    """tied + semantic-token inputs: output token vectors are views of the backbone's input table."""
    cb = _codebook()
    m = _model(head, cb, cb.n_items, item_input="both")
    assert not [n for n, _ in m.head.named_parameters() if n.startswith("tok_out")]
    table = m.backbone.tok_emb.weight
    assert m.head.tok_out[1].data_ptr() == table[cb.sizes[0]:].data_ptr()
    h = torch.randn(6, 16, dtype=torch.float64)
    lp = m.head.log_prob_all(h).detach()
    np.testing.assert_allclose(lp.exp().sum(1).numpy(), 1.0, atol=1e-10)
    items = torch.arange(6) * 11
    loss = m.head.nll(h, items)
    if head == "ar":
        np.testing.assert_allclose(loss.detach().numpy(), -lp[torch.arange(6), items].numpy(), atol=1e-9)
    loss.sum().backward()
    assert table.grad is not None and table.grad[: sum(cb.sizes)].abs().sum() > 0
    fresh = _model(head, cb, cb.n_items, item_input="both")
    fresh.load_state_dict(m.state_dict())
    np.testing.assert_allclose(fresh.head.log_prob_all(h).detach().numpy(), lp.numpy(), atol=1e-12)
    untied = SeqRecModel(ModelConfig(head=head, tied=False, backbone=m.cfg.backbone), cb.n_items, cb)
    assert [n for n, _ in untied.head.named_parameters() if n.startswith("tok_out")]


@pytest.mark.parametrize("tied", [True, False])
def test_item_vectors_keep_the_identities(tied):
    """The recipe head scores nodes with token + mean item vectors + node bias; Q still sums to 1, the
    loss is -log Q(target), the item table learns, and (tied) it is the backbone's input table."""
    cb = _codebook(300, levels=2, size=32)  # 32 first tokens for 300 items: ~9 siblings each
    m = _model("ar", cb, cb.n_items, tied=tied, node_table=False)  # free item vectors (the node table: test_node_table)
    with torch.no_grad():
        m.backbone.item_emb.weight.normal_(0, 0.3)
    table = m.backbone.item_emb.weight if tied else m.head.item_emb.weight
    assert any(n.startswith("item_emb") for n, _ in m.head.named_parameters()) != tied
    h = torch.randn(8, 16, dtype=torch.float64)
    lp = m.head.log_prob_all(h)
    np.testing.assert_allclose(lp.detach().exp().sum(1).numpy(), 1.0, atol=1e-10)
    items = torch.arange(8) * 37
    loss = m.head.nll(h, items)
    np.testing.assert_allclose(loss.detach().numpy(), -lp.detach()[torch.arange(8), items].numpy(), atol=1e-9)
    loss.sum().backward()
    assert table.grad is not None and table.grad[items].abs().sum() > 0
    # upper levels see the items' mean: non-target items get gradient too
    assert (table.grad[: cb.n_items].abs().sum(1) > 0).sum() > 2 * len(items)
    plain = _model("ar", cb, cb.n_items, item_vectors=False)  # the token-only head: another distribution
    assert not torch.allclose(plain.head.log_prob_all(h), lp)
    np.testing.assert_allclose(plain.head.log_prob_all(h).detach().exp().sum(1).numpy(), 1.0, atol=1e-10)
    fresh = _model("ar", cb, cb.n_items, tied=tied, node_table=False)
    fresh.load_state_dict(m.state_dict())
    np.testing.assert_allclose(fresh.head.log_prob_all(h).detach().numpy(), lp.detach().numpy(), atol=1e-12)


@pytest.mark.parametrize("node_table", [False, True])
def test_node_bias_starts_uniform_over_items_and_learns(node_table):
    """One bias per trie node, started at log(#items below). With every other output parameter at
    zero, Q is then 1/N for every item (uniform over items, as FV-MLE starts), not uniform over
    children; the biases get gradient, and the identities hold with them."""
    cb = _codebook(300, levels=3, size=8)
    cfg = ModelConfig(head="ar", node_table=node_table, backbone=BackboneConfig(d_model=16, n_heads=2, d_ff=32, max_len=8))
    m = SeqRecModel(cfg, cb.n_items, cb).double()
    table = m.backbone.item_emb
    with torch.no_grad():
        for name, p in m.head.named_parameters():
            if not name.startswith("node_bias"):
                p.zero_()
        (table.rows if node_table else table.weight).zero_()  # the tied item vectors
    h = torch.randn(5, 16, dtype=torch.float64)
    np.testing.assert_allclose(m.head.log_prob_all(h).detach().numpy(), -np.log(cb.n_items), atol=1e-12)
    items = torch.arange(5) * 50
    np.testing.assert_allclose(m.head.nll(h, items).detach().numpy(), np.log(cb.n_items), atol=1e-12)
    m.head.nll(h, items).sum().backward()
    biases = [table.node_bias] if node_table else m.head.node_bias
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in biases)


def test_item_vectors_refuse_unconstrained():
    with pytest.raises(ValueError, match="constrained"):
        _model("ar", _codebook(), 200, constrained=False, item_vectors=True)


@pytest.mark.parametrize("item_vectors,node_table", [(False, False), (True, False), (True, True)])
def test_ar_trains_under_bf16_autocast(item_vectors, node_table):
    """Mixed precision (train.amp on CUDA; CPU autocast here) must not mix dtypes in the head."""
    cb = _codebook()
    m = _model("ar", cb, cb.n_items, item_vectors=item_vectors, node_table=node_table, dtype=torch.float32, scale=0.1)
    items, targets = torch.randint(0, cb.n_items, (4, 6)), torch.randint(0, cb.n_items, (4, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.nll(items, targets).float().sum()
    loss.backward()
    table = m.backbone.item_emb
    assert torch.isfinite(loss) and (table.rows if node_table else table.weight).grad is not None


@pytest.mark.parametrize("chunk", [None, 64])
def test_streamed_softmax_ce_matches_cross_entropy(chunk):
    """FV's loss: value and gradients equal F.cross_entropy (float64), also streamed in chunks; under
    bf16 autocast (train.amp) it runs (a custom Function sees mixed dtypes there) and stays close."""
    from sidrec.model.softmax_ce import softmax_ce

    g = torch.Generator().manual_seed(0)
    h, w, b = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in [(9, 8), (300, 8), (300,)])
    y = torch.randint(0, 300, (9,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ w.T + b, y, reduction="none")
    out = softmax_ce(h, w, b, y, chunk)
    np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), atol=1e-12)
    for got, want in zip(torch.autograd.grad(out.sum(), (h, w, b)), torch.autograd.grad(ref.sum(), (h, w, b))):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-12)
    h32, w32, b32 = (t.detach().float().requires_grad_() for t in (h, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = softmax_ce(h32, w32, b32, y, chunk)
    amp.sum().backward()
    assert amp.dtype == torch.float32 and w32.grad.dtype == torch.float32
    np.testing.assert_allclose(amp.detach().numpy(), ref.detach().numpy(), rtol=0.05, atol=0.05)


def test_recipe_head_beam_is_exact_and_trains_every_parameter():
    """The shipped head: beam search emits only valid IDs with their exact log Q, and every
    parameter (context MLPs, FiLM, token and item vectors, node biases) gets gradient."""
    from sidrec.decode import beam_search
    cb = _codebook()
    m = _model("ar", cb, cb.n_items)
    h = torch.randn(7, 16, dtype=torch.float64)
    lp = m.head.log_prob_all(h).detach()
    r = beam_search(m.head, h, beam=5, k=5)
    assert r.n_invalid == 0 and ((r.items >= 0) & (r.items < cb.n_items)).all()
    np.testing.assert_allclose(r.log_probs.detach().numpy(), lp.gather(1, r.items).numpy(), atol=1e-9)
    m.nll(torch.randint(0, cb.n_items, (4, 6)), torch.randint(0, cb.n_items, (4, 6))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in m.named_parameters())


def test_heads_follow_the_protocol():
    from sidrec.model import Head
    cb = _codebook()
    for head, beam in (("ar", True), ("fv", False), ("parallel", False)):
        m = _model(head, cb, cb.n_items)
        assert isinstance(m.head, Head) and m.supports_beam is beam
        h = torch.randn(3, 16, dtype=torch.float64)
        cache = m.head.eval_cache(h.device)
        a, b = m.head.rank_scores(h, cache), m.head.log_prob_all(h, cache)
        np.testing.assert_array_equal(torch.argsort(a, 1).numpy(), torch.argsort(b, 1).numpy())


@pytest.mark.parametrize("legacy,want", [({"item_vectors": "all", "node_bias": True}, True),
                                         ({"item_vectors": "none", "node_bias": False}, False),
                                         ({"item_vectors": "all", "head_film": True, "root_score": "mean"}, True)])
def test_legacy_model_configs_load(legacy, want):
    from sidrec.model import upgrade_model_dict
    assert ModelConfig.from_dict({"head": "ar", **legacy}).item_vectors is want
    for ablation in ({"head_film": False}, {"root_score": "lse"}, {"item_vectors": "leaf"},
                     {"item_vectors": "all", "node_bias": False}, {"head_dropout": 0.2}):
        with pytest.raises(ValueError, match="ablation|separate"):
            upgrade_model_dict(ablation)


@pytest.mark.parametrize("kind,shared", [("uniform", True), ("popularity", True), ("in-batch", True),
                                         ("uniform", False), ("popularity", False)])
def test_sampled_softmax_estimates_the_full_loss(kind, shared):
    """logQ-corrected sampled softmax, negatives shared by the batch or drawn per target: its value
    approaches the exact cross-entropy as K grows, its gradient reaches the sampled items only, and
    accidental hits never count as negatives."""
    from sidrec.model.sampled import NegativeSampler, sampled_softmax_nll

    torch.manual_seed(0)
    n, d = 300, 8
    w = torch.randn(n, d, requires_grad=True)
    b = torch.randn(n)
    h = torch.randn(3000, d)
    y = torch.multinomial(torch.arange(1, n + 1, dtype=torch.float) ** -1.0, 3000, replacement=True)
    full = torch.nn.functional.cross_entropy(h @ w.T + b, y).item()
    s = NegativeSampler(n, kind, 20_000 if shared else 2_000, shared)
    s.set_counts(torch.bincount(y, minlength=n))
    est = sampled_softmax_nll(h, w, b, y, s).mean()
    assert est.item() == pytest.approx(full, rel=0.02)
    est.backward()
    small = NegativeSampler(n, "uniform", 4, shared)
    w.grad = None
    sampled_softmax_nll(h[:2], w, b, y[:2], small).sum().backward()
    assert int((w.grad.abs().sum(1) > 0).sum()) <= (6 if shared else 10)  # 2 targets + 4 negatives (each)
    if not shared:  # every target its own negatives: [n, K], K per row, a hit never counted
        neg, k = small.sample(y[:5])
        assert neg.shape == (5, 4) and k == 4
        few = NegativeSampler(7, "uniform", 5, shared=False)  # the loss, term by term, from the drawn negatives
        yy, hh, ww, bb = torch.tensor([0, 3, 3, 6]), torch.randn(4, d), torch.randn(7, d), torch.randn(7)
        torch.manual_seed(1)
        drawn, _ = few.sample(yy)
        torch.manual_seed(1)
        got = sampled_softmax_nll(hh, ww, bb, yy, few)
        logits = hh @ ww.T + bb
        for r in range(4):
            terms = [logits[r, yy[r]]] + [logits[r, j] - math.log(5 / 7) for j in drawn[r] if j != yy[r]]
            assert got[r].item() == pytest.approx((torch.stack(terms).logsumexp(0) - logits[r, yy[r]]).item(), abs=1e-5)
        plain = NegativeSampler(7, "uniform", 5, shared=False, logq=False)  # no correction: raw logits
        torch.manual_seed(1)
        raw = sampled_softmax_nll(hh, ww, bb, yy, plain)
        for r in range(4):
            terms = [logits[r, yy[r]]] + [logits[r, j] for j in drawn[r] if j != yy[r]]
            assert raw[r].item() == pytest.approx((torch.stack(terms).logsumexp(0) - logits[r, yy[r]]).item(), abs=1e-5)
    same = torch.tensor([3, 3])  # in-batch: each row's only negatives are its own target, removed as hits
    assert sampled_softmax_nll(h[:2], w, b, same, NegativeSampler(n, "in-batch")).abs().max().item() == 0.0


def test_fv_with_sampled_softmax_trains_and_scores_exactly(tmp_path):
    import sidrec

    data = sidrec.synthetic(tmp_path / "d", n_items=150, n_users=600)
    rec = sidrec.Recommender(head="fv", train={"epochs": 2, "batch_size": 64},
                             model={"fv_loss": "sampled", "fv_sampler": "popularity", "fv_negatives": 32,
                                    "fv_shared_negatives": False, "backbone": {"d_model": 16, "d_ff": 32, "n_heads": 1}}).fit(data, out=tmp_path / "r")
    assert rec.model.head.sampler is not None and rec.model.head.sampler.kind == "popularity"
    assert not rec.model.head.sampler.shared  # K negatives for every target, as configured
    with torch.no_grad():  # scoring is the full softmax: a distribution over all items
        h = torch.randn(4, 16)
        assert torch.allclose(rec.model.head.log_prob_all(h).exp().sum(1), torch.ones(4), atol=1e-5)
    assert 0 < rec.evaluate(splits="test", save=False)["test"]["exact"]["ndcg@10"] <= 1


def test_node_means_bottom_up_equal_direct_means():
    """The AR head's node vectors average the items below each node; computing them level by level
    from the children's sums (one pass over the items) gives the direct means up to rounding."""
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 6, size=(150, 3)), axis=0)
    cb = Codebook(codes, [6, 6, 6])
    head = AutoregressiveHead(8, cb).double()
    w = head.item_emb.weight.detach()
    for j, got in enumerate(head.node_means("cpu")):
        node = torch.as_tensor(cb.trie.item_node[j + 1])
        want = torch.stack([w[node == n].mean(0) for n in range(cb.trie.n_nodes(j + 1))])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_joint_head_beam_rescore_equals_exact_mixture_with_a_full_beam():
    """AR retrieval + FV rescoring: with a beam that covers every item, rescoring the candidates
    ranks exactly as the exact mixture (1 - w) log Q_ar + w log Q_fv over all items does."""
    from sidrec.decode import beam_search

    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 5, size=(60, 3)), axis=0)
    cb = Codebook(codes, [5, 5, 5])
    cfg = ModelConfig(head="joint", joint_mix=0.3, backbone=BackboneConfig(d_model=8, n_heads=2, max_len=4))
    torch.manual_seed(0)
    m = SeqRecModel(cfg, len(codes), cb).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    h = torch.randn(7, 8, dtype=torch.float64)
    exact = m.head.rank_scores(h).detach()
    mixture = 0.7 * m.head.ar.log_prob_all(h) + 0.3 * m.head.fv.log_prob_all(h)
    torch.testing.assert_close(exact - exact[:, :1], mixture - mixture[:, :1])  # equal up to a per-user constant
    assert torch.allclose(m.head.log_prob_all(h).exp().sum(1), torch.ones(7, dtype=torch.float64))
    r = beam_search(m.head, h, beam=125, k=10)
    want_scores, want = torch.topk(exact, 10, dim=1)
    assert torch.equal(r.items, want)
    torch.testing.assert_close(r.log_probs, want_scores)  # beam + rescore returns the exact mixture score
    y = torch.randint(0, len(codes), (7,))
    torch.testing.assert_close(m.head.nll(h, y), m.head.ar.nll(h, y) + m.head.fv.nll(h, y))


def test_joint_model_trains_and_serves_beam_plus_rescore(tmp_path, capsys):
    import sidrec
    from sidrec.cli import main

    data = sidrec.synthetic(tmp_path / "d", n_items=150, n_users=600)
    rec = sidrec.Recommender(head="joint", train={"epochs": 2, "batch_size": 64},
                             tokenizer={"codebook_size": 8, "embeddings": "latent"},
                             model={"backbone": {"d_model": 16, "d_ff": 32, "n_heads": 1}}).fit(data, out=tmp_path / "r")
    ev = rec.evaluate(splits="test", save=False, extra_beams=(512,))["test"]
    assert set(ev) >= {"exact", "beam", "beam512"} and 0 < ev["exact"]["ndcg@10"] <= 1
    for key in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"):  # a beam over every item = the exact mixture
        assert ev["beam512"][key] == pytest.approx(ev["exact"][key], abs=1e-9)
    # the ranking weight was chosen on validation at the end of fit, and the loaded model ranks with it
    tuned = json.loads((tmp_path / "r" / "joint-mix.json").read_text())
    curve = {row["mix"]: row["ndcg@10"] for row in tuned["curve"]}
    assert tuned["mix"] == max(curve, key=lambda m: (curve[m], -m)) and rec.model.head.mix == tuned["mix"]
    valid = rec.evaluate(splits="valid", decode="exact", exclude_seen=tuned["exclude_seen"], save=False)
    assert valid["mix"] == tuned["mix"] and valid["valid"]["exact"]["ndcg@10"] == pytest.approx(curve[tuned["mix"]])
    ids, _ = rec.recommend([["3", "17"]], k=5, decode="beam")
    assert len(set(ids[0])) == 5 and "3" not in ids[0]
    with pytest.raises(sidrec.errors.UserError, match="no content path"):
        rec.add_items(pd.DataFrame({"item_id": ["new"], "title": ["x"]}), embeddings=np.zeros((1, 16), np.float32))
    assert main(["tune-mix", str(tmp_path / "r"), "--grid", "0", "1"]) == 0  # re-tuned from the CLI
    assert json.loads((tmp_path / "r" / "joint-mix.json").read_text())["mix"] in (0, 1)
    assert "<- chosen" in capsys.readouterr().out
    again = sidrec.Recommender.load(tmp_path / "r")
    assert again.model.head.mix in (0, 1) and again.tune_mix((0.5,))["mix"] == 0.5 and again.model.head.mix == 0.5
    with pytest.raises(SystemExit) as e:  # outside [0, 1]: a usage error
        main(["tune-mix", str(tmp_path / "r"), "--grid", "2"])
    assert e.value.code == 2
    mix_file, weights = tmp_path / "r" / "joint-mix.json", tmp_path / "r" / "model.safetensors"
    good = mix_file.read_text()
    weights.touch()  # weights rewritten since the mix was chosen: the config's mix, with a warning
    with pytest.warns(UserWarning, match="tune-mix"):
        assert sidrec.Recommender.load(tmp_path / "r").model.head.mix == 0.5
    mix_file.write_text(good.replace('"mix": 0.5', '"mix": 7'))  # a damaged file: one line, exit 2
    assert main(["evaluate", str(tmp_path / "r"), "--decode", "exact"]) == 2
    assert "joint mix" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(1, 9), st.integers(0, 10**6))
def test_grouped_dots_is_the_per_row_gather(group, width, seed):
    """The segmented GEMM behind training's per-prefix scoring equals the plain per-row gather, for
    any group sizes (empty groups, one big group, one row per group) and its gradients too."""
    from sidrec.model.heads import grouped_dots

    gen = torch.Generator().manual_seed(seed)
    group = torch.tensor(group)
    g = int(group.max()) + 1 + seed % 2  # sometimes a group no row belongs to
    q = torch.randn(len(group), 5, generator=gen, dtype=torch.float64, requires_grad=True)
    vec = torch.randn(g, width, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    out = grouped_dots(q, group, vec)
    want = torch.einsum("bd,bfd->bf", q, vec[group])
    torch.testing.assert_close(out, want)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ga = torch.autograd.grad((out * w).sum(), (q, vec))
    gb = torch.autograd.grad((want * w).sum(), (q, vec))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_training_loss_on_a_skewed_trie_is_minus_log_q():
    """Prefixes with very different fan-outs (bucketed by width in training) give the same loss as
    exact scoring, for the free and the node-table item vectors."""
    rng = np.random.default_rng(3)
    first = rng.choice(4, size=300, p=[0.85, 0.1, 0.04, 0.01])  # one prefix with most items
    codes = np.stack([first, rng.integers(0, 16, 300), rng.integers(0, 16, 300)], 1)
    codes = np.unique(codes, axis=0)
    cb = Codebook(codes, [4, 16, 16])
    for node_table in (False, True):
        m = _model("ar", cb, cb.n_items, node_table=node_table)
        h = torch.randn(64, 16, dtype=torch.float64)
        items = torch.as_tensor(rng.integers(0, cb.n_items, 64))
        full = m.head.log_prob_all(h).detach()
        np.testing.assert_allclose(m.head.nll(h, items).detach().numpy(),
                                   -full.gather(1, items[:, None]).squeeze(1).numpy(), atol=1e-9)
        assert m.head.nll(h[:0], items[:0]).shape == (0,)  # a batch whose targets were all padding


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=20), layers=st.integers(1, 3),
       item_input=st.sampled_from(["id", "both"]), seed=st.integers(0, 10**6))
def test_last_states_equal_the_full_forward_at_the_last_position(lengths, layers, item_input, seed):
    """`encode` runs histories in length groups and the last block for the last position only: the
    same function as the whole forward pass read at each history's last real item."""
    from sidrec.model.backbone import Backbone

    g = torch.Generator().manual_seed(seed)
    n, t = 30, 12
    codes = torch.randint(0, 4, (n, 2), generator=g)
    bb = Backbone(BackboneConfig(d_model=16, n_layers=layers, n_heads=2, d_ff=32, max_len=t, item_input=item_input),
                  n, codes, [4, 4]).double().eval()
    lens = torch.tensor(lengths)
    items = torch.full((len(lengths), int(lens.max())), n)
    for r, length in enumerate(lengths):
        items[r, :length] = torch.randint(0, n, (length,), generator=g)
    with torch.no_grad():
        full = bb(items)[torch.arange(len(lengths)), lens - 1]
        torch.testing.assert_close(bb.last_states(items, lens), full, rtol=0, atol=1e-12)
