"""The centred node table and the row-sparse optimizers: the exactness identities on the product path.

- the table is a bijection with free item vectors, and its prefix sums are the node means;
- re-centring leaves every item vector unchanged and restores the constraint;
- the node-table head gives the free head's log Q for the same item vectors and biases;
- after many sparse training steps Q still sums to 1 (float64) and the node means are prefix sums;
- a step's gradient holds only the rows it read; catch-up Adam equals dense Adam; clipping is global.
"""

import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sidrec.data.synth import make_synthetic
from sidrec.model import BackboneConfig, ModelConfig, SeqRecModel
from sidrec.model.node_table import NodeTable
from sidrec.tokenize import fit_codebook
from sidrec.train import TrainConfig, Trainer
from sidrec.train.sparse import RowAdagrad, RowAdam, clip_grad_norm


def _codebook(n=300, levels=3, size=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    return fit_codebook(x, "rq-kmeans", levels, size, seed=seed)


def _means_below(cb, e, depth):
    nodes = torch.as_tensor(cb.trie.item_node[depth])
    sums = torch.zeros(cb.trie.n_nodes(depth), e.shape[1], dtype=e.dtype).index_add_(0, nodes, e)
    return sums / torch.as_tensor(np.bincount(cb.trie.item_node[depth]), dtype=e.dtype)[:, None]


def _centring_error(table: NodeTable) -> float:
    """max over nodes of |sum_children |c| u_c| (0 when centred)."""
    u, trie = table.rows.detach(), table.trie
    worst = 0.0
    for depth in range(1, trie.depth + 1):
        w = table.below[table.depth_slice(depth)].to(u.dtype)[:, None]
        parent = trie.torch("node_parent", depth)
        sums = u.new_zeros(trie.n_nodes(depth - 1), u.shape[1]).index_add_(0, parent, u[table.depth_slice(depth)] * w)
        worst = max(worst, float(sums.abs().max()))
    return worst


@settings(max_examples=15, deadline=None)
@given(levels=st.integers(1, 3), size=st.sampled_from([4, 8, 16]), seed=st.integers(0, 100))
def test_the_table_is_a_bijection_and_its_prefix_sums_are_node_means(levels, size, seed):
    n = min(150, size**levels // 2)
    cb = _codebook(n, levels, size, seed)
    table = NodeTable(cb, 6).double()
    e = torch.randn(cb.n_items, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        table.rows.copy_(table.from_items(e))
        torch.testing.assert_close(table.weight, e, rtol=0, atol=1e-12)
        assert _centring_error(table) < 1e-10
        for depth in range(1, levels + 1):
            torch.testing.assert_close(table.node_means(depth), _means_below(cb, e, depth), rtol=0, atol=1e-12)
        pad = torch.full((2,), cb.n_items)
        assert table(pad).abs().max() == 0  # the padding item is a zero vector


def test_recentring_keeps_every_item_vector_and_restores_the_constraint():
    cb = _codebook(300, 3, 8)
    table = NodeTable(cb, 5).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        table.rows.copy_(table.from_items(torch.randn(cb.n_items, 5, dtype=torch.float64, generator=g)))  # float64-exact
        changed = torch.randint(1, table.pad, (40,), generator=g)
        table.rows[changed] += torch.randn(40, 5, dtype=torch.float64, generator=g)
        before = table.weight.clone()
        assert _centring_error(table) > 1e-3
        table.recentre_(changed)
        torch.testing.assert_close(table.weight, before, rtol=0, atol=1e-12)
        assert _centring_error(table) < 1e-10
        for depth in (1, 2):
            torch.testing.assert_close(table.node_means(depth), _means_below(cb, before, depth), rtol=0, atol=1e-12)


def _model(node_table: bool, cb, dtype=torch.float64):
    cfg = ModelConfig(head="ar", node_table=node_table, backbone=BackboneConfig(d_model=16, n_heads=2, d_ff=32, max_len=8))
    torch.manual_seed(0)
    return SeqRecModel(cfg, cb.n_items, cb).to(dtype)


def test_the_node_table_head_is_the_free_head_with_the_same_vectors():
    """Same item vectors and node biases -> the same log Q for every item (the function class is kept),
    although the node-table head never computes a mean over items."""
    cb = _codebook(300, 3, 8)
    m, free = _model(True, cb), _model(False, cb)
    table = m.backbone.item_emb
    with torch.no_grad():
        table.rows.copy_(table.from_items(torch.randn(cb.n_items, 16, dtype=torch.float64) * 0.3))
        for p in m.head.parameters():
            p.normal_(0, 0.3)
        table.node_bias.normal_(0, 0.5)
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("backbone.item_emb")}
    state["backbone.item_emb.weight"] = torch.cat([table.weight.detach(), torch.zeros(1, 16, dtype=torch.float64)])
    for j in range(3):
        state[f"head.node_bias.{j}"] = table.node_bias.detach()[table.depth_slice(j + 1), 0]
    free.load_state_dict(state)
    h = torch.randn(6, 16, dtype=torch.float64)
    torch.testing.assert_close(m.head.log_prob_all(h), free.head.log_prob_all(h), rtol=0, atol=1e-10)
    items = torch.arange(6) * 41
    torch.testing.assert_close(m.head.nll(h, items), free.head.nll(h, items), rtol=0, atol=1e-10)


def test_a_sparse_step_reads_and_writes_only_the_rows_it_touches():
    cb = _codebook(300, 3, 8)
    m = _model(True, cb, torch.float32)
    m.set_sparse(True)
    table = m.backbone.item_emb
    items, targets = torch.randint(0, cb.n_items, (3, 5)), torch.randint(0, cb.n_items, (3, 5))
    m.nll(items, targets).sum().backward()
    g = table.rows.grad
    assert g.is_sparse
    rows = set(g.coalesce().indices()[0].tolist())
    paths = set(table.paths[items.flatten()].flatten().tolist())
    assert paths <= rows  # every input item's path rows
    # target prefixes' children: at most one sibling group per level and target, plus the input paths
    trie = cb.trie
    kids = set()
    for t in targets.flatten().tolist():
        for j in range(3):
            node = trie.item_node[j][t]
            kids |= {table.off[j + 1] + c for c in range(trie.child_ptr[j][node], trie.child_ptr[j][node + 1])}
    assert rows == paths | kids and len(rows) < table.pad


def test_sparse_training_keeps_the_identities_after_many_steps(tmp_path):
    """Train with sparse lookups, catch-up Adam and re-centring; then, in float64: sum_i Q(i|h) = 1, the
    loss identity, and node means equal to prefix sums (the constraint held through every step)."""
    data, world = make_synthetic(300, 1500, seed=2)
    cb = fit_codebook(world.latent, "rq-kmeans", 2, 32, seed=0)
    cfg = ModelConfig(head="ar", node_table=True, backbone=BackboneConfig(d_model=16, n_heads=2, d_ff=32, max_len=10))
    torch.manual_seed(0)
    m = SeqRecModel(cfg, cb.n_items, cb)
    tr = Trainer(m, data, TrainConfig(epochs=3, batch_size=32, lr=5e-3, warmup_steps=5, sparse=True), tmp_path)
    assert isinstance(tr.optim.sparse_opt, RowAdam)
    state = tr.fit()
    assert state["step"] > 100
    m = m.double()
    table = m.backbone.item_emb
    assert _centring_error(table) < 1e-5
    e = table.weight.detach()
    for depth in (1, 2):
        torch.testing.assert_close(table.node_means(depth), _means_below(cb, e, depth), rtol=0, atol=1e-5)
    h = torch.randn(8, 16, dtype=torch.float64)
    lq = m.head.log_prob_all(h).detach()
    np.testing.assert_allclose(lq.exp().sum(1).numpy(), 1.0, atol=1e-12)
    items = torch.arange(8) * 30
    np.testing.assert_allclose(m.head.nll(h, items).detach().numpy(), -lq[torch.arange(8), items].numpy(), atol=1e-10)


def _stream(n, d, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, n, (5,), generator=g)
        yield rows, torch.randn(5, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("dense_share", [0, 10**9])  # always row-sparse, always dense
def test_catch_up_adam_equals_dense_adam(monkeypatch, dense_share):
    """On a table whose gradients do not depend on its values, lazy updates with catch-up of the skipped
    steps (then a flush) give dense Adam's weights, under a changing learning rate (eps aside); so do the
    dense passes it switches to when a step touches most rows."""
    from sidrec.train import sparse

    monkeypatch.setattr(sparse, "DENSE_SHARE", dense_share)
    n, d = 40, 6
    start = torch.randn(n, d, dtype=torch.float64)
    dense, lazy = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    od, ol = torch.optim.Adam([dense], lr=1e-2, eps=1e-14), RowAdam([lazy], lr=1e-2, eps=1e-14)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t / 20)) for o in (od, ol)]
    for rows, vals in _stream(n, d, 150):
        dense.grad = torch.zeros(n, d, dtype=torch.float64).index_add_(0, rows, vals)
        lazy.grad = torch.sparse_coo_tensor(rows[None], vals, (n, d))
        od.step()
        changed = ol.step()
        assert changed[lazy] is None or set(changed[lazy].tolist()) == set(rows.tolist())
        for s in scheds:
            s.step()
    assert bool((ol.state[lazy]["last"] < 150).any()) == (dense_share == 0)  # rows left behind until the flush
    ol.flush()
    torch.testing.assert_close(lazy.detach(), dense.detach(), rtol=0, atol=1e-9)
    # a checkpoint round trip keeps the steps and the per-step record exact
    again = RowAdam([torch.nn.Parameter(lazy.detach().clone())], lr=1e-2)
    again.load_state_dict(ol.state_dict())
    st2 = next(iter(again.state.values()))
    assert st2["last"].dtype == torch.long and st2["lrc"].dtype == torch.float64


