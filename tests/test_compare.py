"""Level-by-level comparison of two runs: the NLL split is exact, hybrids are distributions."""


import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidrec.evaluate.compare import hybrid, level_nll, node_log_marginals
from sidrec.tokenize import Codebook


def _random_trie(n, sizes, seed):
    rng = np.random.default_rng(seed)
    space = np.prod(sizes)
    flat = rng.choice(space, n, replace=False)
    codes = np.stack(np.unravel_index(flat, sizes), 1)
    return Codebook(codes=codes.astype(np.int64), sizes=list(sizes)).trie, codes


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 60), k=st.integers(1, 3), v=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_level_nll_sums_to_minus_log_q_and_matches_brute_force(n, k, v, seed):
    sizes = [v] * k
    if v ** k < n:
        n = v ** k
    trie, codes = _random_trie(n, sizes, seed)
    g = torch.Generator().manual_seed(seed)
    logq = torch.log_softmax(torch.randn(4, n, generator=g, dtype=torch.float64) * 3, -1)
    tgt = torch.randint(0, n, (4,), generator=g)
    lv = level_nll(logq, trie, tgt)
    torch.testing.assert_close(lv.sum(1), -logq.gather(1, tgt[:, None]).squeeze(1))
    q = logq.exp()
    for b in range(4):  # brute force: mass of the items sharing the target's first j tokens
        t = codes[int(tgt[b])]
        mass = [1.0] + [q[b, (codes[:, :j] == t[:j]).all(1)].sum().item() for j in range(1, k + 1)]
        want = [-np.log(mass[j + 1] / mass[j]) for j in range(k)]
        np.testing.assert_allclose(lv[b].numpy(), want, rtol=1e-9, atol=1e-9)
    for m in node_log_marginals(logq, trie):
        torch.testing.assert_close(m.exp().sum(1), torch.ones(4, dtype=torch.float64))
    for j in range(1, k + 1):  # a hybrid is a distribution with A's marginals down to depth j
        other = torch.log_softmax(torch.randn(4, n, generator=g, dtype=torch.float64), -1)
        hy = hybrid(logq, other, trie, j)
        torch.testing.assert_close(hy.exp().sum(1), torch.ones(4, dtype=torch.float64))
        torch.testing.assert_close(node_log_marginals(hy, trie)[j - 1], node_log_marginals(logq, trie)[j - 1])
    torch.testing.assert_close(hybrid(logq, logq, trie, 1), logq)
