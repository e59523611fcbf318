"""Heads: normalisation, loss identities, leaks, gradients — the maths the theorem rests on."""

import numpy as np
import pytest
import torch

from sidrec.model import AutoregressiveHead, BackboneConfig, ModelConfig, SeqRecModel
from sidrec.tokenize import Codebook, fit_codebook


def _codebook(n=200, seed=0, levels=3, size=8):
    x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return fit_codebook(x, "rq-kmeans", levels, size, seed=seed)


def _model(head, cb, n, constrained=True, scale=0.3, item_input="id", dtype=torch.float64, **kw):
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
    lp = m.head.log_prob_all(torch.randn(5, 16, dtype=torch.float64), renormalize=False).detach()
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


@pytest.mark.parametrize("tied,node_bias", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("item_vectors", ["leaf", "all"])
def test_item_vectors_keep_the_identities(tied, item_vectors, node_bias):
    """item_vectors: nodes score with token + (mean) item vectors; Q still sums to 1, the loss is
    -log Q(target), the item table learns, and (tied) it is the backbone's input table."""
    cb = _codebook(300, levels=2, size=32)  # 32 first tokens for 300 items: ~9 siblings each
    m = _model("ar", cb, cb.n_items, item_vectors=item_vectors, tied=tied, node_bias=node_bias)
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
    if item_vectors == "all":  # upper levels see the items' mean: non-target items get gradient too
        assert (table.grad[: cb.n_items].abs().sum(1) > 0).sum() > 2 * len(items)
    plain = _model("ar", cb, cb.n_items)  # same seed, no item vectors: a different distribution
    assert not torch.allclose(plain.head.log_prob_all(h), lp)
    fresh = _model("ar", cb, cb.n_items, item_vectors=item_vectors, tied=tied, node_bias=node_bias)
    fresh.load_state_dict(m.state_dict())
    np.testing.assert_allclose(fresh.head.log_prob_all(h).detach().numpy(), lp.detach().numpy(), atol=1e-12)


def test_node_bias_starts_uniform_over_items_and_learns():
    """node_bias: one bias per trie node, started at log(#items below). With every other output
    parameter at zero, Q is then 1/N for every item (uniform over items, as FV-MLE starts), not
    uniform over children; the biases get gradient, and the identities hold with them."""
    cb = _codebook(300, levels=3, size=8)
    cfg = ModelConfig(head="ar", node_bias=True,
                      backbone=BackboneConfig(d_model=16, n_heads=2, d_ff=32, max_len=8))
    m = SeqRecModel(cfg, cb.n_items, cb).double()
    with torch.no_grad():
        for name, p in m.head.named_parameters():
            if not name.startswith("node_bias"):
                p.zero_()
    h = torch.randn(5, 16, dtype=torch.float64)
    np.testing.assert_allclose(m.head.log_prob_all(h).detach().numpy(), -np.log(cb.n_items), atol=1e-12)
    items = torch.arange(5) * 50
    np.testing.assert_allclose(m.head.nll(h, items).detach().numpy(), np.log(cb.n_items), atol=1e-12)
    m.head.nll(h, items).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.head.node_bias)
    with pytest.raises(ValueError, match="constrained"):
        SeqRecModel(ModelConfig(head="ar", node_bias=True, constrained=False, backbone=cfg.backbone), cb.n_items, cb)


def test_item_vectors_refuse_unconstrained():
    with pytest.raises(ValueError, match="constrained"):
        _model("ar", _codebook(), 200, constrained=False, item_vectors="leaf")


