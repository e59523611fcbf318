"""Output heads behind one small protocol (`Head`): FV-MLE, AR-NTP and the parallel head.

- `FullSoftmaxHead` (FV-MLE): logits over all N items, cross-entropy.
- `AutoregressiveHead` (AR-NTP): P(c_j | c_<j, h) for j = 1..k over the trie's valid children of
  the prefix (the formula is in its docstring).
- `ParallelHead` (non-AR, RPG-style): k independent softmaxes P(c_j | h), a counter-example.

The ablations the project's sweeps found to change nothing (no FiLM, no context MLPs, head
dropout, log-sum-exp node scores, leaf-only item vectors) were removed from the product head; their
results are in docs/.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from sidrec.model import lowp
from sidrec.model.node_table import NodeTable
from sidrec.model.sampled import NegativeSampler, sampled_softmax_nll
from sidrec.model.softmax_ce import softmax_ce
from sidrec.tokenize.codebook import Codebook

NEG_INF = float("-inf")


@runtime_checkable
class TrieDecoder(Protocol):
    """What beam search walks: an AR-NTP head scoring the children of trie nodes level by level.

    contexts(h): one query per level; child_logits(j, q, rows, child, beams, tables): the scores of
    given children of the beams' level-j nodes, from eval_cache's node tables (child_scores: all
    children of each node as a dense row, -inf off the trie); level_scores: all V_j tokens (the
    unconstrained counter-example, which may leave the trie)."""

    trie: object
    sizes: list[int]
    constrained: bool

    def contexts(self, h: torch.Tensor) -> list[torch.Tensor]: ...

    def child_logits(self, j: int, q: torch.Tensor, rows: torch.Tensor, child: torch.Tensor, beams: int,
                     tables) -> torch.Tensor: ...

    def child_scores(self, j: int, q: torch.Tensor, nodes: torch.Tensor, tables) -> torch.Tensor: ...

    def level_scores(self, j: int, q: torch.Tensor, prefix_codes: torch.Tensor, nodes=None) -> torch.Tensor: ...

    def eval_cache(self, device): ...


@runtime_checkable
class Head(Protocol):
    """What training, evaluation, decoding, serving, the verifier and `items add` need from an output
    head: no code outside the head builders (`sidrec.model`) asks which kind of head it has.

    supports_beam: it has a `proposer` (AR heads, which decode level by level).
    codebook: the semantic IDs its scores run through (None: FV-MLE, which scores item ids).
    mix: a ranking weight chosen on validation after training (the joint head's), else None.
    adds_items: items added after training can be scored (they need no trained output vector).
    proposer(): the TrieDecoder beam search walks (the head itself, a joint head's AR part), or None.
    rescore(h, items, ar_log_q): the scores of the proposer's candidates that the head returns.
    token_model(): the head whose Q(i|x) the theorem is about (a joint head's AR part; else itself).
    set_target_counts(counts): the training targets' counts, for a popularity / logQ sampler.
    eval_cache(device): what scoring can reuse across batches of one pass (AR: node tables), or None.
    rank_scores(h, cache): [B, N] scores ranking items like log_prob_all (may omit a per-row constant).
    served_scores(h, cache): [B, N] the scores exact decoding returns to a user: log Q(i | h), or a
    joint head's mixture score (what its beam search returns too, so both decodes agree).
    """

    supports_beam: bool
    codebook: Codebook | None
    mix: float | None
    adds_items: bool

    def nll(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor: ...

    def log_prob_all(self, h: torch.Tensor, cache=None) -> torch.Tensor: ...

    def rank_scores(self, h: torch.Tensor, cache=None) -> torch.Tensor: ...

    def served_scores(self, h: torch.Tensor, cache=None) -> torch.Tensor: ...

    def eval_cache(self, device): ...

    def proposer(self) -> TrieDecoder | None: ...

    def rescore(self, h: torch.Tensor, items: torch.Tensor, ar_log_q: torch.Tensor) -> torch.Tensor: ...

    def token_model(self) -> "Head": ...

    def set_target_counts(self, counts: torch.Tensor) -> None: ...


class _OwnScores:
    """The defaults of a head that is its own token model and returns its proposer's scores."""

    mix = None

    def proposer(self):
        return None

    def rescore(self, h: torch.Tensor, items: torch.Tensor, ar_log_q: torch.Tensor) -> torch.Tensor:
        return ar_log_q

    def token_model(self):
        return self

    def set_target_counts(self, counts: torch.Tensor) -> None:
        pass


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class ContextMLP(nn.Module):
    """q(h) = h + MLP(LN(h)): a per-level view of the backbone state."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = _mlp(d, hidden, d)

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


def grouped_dots(q: torch.Tensor, group: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """out[b, f] = <q[b], vectors[group[b], f]>: q [B, d], group [B] in 0..G-1, vectors [G, F, d] -> [B, F].

    A segmented GEMM: the rows of each group are packed into chunks of c rows, and every chunk is
    multiplied by its group's [F, d] block in one batched GEMM, so the vectors are copied once per
    chunk instead of once per row (B·F·d). c = sqrt(B·F / G) balances the memory of the two
    paddings (rows up to a multiple of c, blocks repeated per chunk), not the arithmetic of padded
    rows (on a skewed batch up to about sqrt(F / mean group size) times B·F·d, still GEMM-speed);
    c = 1 is the per-row gather."""
    b, (g, f, d) = len(q), vectors.shape
    sizes = torch.bincount(group, minlength=g)
    c = max(1, min(int(sizes.max()), round((b * f / g) ** 0.5)))
    order = torch.argsort(group, stable=True)
    first_row = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(b, device=q.device) - first_row[group[order]]  # position within its group
    n_chunks = (sizes + c - 1) // c
    first_chunk = torch.cumsum(n_chunks, 0) - n_chunks
    pos = torch.empty_like(group)
    pos[order] = (first_chunk[group[order]] + rank // c) * c + rank % c
    total = int(n_chunks.sum())
    packed = q.new_zeros(total * c, d).index_copy(0, pos, q).view(total, c, d)
    blocks = vectors if bool((n_chunks == 1).all()) else torch.index_select(  # 2-d: its backward is a fast index_add
        vectors.reshape(g, f * d), 0, torch.repeat_interleave(torch.arange(g, device=q.device), n_chunks)).view(total, f, d)
    packed, blocks = packed.to(torch.promote_types(packed.dtype, blocks.dtype)), blocks.to(
        torch.promote_types(packed.dtype, blocks.dtype))
    # blocks [T, F, d] @ packed^T: the blocks' gradient comes out [T, F, d] contiguous (no transposed copy)
    scores = torch.bmm(blocks, packed.transpose(1, 2)).transpose(1, 2).reshape(total * c, f)
    return torch.index_select(scores, 0, pos)


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


class FullSoftmaxHead(_OwnScores, nn.Module):
    """FV-MLE: P(i | h) = softmax_i(<h, w_i> + b_i) over all N items.

    Trained with the exact loss (streamed over item chunks), or, with a `sampler`, with sampled
    softmax and logQ correction (`sidrec.model.sampled`): what large catalogues use in practice, an
    approximation of MLE. Scoring and evaluation always use the full softmax. The item vectors are its
    own, the backbone's item-ID table (`tied_weight`) or a node table's path sums (`table`, the joint
    head's); sampled softmax reads only the rows it scores (row-sparse gradients when `sparse`)."""

    supports_beam, codebook, adds_items = False, None, False  # a new item has no trained output vector

    def __init__(self, d: int, n_items: int, tied_weight: nn.Parameter | None = None,
                 chunk_size: int | None = None, sampler: NegativeSampler | None = None, table: nn.Module | None = None):
        super().__init__()
        self.n_items = n_items
        self.chunk_size = chunk_size  # item chunk of the memory-efficient loss (None: one pass)
        object.__setattr__(self, "table", table)  # a node table, registered and saved in the backbone
        if table is None:
            self.weight = tied_weight if tied_weight is not None else nn.Parameter(torch.randn(n_items, d) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_items))
        self.sampler = sampler
        self.sparse = False

    def set_target_counts(self, counts: torch.Tensor) -> None:
        if self.sampler is not None:  # popularity / in-batch logQ
            self.sampler.set_counts(counts)

    def item_weight(self) -> torch.Tensor:
        """All item vectors [N, d]."""
        return self.table.weight if self.table is not None else self.weight[: self.n_items]

    def item_rows(self, items: torch.Tensor) -> torch.Tensor:
        """The vectors of `items` [..., d], read sparsely (only these rows get a gradient)."""
        if self.table is not None:
            return self.table(items)
        return F.embedding(items, self.weight, sparse=self.sparse and torch.is_grad_enabled())

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item_weight().T + self.bias

    def nll(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The training loss per target (grad enabled: streamed exact CE, or sampled softmax when the
        head has a sampler); without grad, the exact -log P(item | h)."""
        if h.dtype != torch.float32 or not torch.is_grad_enabled():
            return F.cross_entropy(self.logits(h), items, reduction="none")  # float64 checks, inference
        if self.sampler is not None:
            return sampled_softmax_nll(h, self.item_rows, self.bias, items, self.sampler)
        return softmax_ce(h, self.item_weight(), self.bias, items, self.chunk_size)

    def log_prob(self, h, items):
        return -self.nll(h, items)

    def served_scores(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        return self.log_prob_all(h, cache)

    def log_prob_all(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        return torch.log_softmax(self.logits(h), dim=-1)

    def rank_scores(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        return self.logits(h)  # the log-partition is one constant per row

    def eval_cache(self, device):
        return None


class AutoregressiveHead(_OwnScores, nn.Module):
    """AR-NTP over semantic IDs: Q(i | h) = prod_j P(c_j(i) | c_<j(i), h).

    Level j scores the child n = (p, v) of prefix p, for the context h, as

        s_j(n | h) = < q_j(h) * (1 + gamma_j(p)) + beta_j(p),  E_j[v] + mean_{i below n} e_i >  + b_j[v] + b_n

    q_j(h) = h + MLP_j(LN(h)) is a per-level view of the backbone state; (gamma_j, beta_j) =
    MLP_j(sum of p's token embeddings) lets the prefix modulate it (FiLM); E_j are the level's token
    vectors (tied: the backbone's token input table); e_i the item vectors (tied: the backbone's
    item-ID table, as FV-MLE's output vectors are); b_n one bias per trie node, started at
    log(#items below n) so that Q starts uniform over items. P(c_j | p, h) is the softmax of s_j over
    p's children in the trie, so sum_i Q(i | h) = 1 and the summed token loss is -log Q(i* | h).

    Because p enters through context-free vectors, every level's scores over all trie nodes are one
    GEMM (node_tables): exact scoring of all N items costs about what FV-MLE's softmax costs, while
    training and beam search touch only each prefix's children.

    With a node table (`sidrec.model.node_table`, the tied backbone's or its own) the item vectors are
    path sums of per-node rows kept centred, so mean_{i below n} e_i is the sum of the rows from the root
    to n; between siblings only their own rows differ, so training reads just those rows (row-sparse
    gradients) and no step visits all N items. Same function class, same scores.

    Named variants: item_vectors=False drops the item terms (mean e_i and b_n: the token-only head);
    constrained=False (a counter-example for `sidrec verify`, token-only) normalises over all V_j
    tokens, so mass leaks to IDs of no item.
    """

    supports_beam, adds_items = True, True

    def __init__(self, d: int, codebook: Codebook, *, constrained: bool = True, item_vectors: bool = True,
                 hidden: int | None = None, shared_tokens: nn.Embedding | None = None,
                 item_table: nn.Module | None = None, node_table: bool = False):
        super().__init__()
        if item_vectors and not constrained:
            raise ValueError("item vectors and node biases need the constrained head (they exist only for valid IDs)")
        self.codebook, self.trie, self.sizes = codebook, codebook.trie, codebook.sizes
        self.constrained = constrained
        hidden = hidden or 2 * d
        k = len(self.sizes)
        self.register_buffer("codes", torch.as_tensor(codebook.codes), persistent=False)
        self.ctx = nn.ModuleList([ContextMLP(d, hidden) for _ in range(k)])
        self.tok_in = nn.ModuleList([nn.Embedding(v, d) for v in self.sizes[:-1]])
        self.film = nn.ModuleList([_mlp(d, hidden, 2 * d) for _ in range(k - 1)])
        for m in self.film:  # start as the identity modulation
            nn.init.zeros_(m[-1].weight)
            nn.init.zeros_(m[-1].bias)
        self.tok_out = token_vectors(self.sizes, d, shared_tokens)
        self.tok_bias = nn.ParameterList([nn.Parameter(torch.zeros(v)) for v in self.sizes])
        self.item_emb, self.node_bias, self.own_nodes = None, None, None
        object.__setattr__(self, "_nodes", None)
        self._means_cache = self._tables_cache = self._key_params = self._narrow = None
        if item_vectors and (node_table or isinstance(item_table, NodeTable)):
            if isinstance(item_table, NodeTable):
                object.__setattr__(self, "_nodes", item_table)  # registered and saved once, in the backbone
            else:
                self.own_nodes = NodeTable(codebook, d)
        elif item_vectors:
            if item_table is not None:
                self.item_emb = ItemVectors(item_table, codebook.n_items)
            else:  # own table ("emb" in its name: no weight decay, like every embedding)
                self.item_emb = nn.Embedding(codebook.n_items, d)
                nn.init.normal_(self.item_emb.weight, std=0.02)
            self.node_bias = nn.ParameterList([nn.Parameter(torch.log(torch.as_tensor(
                self.trie.n_items_below(j + 1), dtype=torch.float32))) for j in range(k)])

    def proposer(self) -> "AutoregressiveHead":
        return self

    @property
    def nodes(self) -> NodeTable | None:
        """The node table the item terms come from (None: free item vectors, or none)."""
        return self.own_nodes if self.own_nodes is not None else self.__dict__.get("_nodes")

    @property
    def has_item_terms(self) -> bool:
        return self.item_emb is not None or self.nodes is not None

    # -- scoring ---------------------------------------------------------------------------
    def _film(self, j: int, prefix_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gamma, beta) [M, d] for prefixes given as their first j tokens [M, j]; None at the root."""
        if j == 0:
            return None
        e = sum(self.tok_in[l](prefix_codes[:, l]) for l in range(j))
        g, b = self.film[j - 1](e).chunk(2, dim=-1)
        return g, b

    def contexts(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [m(h) for m in self.ctx]

    def level_scores(self, j: int, q: torch.Tensor, prefix_codes: torch.Tensor,
                     nodes: torch.Tensor | None = None, means: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Scores s_j [B, V_j] of every level-j token after each row's prefix (teacher forcing, beam).
        `nodes` [B]: the rows' depth-j prefix nodes (-1: a dead beam); needed for the item terms.
        `means`: `node_means()` when the caller scores several levels (computed once)."""
        film = self._film(j, prefix_codes)
        if film is not None:
            q = q * (1 + film[0]) + film[1]
        s = q @ self.tok_out[j].T + self.tok_bias[j]
        if not self.has_item_terms:
            return s
        if nodes is None:
            nodes = torch.zeros(len(q), dtype=torch.long, device=q.device)
        if self.nodes is not None:  # a child's own row and bias: the rows above it are its siblings' too
            t = self.nodes
            return s + self._item_terms(j, q, nodes, s.shape[1], lambda c: t.node_rows(j + 1, c),
                                        lambda c: t.node_biases(j + 1, c))
        nv, nb = (means or self.node_means(q.device))[j], self.node_bias[j]
        return s + self._item_terms(j, q, nodes, s.shape[1], lambda c: torch.index_select(nv, 0, c),
                                    lambda c: torch.index_select(nb, 0, c))

    def node_means(self, device) -> list[torch.Tensor]:
        """Per level j, [P_{j+1}, d]: the mean item vector below each depth-(j+1) node (a leaf: its
        item's vector). Computed bottom-up, each level's sums from its children's: one pass over the
        N item vectors for all levels, the rest over the (much smaller) upper levels."""
        if self.nodes is not None:  # the prefix sums of the centred rows
            return [self.nodes.node_means(j + 1) for j in range(len(self.sizes))]
        w = self.item_emb.weight
        key = (str(device), w.data_ptr(), w._version)  # _version: bumped by every in-place update
        if not torch.is_grad_enabled() and self._means_cache is not None and self._means_cache[0] == key:
            return self._means_cache[1]  # decoding and scoring: constant between weight updates
        self._means_cache = self._tables_cache = None  # stale: freed before the new ones are built
        k = len(self.sizes)
        sums = torch.index_select(w, 0, self.trie.torch("first_item", k, device))  # leaves, in node order
        out = [sums]
        for depth in range(k - 1, 0, -1):
            parent = self.trie.torch("node_parent", depth + 1, device)
            sums = sums.new_zeros(self.trie.n_nodes(depth), w.shape[1]).index_add(0, parent, sums)
            out.append(sums / self.trie.torch("items_below", depth, device).clamp(min=1).to(w.dtype)[:, None])
        out = out[::-1]
        if not torch.is_grad_enabled():
            self._means_cache = (key, out)
        return out

    def _item_terms(self, j: int, q: torch.Tensor, nodes: torch.Tensor, v: int, vec, bias) -> torch.Tensor:
        """<q, w_n> + b_n of each row's valid children n, scattered to their tokens [B, V_j] (0 elsewhere
        and for dead beams); vec(children) / bias(children) read the children's vectors and biases.
        Children are gathered as a flat ragged list, so the cost is the number of real children, not
        rows x the largest fan-out."""
        if j == 0:  # the root: every row has the same children, one GEMM
            kids = torch.arange(self.trie.n_nodes(1), device=q.device)
            x = q @ vec(kids).T
            nb = bias(kids)
            x = x.to(torch.promote_types(x.dtype, nb.dtype)) + nb
            return x.new_zeros(len(q), v).index_copy(1, self.trie.torch("node_tok", 1, q.device), x)
        rows, child = self.trie.children(j, nodes)
        tok = self.trie.torch("node_tok", j + 1, q.device)[child]
        # index_select / sparse lookups: their backward is an index_add, or row-sparse
        dots = (torch.index_select(q, 0, rows) * vec(child)).sum(-1)
        nb = bias(child)
        dots = dots.to(torch.promote_types(dots.dtype, nb.dtype)) + nb
        return dots.new_zeros(len(q) * v).index_add(0, rows * v + tok, dots).view(len(q), v)

    def level_log_probs(self, j: int, q: torch.Tensor, prefix_codes: torch.Tensor,
                        nodes: torch.Tensor, means: list[torch.Tensor] | None = None) -> torch.Tensor:
        """log P(c_j = v | prefix, h) for all v: [B, V_j]; -inf on invalid tokens if constrained."""
        s = self.level_scores(j, q, prefix_codes, nodes, means)
        if self.constrained:
            s = s.masked_fill(~self.trie.valid_mask(j, nodes), NEG_INF)
        return torch.log_softmax(s, dim=-1)

    # -- the Head protocol ------------------------------------------------------------------
    def nll(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Teacher-forced sum of token losses: -sum_j log P(c*_j | c*_<j, h).

        Constrained, each level is normalised over the valid children of the target's prefix only
        (`_level_nll`: children gathered once per distinct prefix, not once per target); the
        unconstrained counter-example normalises over all V_j tokens."""
        if not len(items):  # every target was padding
            return h.new_zeros(0)
        codes = self.codes[items]
        nodes = self.trie.torch("item_node", None, h.device)[:, items]
        means = self.node_means(h.device) if self.item_emb is not None else None  # free item vectors only
        loss = h.new_zeros(len(items))
        for j, q in enumerate(self.contexts(h)):
            if not self.constrained:
                lp = self.level_log_probs(j, q, codes[:, :j], nodes[j], means)
                loss = loss - lp.gather(1, codes[:, j : j + 1]).squeeze(1)
                continue
            film = self._film(j, codes[:, :j])
            if film is not None:
                q = q * (1 + film[0]) + film[1]
            loss = loss + self._level_nll(j, q, nodes[j], nodes[j + 1], means)
        return loss

    def _level_nll(self, j: int, q: torch.Tensor, prefix: torch.Tensor, target: torch.Tensor,
                   means: list[torch.Tensor] | None) -> torch.Tensor:
        """-log P(target | prefix, q) [B] over the prefix's valid children (q: the FiLM-ed contexts;
        prefix / target: depth-j / depth-(j+1) node ids).

        The children of a node are contiguous in the trie, so the children of the batch's distinct
        prefixes form padded blocks; prefixes are bucketed by fan-out rounded up to a power of two
        (at most ceil(log2 V_j) + 1 buckets, padding under 2x however skewed the trie). Each bucket's
        rows and biases are read once per distinct prefix (a node-table step touches only them) and
        scored against its targets with one grouped GEMM (`grouped_dots`). Memory traffic P'·F·d
        (F: the fan-outs) instead of B·F·d; arithmetic B·F·d plus the chunk padding; no pass over
        the level's other nodes."""
        dev = q.device
        ptr = self.trie.torch("child_ptr", j, dev)
        uniq, inv = torch.unique(prefix, return_inverse=True)
        start, count = ptr[uniq], ptr[uniq + 1] - ptr[uniq]
        width = torch.pow(2, torch.ceil(torch.log2(count.double()))).long()
        s_tok = q @ self.tok_out[j].T + self.tok_bias[j]  # [B, V_j]: one GEMM for every bucket
        loss = s_tok.new_zeros(len(q), dtype=torch.promote_types(s_tok.dtype, torch.float32))
        row_width = width[inv]
        buckets = []
        for w in torch.unique(width).tolist():
            groups = torch.nonzero(width == w).squeeze(1)  # ascending, like uniq
            rows = torch.nonzero(row_width == w).squeeze(1)
            slot = torch.arange(w, device=dev)
            valid = slot[None, :] < count[groups, None]
            kids = torch.where(valid, start[groups, None] + slot[None, :], start[groups, None])  # pads: a sibling
            buckets.append((rows, torch.searchsorted(groups, inv[rows]), valid, kids, start[groups]))
        if self.has_item_terms:  # every bucket's rows in one lookup: one row-sparse gradient per level
            flat = torch.cat([kids.reshape(-1) for *_, kids, _ in buckets])
            if self.nodes is not None:
                vec, nb = self.nodes.node_rows(j + 1, flat), self.nodes.node_biases(j + 1, flat)
            else:
                vec, nb = torch.index_select(means[j], 0, flat), torch.index_select(self.node_bias[j], 0, flat)
            sizes = [kids.numel() for *_, kids, _ in buckets]
            vecs, nbs = vec.split(sizes), nb.split(sizes)
        tok_of = self.trie.torch("node_tok", j + 1, dev)
        for i, (rows, local, valid, kids, first) in enumerate(buckets):
            s = s_tok[rows].gather(1, torch.index_select(tok_of[kids], 0, local))  # [R, w]
            if self.has_item_terms:
                dots = grouped_dots(q[rows], local, vecs[i].view(*kids.shape, -1))
                bias = torch.index_select(nbs[i].view(kids.shape), 0, local)
                s = s + dots.to(torch.promote_types(dots.dtype, bias.dtype)) + bias
            s = s.to(loss.dtype).masked_fill(~torch.index_select(valid, 0, local), NEG_INF)
            pos = (target[rows] - first[local])[:, None]
            loss = loss.index_copy(0, rows, torch.logsumexp(s, 1) - s.gather(1, pos).squeeze(1))
        return loss

    def log_prob(self, h, items):
        return -self.nll(h, items)

    def eval_cache(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level, the context-free vectors and offsets of every trie node (see the class doc):
        s_j(n | h) = <q_j(h), w_n> + c_n. They depend only on the parameters, so without grad they are
        kept until a parameter changes (evaluation passes, beam search, a server's requests)."""
        if self._narrow is not None:  # serving in reduced precision: computed once, never recomputed
            return self._narrow
        key = self._param_key(device)
        if not torch.is_grad_enabled() and self._tables_cache is not None and self._tables_cache[0] == key:
            return self._tables_cache[1]
        self._tables_cache = None
        out = []
        means = self.node_means(device) if self.item_emb is not None else None
        if self.nodes is not None:  # a node's own row: the rows above it are shared by its siblings
            t = self.nodes
            means = [t.rows[t.depth_slice(j + 1)] for j in range(len(self.sizes))]
        for j in range(len(self.sizes)):
            parent = self.trie.torch("node_parent", j + 1, device)
            tok = self.trie.torch("node_tok", j + 1, device)
            out.append(self._node_vectors(j, parent, tok, device, means))
        if not torch.is_grad_enabled():
            self._tables_cache = (key, out)
        return out

    @torch.no_grad()
    def narrow_tables_(self, precision: str, device) -> None:
        """Serve from scoring tables stored in `precision` (`sidrec.model.lowp`): computed once in
        float32, then every level above `lowp.NARROW_MIN_ROWS` nodes narrowed (the small top levels stay
        float32: per-user GEMMs read them whole). Inference only from here on."""
        tables = self.eval_cache(device)
        self._narrow = [(lowp.LowPrecisionRows(w, precision) if len(w) > lowp.NARROW_MIN_ROWS else w, c)
                        for w, c in tables]
        # drop every reference to float32 tables and parameters (the node rows are freed next)
        self._tables_cache = self._means_cache = self._key_params = None

    def _param_key(self, device) -> tuple:
        """Changes whenever any parameter is replaced or updated in place (tensor version counters).
        The parameters are listed once (walking the module tree on every call cost a third of a
        millisecond, which a one-user request pays): sidrec updates them in place (optimizer steps,
        `load_state_dict`, `.to()`: seen by data_ptr and version); code that assigns a new Parameter
        to a head must build a new head."""
        if self._key_params is None:  # with the unregistered tables it reads (the backbone's)
            shared = [self.item_emb, self.nodes, self.tok_out]
            shared = [m.table if isinstance(m, (ItemVectors, SharedTokenVectors)) else m for m in shared]
            self._key_params = [*self.parameters(), *(p for m in shared if isinstance(m, nn.Module) for p in m.parameters())]
        return (str(device), *((p.data_ptr(), p._version) for p in self._key_params))

    def child_logits(self, j: int, q: torch.Tensor, rows: torch.Tensor, child: torch.Tensor, beams: int,
                     tables) -> torch.Tensor:
        """Scores [C] of depth-(j+1) nodes `child` [C], each a child of beam `rows` [C] (beams of user u
        at rows u*W .. u*W+W-1; `q` [B, d] the users' level-j contexts), from the node tables: what
        constrained beam search needs, with no per-beam MLP. Two ways to the same numbers, whichever
        reads less: one GEMM of each user's context with every depth-(j+1) node (small levels), or the
        beams' real children gathered as a flat list (large levels: independent of the catalogue size)."""
        w, c = tables[j]
        users = torch.div(rows, beams, rounding_mode="floor")
        if len(q) * len(w) <= 16 * len(child):  # per-user GEMM over all nodes of the level, then a gather
            return lowp.scores(w, q, c)[users, child]
        return (torch.index_select(q, 0, users) * lowp.gather(w, child)).sum(-1) + c[child]

    def child_scores(self, j: int, q: torch.Tensor, nodes: torch.Tensor, tables) -> torch.Tensor:
        """`child_logits` of every child of each beam's depth-j node (`nodes` [B * W]) as [B * W, V_j],
        -inf for tokens that lead nowhere and for dead beams."""
        v = self.sizes[j]
        rows, child = self.trie.children(j, nodes)
        dots = self.child_logits(j, q, rows, child, len(nodes) // len(q), tables)
        tok = self.trie.torch("node_tok", j + 1, q.device)[child]
        out = dots.new_full((len(nodes) * v,), NEG_INF)
        return out.index_copy(0, rows * v + tok, dots).view(len(nodes), v)

    def served_scores(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        return self.log_prob_all(h, cache)

    def log_prob_all(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        """Exact log Q(i | h) for all N items [B, N], level by level over the trie (no per-item passes).

        Works in [nodes, B] layout: every gather/reduction then moves whole contiguous rows, and
        sibling normalisers are dense logsumexps over groups of equal fan-out (Trie.sibling_groups).
        """
        tables = cache or self.eval_cache(h.device)
        logq = h.new_zeros(1, h.shape[0])  # [nodes, B]: the root
        for j, q in enumerate(self.contexts(h)):
            parent = self.trie.torch("node_parent", j + 1, h.device)
            w, c = tables[j]
            s = lowp.scores_t(w, q, c)  # [P_{j+1}, B]
            lse = self._sibling_lse(j, s) if self.constrained else self._full_vocab_lse(j, q, h.device).T
            logq = torch.index_select(logq - lse, 0, parent).add_(s)
        leaf = self.trie.torch("item_node", None, h.device)[-1]
        return torch.index_select(logq, 0, leaf).T  # a view: reductions over items run as fast on it

    rank_scores = log_prob_all

    def _sibling_lse(self, j: int, s: torch.Tensor) -> torch.Tensor:
        """logsumexp over each depth-j node's children: s [P_{j+1}, B] -> [P_j, B]."""
        out = s.new_empty(self.trie.n_nodes(j), s.shape[1])
        for nodes, kids, n_children in self.trie.sibling_groups(j, s.device):
            block = torch.index_select(s, 0, kids)
            out[nodes] = block if n_children == 1 else torch.logsumexp(block.view(len(nodes), n_children, -1), 1)
        return out

    def _node_vectors(self, j, parent, tok, device, means=None) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.tok_out[j][tok]
        b = self.tok_bias[j][tok]
        if self.has_item_terms:
            e = e + means[j] if torch.is_grad_enabled() else e.add_(means[j])  # e is a fresh gather
            nb = self.node_bias[j] if self.nodes is None else self.nodes.node_bias[self.nodes.depth_slice(j + 1), 0]
            b = b + nb
        film = self._film(j, self._node_codes(j, device)) if j else None  # over the [P_j, j] parents
        if film is None:
            return e, b
        g, be = film
        if torch.is_grad_enabled():
            return (1 + g[parent]) * e, (be[parent] * e).sum(-1) + b
        # scoring only: in place and in node chunks, so the largest level holds one [P, d] table
        # (what lets 10^7-item catalogues be scored within memory)
        step = 1 << 20
        for s in range(0, len(e), step):
            p = parent[s:s + step]
            b[s:s + step] += (be[p] * e[s:s + step]).sum(-1)
            e[s:s + step] *= 1 + g[p]
        return e, b

    def _node_codes(self, j: int, device) -> torch.Tensor:
        """The j tokens of every depth-j node [P_j, j] (taken from the first item under it)."""
        first = self.trie.torch("first_item", j, device)
        return self.codes.to(device)[first, :j]

    def _full_vocab_lse(self, j: int, q: torch.Tensor, device) -> torch.Tensor:
        """Unconstrained normaliser of every depth-j prefix: logsumexp over all V_j tokens [B, P_j]."""
        if j == 0:
            return torch.logsumexp(q @ self.tok_out[0].T + self.tok_bias[0], -1, keepdim=True)
        g, be = self._film(j, self._node_codes(j, device))
        out = []
        for qb in q:  # one context at a time: [P_j, V_j] scores (used by the verifier only)
            s = (qb * (1 + g) + be) @ self.tok_out[j].T + self.tok_bias[j]
            out.append(torch.logsumexp(s, -1))
        return torch.stack(out)


class JointHead(nn.Module):
    """AR-NTP and FV-MLE heads on one backbone: AR retrieval + FV rescoring.

    Trained on the sum of both losses (nll_ar + fv_weight * nll_fv). Ranked by the mixture score
    (1 - mix) log Q_ar + mix * FV logit, which orders items as (1 - mix) log Q_ar + mix log Q_fv does
    (FV's log-partition is one constant per user, left out so that candidates can be scored without
    it): exactly over all items (`rank_scores`, O(N d) per user), or the scalable way, beam search
    over the AR head proposing candidates that the FV head rescores (`rescore`, O(beam d) per user).
    Both return the same number for the same item; it is a score, not a probability.
    `log_prob_all` is the normalised mixture (a product of experts).
    """

    supports_beam, adds_items = True, False  # its FV part has no vector for a new item

    def __init__(self, ar: AutoregressiveHead, fv: FullSoftmaxHead, *, fv_weight: float = 1.0, mix: float = 0.5):
        super().__init__()
        self.ar, self.fv, self.fv_weight, self.mix = ar, fv, fv_weight, mix

    @property
    def codebook(self) -> Codebook:
        return self.ar.codebook

    def proposer(self) -> AutoregressiveHead:
        return self.ar  # the AR part proposes, `rescore` ranks its candidates with the mixture

    def token_model(self) -> AutoregressiveHead:
        return self.ar

    def set_target_counts(self, counts: torch.Tensor) -> None:
        self.fv.set_target_counts(counts)

    def nll(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.ar.nll(h, items) + self.fv_weight * self.fv.nll(h, items)

    def rank_scores(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        return (1 - self.mix) * self.ar.log_prob_all(h, cache) + self.mix * self.fv.logits(h)

    def served_scores(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        return self.rank_scores(h, cache)

    def log_prob_all(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        return torch.log_softmax(self.rank_scores(h, cache), -1)

    def log_prob(self, h, items):
        return self.log_prob_all(h).gather(1, items[:, None]).squeeze(1)

    def eval_cache(self, device):
        return self.ar.eval_cache(device)

    def rescore(self, h: torch.Tensor, items: torch.Tensor, ar_log_q: torch.Tensor) -> torch.Tensor:
        """Mixture scores [B, C] of candidate items [B, C] (-1: none) given their AR log Q."""
        c = items.clamp(min=0)
        logits = torch.einsum("bd,bcd->bc", h, self.fv.item_rows(c)) + self.fv.bias[c]
        return torch.where(items >= 0, (1 - self.mix) * ar_log_q + self.mix * logits, ar_log_q)


class ParallelHead(_OwnScores, nn.Module):
    """Non-AR: P(ID | h) = prod_j P(c_j | h), k independent softmaxes (cannot couple positions)."""

    supports_beam, adds_items = False, True  # a new item needs only its codes

    def __init__(self, d: int, codebook: Codebook, *, hidden: int | None = None,
                 shared_tokens: nn.Embedding | None = None):
        super().__init__()
        self.codebook = codebook
        self.sizes = codebook.sizes
        self.register_buffer("codes", torch.as_tensor(codebook.codes), persistent=False)
        offsets = torch.cumsum(torch.tensor([0, *self.sizes[:-1]]), 0)  # token j of an item -> row of the
        self.register_buffer("flat_codes", (self.codes + offsets).reshape(-1), persistent=False)  # stacked tables
        hidden = hidden or 2 * d
        self.ctx = nn.ModuleList([ContextMLP(d, hidden) for _ in self.sizes])
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

    def rank_scores(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        """[B, N]: sum over levels of log P(c_j(i) | h), mass on invalid IDs not removed.

        One embedding_bag over the stacked [sum_j V_j, B] tables sums each item's k rows, contiguous
        row reads instead of k column gathers on [B, V_j]."""
        table = torch.cat(self.level_log_probs_all(h), 1).T.contiguous()
        n, k = self.codes.shape
        bags = torch.arange(0, n * k, k, device=h.device)
        return F.embedding_bag(self.flat_codes, table, bags, mode="sum").T.contiguous()

    def served_scores(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        return self.log_prob_all(h, cache)

    def log_prob_all(self, h: torch.Tensor, cache=None) -> torch.Tensor:
        """[B, N]: rank_scores renormalised over the N valid IDs."""
        return torch.log_softmax(self.rank_scores(h), -1)

    def eval_cache(self, device):
        return None