def test_row_adagrad_is_exact_lazily_and_clipping_is_global():
    n, d = 30, 4
    a = torch.nn.Parameter(torch.zeros(n, d, dtype=torch.float64))
    opt = RowAdagrad([a], lr=0.1)
    acc = torch.zeros(n, dtype=torch.float64)
    want = torch.zeros(n, d, dtype=torch.float64)
    for rows, vals in _stream(n, d, 20):
        a.grad = torch.sparse_coo_tensor(rows[None], vals, (n, d))
        dense = torch.zeros(n, d, dtype=torch.float64).index_add_(0, rows, vals)
        touched = dense.abs().sum(1) > 0
        acc = acc + torch.where(touched, dense.pow(2).mean(1), 0.0)
        want = want - torch.where(touched[:, None], 0.1 * dense / (acc.sqrt() + 1e-8)[:, None], 0.0)
        opt.step()
    torch.testing.assert_close(a.detach(), want, rtol=0, atol=1e-12)
    # clipping: the norm over a dense and a sparse gradient together
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(5, 2))
    p.grad = torch.tensor([3.0, 0.0, 0.0])
    q.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), torch.tensor([[2.0, 0.0], [2.0, 0.0]]), (5, 2))
    assert clip_grad_norm([p, q], 1.0) == pytest.approx(5.0)  # sqrt(3^2 + (2+2)^2): duplicate rows summed
    assert float(torch.sqrt(p.grad.pow(2).sum() + q.grad.to_dense().pow(2).sum())) == pytest.approx(1.0, rel=1e-5)


