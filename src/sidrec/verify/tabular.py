"""Tabular (fully expressive) models: the optimum of each objective, reached by L-BFGS.

With one free parameter per (context, item) for FV-MLE and one per (context, trie node) for
AR-NTP, both optima are the empirical conditional distribution (claim 2); the parallel head's
optimum is the product of per-position marginals, which cannot represent dependence between
positions (claim 5); a collided codebook's AR optimum is a distribution over IDs (claim 4).
All in float64.
"""

from __future__ import annotations

import torch

from sidrec.model.heads import segment_logsumexp
from sidrec.tokenize.codebook import Codebook

Tensor = torch.Tensor


def ar_log_q(node_logits: list[Tensor], cb: Codebook) -> Tensor:
    """log Q over the codebook's leaves [C, P_k] from per-level node logits [C, P_{j+1}]."""
    logq = node_logits[0].new_zeros(node_logits[0].shape[0], 1)
    for j, s in enumerate(node_logits):
        parent = cb.trie.torch("node_parent", j + 1)
        lse = segment_logsumexp(s, parent, cb.trie.n_nodes(j))
        logq = logq[:, parent] + s - lse[:, parent]
    return logq


def _lbfgs(params: list[Tensor], loss_fn, iters: int = 200) -> float:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, history_size=50, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    prev = float("inf")
    for _ in range(4):  # restarts refresh the curvature memory; stop when the loss settles
        loss = float(opt.step(closure).detach())
        if prev - loss < 1e-10:
            break
        prev = loss
    with torch.no_grad():
        return float(loss_fn())


def nll(counts: Tensor, logq: Tensor) -> Tensor:
    """Mean negative log-likelihood of the observed (context, item) counts."""
    w = counts / counts.sum()
    return -(w * torch.where(counts > 0, logq, torch.zeros_like(logq))).sum()


def fit_fv(counts: Tensor, iters: int = 200) -> Tensor:
    """Tabular FV-MLE: logits [C, N]; returns log Q [C, N]."""
    theta = torch.zeros_like(counts, requires_grad=True)
    _lbfgs([theta], lambda: nll(counts, torch.log_softmax(theta, 1)), iters)
    return torch.log_softmax(theta.detach(), 1)


def fit_ar(counts_items: Tensor, cb: Codebook, iters: int = 200) -> Tensor:
    """Tabular constrained AR-NTP on the IDs of the items; returns log Q over IDs (leaves) [C, P_k]."""
    leaf = torch.as_tensor(cb.trie.item_node[-1])
    n_leaves = cb.trie.n_nodes(cb.levels)
    counts = torch.zeros(counts_items.shape[0], n_leaves, dtype=counts_items.dtype).index_add_(1, leaf, counts_items)
    params = [torch.zeros(counts.shape[0], cb.trie.n_nodes(j + 1), dtype=counts.dtype, requires_grad=True)
              for j in range(cb.levels)]
    _lbfgs(params, lambda: nll(counts, ar_log_q(params, cb)), iters)
    with torch.no_grad():
        return ar_log_q([p.detach() for p in params], cb)


def fit_parallel(counts_items: Tensor, cb: Codebook, iters: int = 200) -> Tensor:
    """Tabular non-AR head: independent per-position softmaxes, trained on token losses (RPG-style);
    returns log Q over *items*, renormalised over valid IDs [C, N]."""
    codes = torch.as_tensor(cb.codes)
    params = [torch.zeros(counts_items.shape[0], v, dtype=counts_items.dtype, requires_grad=True) for v in cb.sizes]

    def loss():
        per_item = sum(torch.log_softmax(p, 1)[:, codes[:, j]] for j, p in enumerate(params))
        return nll(counts_items, per_item)

    _lbfgs(params, loss, iters)
    with torch.no_grad():
        per_item = sum(torch.log_softmax(p.detach(), 1)[:, codes[:, j]] for j, p in enumerate(params))
        return torch.log_softmax(per_item, 1)


def items_from_ids(logq_ids: Tensor, cb: Codebook) -> Tensor:
    """For a bijective codebook: log Q over items [C, N] from log Q over leaves."""
    return logq_ids[:, torch.as_tensor(cb.trie.item_node[-1])]


def kl(p_log: Tensor, q_log: Tensor, weights: Tensor) -> float:
    """sum_x w(x) KL(P(.|x) || Q(.|x)) with 0 log 0 = 0."""
    p = p_log.exp()
    term = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return float((weights * term.sum(1)).sum())


def conditional_entropy(counts: Tensor) -> float:
    """Empirical H(Y | X) from a count table [X, Y] (nats)."""
    n = counts.sum()
    row = counts.sum(1, keepdim=True)
    m = counts > 0
    return float(-(counts[m] / n * torch.log((counts / row.clamp(min=1e-300))[m])).sum())


def group_counts(counts_items: Tensor, cb: Codebook) -> Tensor:
    """Counts per (context, ID) from counts per (context, item)."""
    leaf = torch.as_tensor(cb.trie.item_node[-1])
    return torch.zeros(counts_items.shape[0], cb.trie.n_nodes(cb.levels),
                       dtype=counts_items.dtype).index_add_(1, leaf, counts_items)