@pytest.mark.parametrize("item_vectors", ["none", "leaf", "all"])
def test_ar_trains_under_bf16_autocast(item_vectors):
    """Mixed precision (train.amp on CUDA; CPU autocast here) must not mix dtypes in the head."""
    cb = _codebook()
    m = _model("ar", cb, cb.n_items, item_vectors=item_vectors, dtype=torch.float32, scale=0.1)
    items, targets = torch.randint(0, cb.n_items, (4, 6)), torch.randint(0, cb.n_items, (4, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.nll(items, targets).float().sum()
    loss.backward()
    assert torch.isfinite(loss) and m.backbone.item_emb.weight.grad is not None


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


@pytest.mark.parametrize("head", ["ar", "parallel"])
def test_head_dropout_trains_noisy_and_evaluates_exactly(head):
    """head_dropout regularises the head's MLPs in training only: in eval mode the model is the
    p = 0 model with the same weights (same parameter names, so old checkpoints load), and Q stays
    a distribution over items."""
    cb = _codebook()
    plain = _model(head, cb, cb.n_items, item_vectors="all" if head == "ar" else "none")
    drop = _model(head, cb, cb.n_items, item_vectors="all" if head == "ar" else "none", head_dropout=0.5)
    assert plain.state_dict().keys() == drop.state_dict().keys()
    drop.load_state_dict(plain.state_dict())
    h = torch.randn(6, 16, dtype=torch.float64)
    plain.eval(), drop.eval()
    np.testing.assert_allclose(drop.head.log_prob_all(h).detach().numpy(),
                               plain.head.log_prob_all(h).detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(drop.head.log_prob_all(h).exp().sum(1).detach().numpy(), 1.0, atol=1e-10)
    drop.train()
    items = torch.randint(0, cb.n_items, (6,))
    assert not torch.allclose(drop.head.nll(h, items), plain.head.nll(h, items))


def test_head_dropout_is_validated():
    from sidrec.config import load_config
    from sidrec.errors import UserError
    with pytest.raises(UserError, match="head_dropout"):
        load_config(None, ["model.head_dropout=1.5"])


@pytest.mark.parametrize("film,context", [(False, True), (True, False), (False, False)])
def test_ar_head_ablations_keep_the_identities(film, context):
    """Without FiLM and/or the per-level context MLPs the AR head is still a distribution over
    items whose loss is -log Q(i*), exactly; the beam still emits only valid IDs, and every
    remaining parameter is trained (none is left dangling)."""
    from sidrec.decode import beam_search
    cb = _codebook()
    m = _model("ar", cb, cb.n_items, item_vectors="all", node_bias=True, head_film=film, head_context=context)
    assert (m.head.film is None) != film and all(isinstance(c, torch.nn.Identity) != context for c in m.head.ctx)
    h = torch.randn(7, 16, dtype=torch.float64)
    lp = m.head.log_prob_all(h).detach()
    np.testing.assert_allclose(lp.exp().sum(1).numpy(), 1.0, atol=1e-10)
    items = torch.randint(0, cb.n_items, (7,))
    np.testing.assert_allclose(m.head.nll(h, items).detach().numpy(), -lp[torch.arange(7), items].numpy(), atol=1e-9)
    r = beam_search(m.head, h, beam=5, k=5)
    assert r.n_invalid == 0 and ((r.items >= 0) & (r.items < cb.n_items)).all()
    np.testing.assert_allclose(r.log_probs.detach().numpy(), lp.gather(1, r.items).numpy(), atol=1e-9)
    m.nll(torch.randint(0, cb.n_items, (4, 6)), torch.randint(0, cb.n_items, (4, 6))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in m.named_parameters())


def test_unconstrained_ar_without_film_shares_one_normaliser():
    """Without FiLM every prefix of a level has the same unconstrained normaliser; the loss is
    still -log of the (leaking) item mass, and the mass is below one."""
    cb = _codebook()
    m = _model("ar", cb, cb.n_items, constrained=False, head_film=False)
    h = torch.randn(5, 16, dtype=torch.float64)
    lp = m.head.log_prob_all(h).detach()
    assert (lp.exp().sum(1) < 1).all()
    items = torch.randint(0, cb.n_items, (5,))
    np.testing.assert_allclose(m.head.nll(h, items).detach().numpy(), -lp[torch.arange(5), items].numpy(), atol=1e-9)


@pytest.mark.parametrize("tied", [True, False])
def test_root_lse_scores_first_level_nodes_by_their_items(tied):
    """root_score lse: a first-level node's item part is log sum_i exp(<q, e_i>) over its items (the
    exact marginal of a softmax over them); Q stays a distribution with loss = -log Q, the beam
    exact, and under bf16 autocast training still runs."""
    from sidrec.decode import beam_search
    from sidrec.model.heads import segment_logsumexp
    cb = _codebook(300, levels=2, size=32)
    m = _model("ar", cb, cb.n_items, item_vectors="all", node_bias=True, tied=tied, root_score="lse")
    head = m.head
    fresh = AutoregressiveHead(16, cb, item_vectors="all", node_bias=True, root_score="lse")
    assert torch.all(fresh.node_bias[0] == 0) and torch.all(fresh.node_bias[1] >= 0)  # lse counts the items
    with torch.no_grad():
        m.backbone.item_emb.weight.normal_(0, 0.3)
        if not tied:
            head.item_emb.weight.normal_(0, 0.3)
    h = torch.randn(6, 16, dtype=torch.float64)
    q = head.contexts(h)[0]
    node = torch.as_tensor(cb.trie.item_node[1])
    lse = segment_logsumexp(q @ head.item_emb.weight.T, node, cb.trie.n_nodes(1))
    tok = torch.as_tensor(cb.trie.node_tok[1])
    want = torch.log_softmax(q @ head.tok_out[0][tok].T + head.tok_bias[0][tok] + head.node_bias[0] + lse, -1)
    roots = torch.zeros(6, dtype=torch.long)
    got = head.level_log_probs(0, q, torch.zeros(6, 0, dtype=torch.long), roots)[:, tok]
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), atol=1e-10)
    lp = head.log_prob_all(h).detach()
    np.testing.assert_allclose(lp.exp().sum(1).numpy(), 1.0, atol=1e-10)
    items = torch.arange(6) * 41
    np.testing.assert_allclose(head.nll(h, items).detach().numpy(), -lp[torch.arange(6), items].numpy(), atol=1e-9)
    r = beam_search(head, h, beam=5, k=5)
    assert r.n_invalid == 0
    np.testing.assert_allclose(r.log_probs.detach().numpy(), lp.gather(1, r.items).numpy(), atol=1e-9)
    m32 = _model("ar", cb, cb.n_items, item_vectors="all", node_bias=True, tied=tied, root_score="lse",
                 dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m32.nll(torch.randint(0, cb.n_items, (4, 6)), torch.randint(0, cb.n_items, (4, 6))).sum()
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="item_vectors 'all'"):
        _model("ar", cb, cb.n_items, item_vectors="leaf", root_score="lse")


def test_lse_all_levels_equals_fv_mle_without_token_terms():
    """root_score lse-all with the token terms and node biases at zero and no context/FiLM: every
    conditional is a ratio of FV-MLE's own marginals, so Q is exactly FV-MLE's softmax over items."""
    cb = _codebook(200, levels=3, size=8)
    m = _model("ar", cb, cb.n_items, item_vectors="all", root_score="lse-all", head_film=False, head_context=False)
    with torch.no_grad():
        for w in (*m.head.tok_out, *m.head.tok_bias):
            w.zero_()
        m.backbone.item_emb.weight.normal_(0, 0.5)
    h = torch.randn(5, 16, dtype=torch.float64)
    fv = torch.log_softmax(h @ m.backbone.item_emb.weight[: cb.n_items].T, -1)
    np.testing.assert_allclose(m.head.log_prob_all(h).detach().numpy(), fv.detach().numpy(), atol=1e-10)
    items = torch.arange(5) * 13
    np.testing.assert_allclose(m.head.nll(h, items).detach().numpy(), -fv[torch.arange(5), items].detach().numpy(),
                               atol=1e-10)
