"""Output heads, one interface: nll / log_prob / log_prob_all / level-wise scoring.

- `FullSoftmaxHead` (FV-MLE): logits over all N items, cross-entropy.
- `AutoregressiveHead` (AR-NTP): P(c_j | c_<j, h) for j = 1..k, normalised over the trie's valid
  children of the prefix (constrained, default) or over the whole level vocabulary.
- `ParallelHead` (non-AR, RPG-style): k independent softmaxes P(c_j | h).

AR parameterisation. The level-j conditional scores token v after prefix p as

    s_j(v | p, h) = < q_j(h) * (1 + gamma_j(p)) + beta_j(p),  E_j[v] > + b_j[v]

where q_j is a per-level context MLP and (gamma_j, beta_j) = MLP_j(sum of the prefix's token
embeddings): the prefix modulates the context (FiLM). By default all parameters are per token,
never per item, so the output layer is O(k * V * d). With `item_vectors` a node's output vector
becomes E_j[tok] + (mean item vector below the node): at the leaves ("leaf") or at every level
("all"), the item vectors tied to the backbone's item-ID input table as FV-MLE's tied vectors are.
That adds item-level capacity where the tokens run out; each step still scores only the prefix's
children, never all N items. Because the prefix enters through context-free
vectors, scores over *all* trie nodes of a level are one GEMM: s = q_j(h) @ W_j^T + c_j with
W_j[child] = (1 + gamma(parent)) * E_j[tok] and c_j[child] = <beta(parent), E_j[tok]> + b_j[tok];
exact scoring of all N items costs about what FV-MLE's softmax costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sidrec.model.softmax_ce import softmax_ce
from sidrec.tokenize.codebook import Codebook

NEG_INF = float("-inf")
ITEM_VECTORS = ("none", "leaf", "all")
ROOT_SCORES = ("mean", "lse", "lse-all")


def _mlp(d_in: int, d_hidden: int, d_out: int, dropout: float = 0.0) -> nn.Sequential:
    """Two layers; dropout on the hidden units regularises the head's own capacity, which grows
    with d while the data does not (the AR head over-fits before the backbone does at d = 128)."""
    act = nn.Sequential(nn.GELU(), nn.Dropout(dropout))  # one slot: parameter names stay 0.* and 2.*
    return nn.Sequential(nn.Linear(d_in, d_hidden), act, nn.Linear(d_hidden, d_out))


class ContextMLP(nn.Module):
    """q(h) = h + MLP(LN(h)): a per-level view of the backbone state."""

    def __init__(self, d: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = _mlp(d, hidden, d, dropout)

    def forward(self, h):
        return h + self.mlp(self.ln(h))


def segment_logsumexp(scores: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """logsumexp of scores [B, M] within segments seg [M] (values in 0..n_seg-1) -> [B, n_seg]."""
    b = scores.shape[0]
    idx = seg.unsqueeze(0).expand(b, -1)
    mx = torch.full((b, n_seg), NEG_INF, dtype=scores.dtype, device=scores.device)
    mx = mx.scatter_reduce(1, idx, scores, reduce="amax", include_self=True)
    mx_safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s = torch.zeros_like(mx).scatter_add_(1, idx, torch.exp(scores - mx_safe.gather(1, idx)))
    return torch.log(s) + mx_safe


class SharedTokenVectors:
    """Per-level views [V_j, d] of the backbone's flat semantic-token input table.

    Tied output vectors for the AR and parallel heads, the analogue of FV-MLE's tied item vectors:
    a token's output vector is its input embedding. A plain object, not a Module, so the table is
    registered, trained and saved once, in the backbone.
    """

    def __init__(self, table: nn.Embedding, sizes: list[int]):
        self.table = table
        self.bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.table.weight[self.bounds[j]:self.bounds[j + 1]]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __iter__(self):
        return (self[j] for j in range(len(self)))


def token_vectors(sizes: list[int], d: int, shared: nn.Embedding | None):
    """Output token vectors per level: own parameters, or (tied) views of the input token table."""
    if shared is not None:
        return SharedTokenVectors(shared, sizes)
    return nn.ParameterList([nn.Parameter(torch.randn(v, d) * 0.02) for v in sizes])


class ItemVectors:
    """A plain (unregistered) view of the backbone's item-ID input table: registered and saved once."""

    def __init__(self, table: nn.Embedding, n_items: int):
        self.table, self.n_items = table, n_items

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight[: self.n_items]