def test_sparse_path_costs_no_dense_pass_in_the_optimizer(monkeypatch):
    """Rows neither read nor re-centred keep their value and their optimizer state untouched."""
    from sidrec.train import sparse

    monkeypatch.setattr(sparse, "DENSE_SHARE", 0)  # a tiny table: force the row-sparse step
    cb = _codebook(300, 3, 8)
    m = _model(True, cb, torch.float32)
    with tempfile.TemporaryDirectory() as d:
        data, _ = make_synthetic(cb.n_items, 50, seed=0)
        tr = Trainer(m, data, TrainConfig(epochs=1, batch_size=4, max_steps=1, warmup_steps=1, sparse=True), d)
        before = m.backbone.item_emb.rows.detach().clone()
        b = tr.batches.make(tr.batches.order(0)[0])
        tr.step(tr.batches.order(0)[0])
        after = m.backbone.item_emb.rows.detach()
        moved = (after - before).abs().sum(1) > 0
        last = tr.optim.sparse_opt.state[m.backbone.item_emb.rows]["last"]
        assert 0 < int((last > 0).sum()) < m.backbone.item_emb.pad
        assert int(moved.sum()) < m.backbone.item_emb.pad and b.n_targets > 0


def test_new_items_extend_the_node_table_with_prefix_means_or_given_vectors():
    """`items add` on a node-table model: trained items keep their vectors, biases and log Q order; a new
    item's vector is the mean of the trained items under its deepest trained prefix, or exactly the
    content vector it was given; the identities hold on the extended catalogue."""
    from sidrec.model.extend import extend_model
    from sidrec.tokenize import Codebook

    codes = np.array([[a, b, c] for a in range(3) for b in range(3) for c in range(3)])[:-3]  # 24 items
    base = Codebook(codes, [4, 4, 4])
    m = _model(True, base, torch.float32)
    with torch.no_grad():
        for p in m.head.parameters():
            p.normal_(0, 0.3)
        t = m.backbone.item_emb
        t.rows.copy_(t.from_items(torch.randn(base.n_items, 16)))
    new_codes = np.array([[0, 0, 3], [2, 2, 0], [3, 0, 0]])  # a new leaf, a new depth-2 node, a new first token
    ext = base.extend(new_codes)
    vectors = np.full((3, 16), np.nan)
    vectors[2] = np.arange(16) / 10
    big = extend_model(m, base, ext, vectors)
    e_old, e_new = m.backbone.item_emb.weight.detach(), big.backbone.item_emb.weight.detach()
    torch.testing.assert_close(e_new[:24], e_old, rtol=0, atol=1e-5)
    torch.testing.assert_close(e_new[24], e_old[:3].mean(0), rtol=0, atol=1e-5)  # items 0 0 *
    torch.testing.assert_close(e_new[25], e_old[18:24].mean(0), rtol=0, atol=1e-5)  # items 2 * * (2 0 *, 2 1 *)
    torch.testing.assert_close(e_new[26], torch.arange(16, dtype=torch.float32) / 10, rtol=0, atol=1e-5)
    h = torch.randn(4, 16)
    lq_old, lq_new = m.head.log_prob_all(h).detach(), big.head.log_prob_all(h).detach()
    np.testing.assert_allclose(lq_new.exp().sum(1).numpy(), 1.0, atol=1e-5)
    assert (torch.argsort(lq_old, 1) == torch.argsort(lq_new[:, :24], 1)).float().mean() > 0.9  # order of the old ones