class FullSoftmaxHead(nn.Module):
    """FV-MLE: P(i | h) = softmax_i(<h, w_i> + b_i) over all N items."""

    kind = "fv"

    def __init__(self, d: int, n_items: int, tied_weight: nn.Parameter | None = None,
                 chunk_size: int | None = None):
        super().__init__()
        self.n_items = n_items
        self.chunk_size = chunk_size  # item chunk of the memory-efficient loss (None: one pass)
        self.weight = tied_weight if tied_weight is not None else nn.Parameter(torch.randn(n_items, d) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_items))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight[: self.n_items].T + self.bias

    def nll(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        if h.dtype != torch.float32 or not torch.is_grad_enabled():
            return F.cross_entropy(self.logits(h), items, reduction="none")  # float64 checks, inference
        return softmax_ce(h, self.weight[: self.n_items], self.bias, items, self.chunk_size)

    def log_prob(self, h, items):
        return -self.nll(h, items)

    def log_prob_all(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.logits(h), dim=-1)


class AutoregressiveHead(nn.Module):
    """AR-NTP over semantic IDs; `constrained` normalises each level over valid trie children."""

    kind = "ar"

    def __init__(self, d: int, codebook: Codebook, constrained: bool = True, hidden: int | None = None,
                 shared_tokens: nn.Embedding | None = None, item_vectors: str = "none",
                 item_table: nn.Embedding | None = None, node_bias: bool = False, dropout: float = 0.0,
                 film: bool = True, context: bool = True, root_score: str = "mean"):
        super().__init__()
        if item_vectors not in ITEM_VECTORS:
            raise ValueError(f"item_vectors must be one of {ITEM_VECTORS}, not {item_vectors!r}")
        if root_score not in ROOT_SCORES:
            raise ValueError(f"root_score must be one of {ROOT_SCORES}, not {root_score!r}")
        if root_score != "mean" and item_vectors != "all":
            raise ValueError("root_score 'lse' scores first-level nodes by their items: it needs item_vectors 'all'")
        if (item_vectors != "none" or node_bias) and not constrained:
            raise ValueError("item vectors and node biases need the constrained head (they exist only for valid IDs)")
        self.cb = codebook
        self.trie = codebook.trie
        self.sizes = codebook.sizes
        self.constrained = constrained
        hidden = hidden or 2 * d
        k = len(self.sizes)
        self.register_buffer("codes", torch.as_tensor(codebook.codes), persistent=False)
        # context=False: q_j = h at every level; film=False: the prefix enters only through which
        # children it has (ablations of the head's own capacity beyond FV-MLE's dot product)
        self.ctx = nn.ModuleList([ContextMLP(d, hidden, dropout) if context else nn.Identity() for _ in range(k)])
        self.tok_in = nn.ModuleList([nn.Embedding(v, d) for v in self.sizes[:-1]]) if film else None
        self.film = nn.ModuleList([_mlp(d, hidden, 2 * d, dropout) for _ in range(k - 1)]) if film else None
        self.tok_out = token_vectors(self.sizes, d, shared_tokens)
        self.tok_bias = nn.ParameterList([nn.Parameter(torch.zeros(v)) for v in self.sizes])
        if item_vectors == "none":
            self.item_emb = None
        elif item_table is not None:  # tied: the backbone's item-ID table
            self.item_emb = ItemVectors(item_table, codebook.n_items)
        else:  # own table ("emb" in its name: no weight decay, like every embedding)
            self.item_emb = nn.Embedding(codebook.n_items, d)
            nn.init.normal_(self.item_emb.weight, std=0.02)
        self.item_levels = {"none": (), "leaf": (k - 1,), "all": tuple(range(k))}[item_vectors]
        # root_score "lse": a first-level node's item part is log sum_{i below} exp(<q, e_i>), the exact
        # marginal of a softmax over its items, instead of <q, mean e_i>. Every item vector then meets
        # every context at the first level, as in FV-MLE, at FV-MLE's O(N d) cost (an ablation).
        # "lse-all": every level above the leaves (a leaf's log-sum-exp is its own item's score), so the
        # conditionals are FV-MLE's own marginals plus the head's token terms, at k times that cost.
        self.lse_levels = {"mean": (), "lse": (0,), "lse-all": tuple(range(k - 1))}[root_score]
        # One bias per trie node, started at log(#items below it): Q starts uniform over items (as
        # FV-MLE does) instead of uniform over children, and the leaves get FV's per-item bias.
        # (With root_score "lse" the first level's log-sum-exp already counts its items: it starts at 0.)
        self.node_bias = nn.ParameterList([nn.Parameter(torch.log(torch.as_tensor(
            self.trie.n_items_below(j + 1), dtype=torch.float32)) * (j not in self.lse_levels))
            for j in range(k)]) if node_bias else None
        for m in self.film or ():  # start as the identity modulation
            nn.init.zeros_(m[-1].weight)
            nn.init.zeros_(m[-1].bias)

    # -- prefix modulation --------------------------------------------------------------------
    def _film(self, j: int, prefix_codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gamma, beta) [M, d] for prefixes given as their first j tokens [M, j]; None at the root
        and without FiLM (no modulation)."""
        if j == 0 or self.film is None:
            return None
        e = sum(self.tok_in[l](prefix_codes[:, l]) for l in range(j))
        g, b = self.film[j - 1](e).chunk(2, dim=-1)
        return g, b

    def level_scores(self, j: int, q: torch.Tensor, prefix_codes: torch.Tensor,
                     nodes: torch.Tensor | None = None) -> torch.Tensor:
        """Raw scores [B, V_j] of every level-j token after each row's prefix (teacher forcing/beam).

        `nodes` [B]: the rows' depth-j prefix nodes (-1: dead beam); needed with leaf item vectors.
        """
        film = self._film(j, prefix_codes)
        if film is not None:
            q = q * (1 + film[0]) + film[1]
        s = q @ self.tok_out[j].T + self.tok_bias[j]
        if j in self.item_levels or self.node_bias is not None:
            if nodes is None and j > 0:
                raise ValueError("item vectors and node biases need the rows' prefix nodes (level_scores(..., nodes))")
            s = s + self._node_scores(j, q, nodes, s.shape[1])
        return s

    def node_item_vectors(self, j: int, device) -> torch.Tensor:
        """[P_{j+1}, d] item part of the depth-(j+1) node vectors: the item's own vector at the
        leaves, the mean vector of the items below the node above them."""
        w = self.item_emb.weight
        if j == len(self.sizes) - 1:
            return torch.index_select(w, 0, self.trie.torch("first_item", j + 1, device))
        node = self.trie.torch("item_node", None, device)[j + 1]
        n = self.trie.n_nodes(j + 1)
        total = w.new_zeros(n, w.shape[1]).index_add(0, node, w)
        count = torch.bincount(node, minlength=n).clamp(min=1).to(w.dtype)
        return total / count[:, None]

    def _lse_scores(self, j: int, q: torch.Tensor) -> torch.Tensor:
        """[B, P_{j+1}] log sum over the items below each depth-(j+1) node of exp(<q, e_i>)."""
        s = q @ self.item_emb.weight.T
        s = s.float() if s.dtype in (torch.bfloat16, torch.float16) else s  # exp-sums in >= float32
        m = s.max(1, keepdim=True).values.detach()
        with torch.autocast(q.device.type, enabled=False):  # the sparse GEMM stays in s's dtype
            sums = torch.sparse.mm(self._below(j + 1, s.dtype, q.device), torch.exp(s - m).T).T  # [B, P_{j+1}]
        return torch.log(sums.clamp(min=torch.finfo(s.dtype).tiny)) + m  # a node 87+ nats down: clamped

    def _below(self, depth: int, dtype, device) -> torch.Tensor:
        """Sparse [P_depth, N] indicator of the items below each depth-`depth` node (cached): node sums
        over [B, N] are one sparse GEMM, and so is their backward (scatter-based sums were several times slower)."""
        key = ("below", depth, dtype, str(device))
        if key not in self.trie._t:
            node = self.trie.torch("item_node", depth, device)
            idx = torch.stack([node, torch.arange(len(node), device=device)])
            ones = torch.ones(len(node), dtype=dtype, device=device)
            shape = (self.trie.n_nodes(depth), len(node))
            self.trie._t[key] = torch.sparse_coo_tensor(idx, ones, shape, check_invariants=True).coalesce()
        return self.trie._t[key]

    def _node_scores(self, j: int, q: torch.Tensor, nodes: torch.Tensor, v: int) -> torch.Tensor:
        """The node-specific part of each row's valid level-j children's scores, scattered to their
        tokens [B, V]: <q, item part> (item levels) + the node bias (with node_bias)."""
        items = j in self.item_levels
        lse = self._lse_scores(j, q) if j in self.lse_levels else None
        nv = self.node_item_vectors(j, q.device) if items and lse is None else None
        nb = self.node_bias[j] if self.node_bias is not None else None
        tok, child = self.trie.children_padded(j, q.device)
        if len(tok) == 1:  # the root: every row has the same children, one GEMM
            if items:
                x = lse[:, child[0]] if lse is not None else q @ nv[child[0]].T
            else:
                x = q.new_zeros(len(q), child.shape[1])
            x = x.to(torch.promote_types(x.dtype, nb.dtype)) + nb[child[0]] if nb is not None else x
            return x.new_zeros(len(q), v).index_add(1, tok[0], x)  # x's dtype (bf16 under autocast)
        tok, child = tok[nodes.clamp(min=0)], child[nodes.clamp(min=0)]  # [B, F], -1 = padding
        c0 = child.clamp(min=0)
        if lse is not None:
            add = torch.gather(lse, 1, c0)
        elif items:
            step = max(1, (1 << 24) // (child.shape[1] * q.shape[1]))  # bound the [rows, F, d] gather
            parts = []
            for i in range(0, len(q), step):  # index_select: its backward is a fast index_add
                e = torch.index_select(nv, 0, c0[i:i + step].reshape(-1)).view(*c0[i:i + step].shape, -1)
                parts.append(torch.einsum("bd,bfd->bf", q[i:i + step], e))
            add = torch.cat(parts)
        else:
            add = q.new_zeros(child.shape)
        if nb is not None:
            add = add.to(torch.promote_types(add.dtype, nb.dtype)) + torch.index_select(nb, 0, c0.reshape(-1)).view(c0.shape)
        add = add * ((child >= 0) & (nodes >= 0)[:, None])  # padding, dead beams: 0
        return add.new_zeros(len(q), v).scatter_add(1, tok.clamp(min=0), add)

    def level_log_probs(self, j: int, q: torch.Tensor, prefix_codes: torch.Tensor,
                        nodes: torch.Tensor) -> torch.Tensor:
        """log P(c_j = v | prefix, h) for all v: [B, V_j]; -inf on invalid tokens if constrained."""
        s = self.level_scores(j, q, prefix_codes, nodes)
        if self.constrained:
            s = s.masked_fill(~self.trie.valid_mask(j, nodes), NEG_INF)
        return torch.log_softmax(s, dim=-1)

    def contexts(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [m(h) for m in self.ctx]

    # -- the common interface ----------------------------------------------------------------
    def nll(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Teacher-forced sum of token losses: -sum_j log P(c*_j | c*_<j, h)."""
        codes = self.codes[items]
        nodes = self.trie.torch("item_node", None, h.device)[:, items]
        loss = h.new_zeros(len(items))
        for j, q in enumerate(self.contexts(h)):
            lp = self.level_log_probs(j, q, codes[:, :j], nodes[j])
            loss = loss - lp.gather(1, codes[:, j : j + 1]).squeeze(1)
        return loss

    def log_prob(self, h, items):
        return -self.nll(h, items)

    def node_tables(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level, the context-free vectors and offsets of every trie node (see module doc).

        They depend only on parameters: compute once per evaluation pass and pass to log_prob_all.
        """
        out = []
        for j in range(len(self.sizes)):
            parent = self.trie.torch("node_parent", j + 1, device)
            tok = self.trie.torch("node_tok", j + 1, device)
            out.append(self._node_vectors(j, parent, tok, device))
        return out

    def log_prob_all(self, h: torch.Tensor, tables=None) -> torch.Tensor:
        """Exact log Q(i | h) for all N items [B, N], level by level over the trie (no per-item passes).

        Works in [nodes, B] layout: every gather/reduction then moves whole contiguous rows, and
        sibling normalisers are dense logsumexps over groups of equal fan-out (Trie.sibling_groups).
        """
        tables = tables or self.node_tables(h.device)
        logq = h.new_zeros(1, h.shape[0])  # [nodes, B]: the root
        for j, q in enumerate(self.contexts(h)):
            parent = self.trie.torch("node_parent", j + 1, h.device)
            w, c = tables[j]
            s = torch.addmm(c[:, None], w, q.T)  # [P_{j+1}, B]
            if j in self.lse_levels:
                s = s + self._lse_scores(j, q).T.to(s.dtype)
            lse = self._sibling_lse(j, s) if self.constrained else self._full_vocab_lse(j, q, h.device).T
            logq = torch.index_select(logq - lse, 0, parent).add_(s)
        leaf = self.trie.torch("item_node", None, h.device)[-1]
        return torch.index_select(logq, 0, leaf).T  # a view: reductions over items run as fast on it

    def _sibling_lse(self, j: int, s: torch.Tensor) -> torch.Tensor:
        """logsumexp over each depth-j node's children: s [P_{j+1}, B] -> [P_j, B]."""
        out = s.new_empty(self.trie.n_nodes(j), s.shape[1])
        for nodes, kids, n_children in self.trie.sibling_groups(j, s.device):
            block = torch.index_select(s, 0, kids)
            out[nodes] = block if n_children == 1 else torch.logsumexp(block.view(len(nodes), n_children, -1), 1)
        return out

    def _node_vectors(self, j, parent, tok, device) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.tok_out[j][tok]
        b = self.tok_bias[j][tok]
        if j in self.item_levels and j not in self.lse_levels:
            e = e + self.node_item_vectors(j, device)
        if self.node_bias is not None:
            b = b + self.node_bias[j]
        film = self._film(j, self._node_codes(j, device)) if j else None  # over the [P_j, j] parents
        if film is None:
            return e, b
        g, be = film
        return (1 + g[parent]) * e, (be[parent] * e).sum(-1) + b

    def _node_codes(self, j: int, device) -> torch.Tensor:
        """The j tokens of every depth-j node [P_j, j] (taken from the first item under it)."""
        key = ("node_codes", j, str(device))
        cache = self.trie._t
        if key not in cache:
            first = torch.as_tensor(self.trie.first_item[j])
            cache[key] = torch.as_tensor(self.cb.codes)[first, :j].to(device)
        return cache[key]

    def _full_vocab_lse(self, j: int, q: torch.Tensor, device) -> torch.Tensor:
        """Unconstrained normaliser of every depth-j prefix: logsumexp over all V_j tokens [B, P_j]."""
        codes = self._node_codes(j, device) if j else None
        film = self._film(j, codes)
        if film is None:  # root, or no FiLM: every prefix shares one normaliser
            lse = torch.logsumexp(q @ self.tok_out[j].T + self.tok_bias[j], -1, keepdim=True)
            return lse if j == 0 else lse.expand(-1, len(codes))
        g, be = film
        out = []
        for qb in q:  # one context at a time: [P_j, V_j] scores (used by the verifier only)
            s = (qb * (1 + g) + be) @ self.tok_out[j].T + self.tok_bias[j]
            out.append(torch.logsumexp(s, -1))
        return torch.stack(out)


class ParallelHead(nn.Module):
    """Non-AR: P(ID | h) = prod_j P(c_j | h), k independent softmaxes (cannot couple positions)."""

    kind = "parallel"

    def __init__(self, d: int, codebook: Codebook, hidden: int | None = None,
                 shared_tokens: nn.Embedding | None = None, dropout: float = 0.0):
        super().__init__()
        self.sizes = codebook.sizes
        self.register_buffer("codes", torch.as_tensor(codebook.codes), persistent=False)
        offsets = torch.cumsum(torch.tensor([0, *self.sizes[:-1]]), 0)  # token j of an item -> row of the
        self.register_buffer("flat_codes", (self.codes + offsets).reshape(-1), persistent=False)  # stacked tables
        hidden = hidden or 2 * d
        self.ctx = nn.ModuleList([ContextMLP(d, hidden, dropout) for _ in self.sizes])
        self.tok_out = token_vectors(self.sizes, d, shared_tokens)
        self.tok_bias = nn.ParameterList([nn.Parameter(torch.zeros(v)) for v in self.sizes])

    def level_log_probs_all(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [torch.log_softmax(m(h) @ w.T + b, -1) for m, w, b in zip(self.ctx, self.tok_out, self.tok_bias)]

    def nll(self, h, items):
        codes = self.codes[items]
        lps = self.level_log_probs_all(h)
        return -sum(lp.gather(1, codes[:, j : j + 1]).squeeze(1) for j, lp in enumerate(lps))

    def log_prob(self, h, items):
        """log of the model's probability of the item's ID (mass on invalid IDs is not removed)."""
        return -self.nll(h, items)

    def log_prob_all(self, h: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
        """[B, N]: sum over levels of log P(c_j(i) | h), renormalised over the N valid IDs.

        One embedding_bag over the stacked [sum_j V_j, B] tables sums each item's k rows, contiguous
        row reads instead of k column gathers on [B, V_j]."""
        table = torch.cat(self.level_log_probs_all(h), 1).T.contiguous()
        n, k = self.codes.shape
        bags = torch.arange(0, n * k, k, device=h.device)
        out = F.embedding_bag(self.flat_codes, table, bags, mode="sum").T.contiguous()
        return torch.log_softmax(out, -1) if renormalize else out
