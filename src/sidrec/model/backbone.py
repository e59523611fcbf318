"""The shared causal Transformer backbone (SASRec-style, pre-norm).

Every position of a right-padded item history predicts the next item, all positions in
parallel. Right padding plus causal attention means a real position never attends to padding,
so no extra mask is needed; padded positions are simply ignored by the loss.

Item inputs are configurable: an item-ID embedding, the sum of the item's semantic-token
embeddings (one table per level), or both summed. The item-ID embedding is a plain table, or a node
table (`sidrec.model.node_table`: each item's vector is the sum of its trie path's rows) given by the
model when its AR head shares it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BackboneConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int = 256
    dropout: float = 0.5
    max_len: int = 50
    item_input: str = "id"  # id | sid | both


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))
        self.heads = heads
        self.drop = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ff(self.ln2(x)))

    def forward_last(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The block's output [B, d] at one position per row (`last` [B]) of x [B, T, d]: keys and
        values from every position up to it, the query, projection and feed-forward for it alone."""
        b, t, d = x.shape
        rows = torch.arange(b, device=x.device)
        y = self.ln1(x)
        w_q, w_kv = self.qkv.weight.split([d, 2 * d])
        b_q, b_kv = self.qkv.bias.split([d, 2 * d])
        q = F.linear(y[rows, last], w_q, b_q).view(b, self.heads, 1, d // self.heads)
        k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                for z in F.linear(y, w_kv, b_kv).split(d, dim=2))
        causal = (torch.arange(t, device=x.device) <= last[:, None])[:, None, None, :]  # [B, 1, 1, T]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=self.p if self.training else 0.0)
        x = x[rows, last] + self.drop(self.proj(a.reshape(b, d)))
        return x + self.drop(self.ff(self.ln2(x)))


class Backbone(nn.Module):
    """Causal Transformer over item histories; `forward(items)` -> hidden states [B, T, d].

    items: [B, T] int64, right-padded with `pad_id` (= n_items).
    """

    def __init__(self, cfg: BackboneConfig, n_items: int, codes: torch.Tensor | None = None,
                 sizes: list[int] | None = None, item_table: nn.Module | None = None):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        if cfg.item_input not in ("id", "sid", "both"):
            raise ValueError(f"item_input must be id, sid or both, not {cfg.item_input!r}")
        self.cfg = cfg
        self.pad_id = n_items
        d = cfg.d_model
        self.item_emb = None
        if cfg.item_input != "sid":
            self.item_emb = item_table if item_table is not None else nn.Embedding(n_items + 1, d, padding_idx=n_items)
        if cfg.item_input != "id":
            if codes is None or sizes is None:
                raise ValueError("semantic-ID item inputs need the codebook")
            offsets = torch.tensor([0] + list(sizes[:-1])).cumsum(0)
            # row n_items (padding) points at a dedicated zero row
            tok = torch.cat([codes + offsets, torch.full((1, len(sizes)), sum(sizes))])
            self.register_buffer("tok_index", tok.long(), persistent=False)
            self.tok_emb = nn.Embedding(sum(sizes) + 1, d, padding_idx=sum(sizes))
        else:
            self.tok_emb = None
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(d, cfg.n_heads, cfg.d_ff, cfg.dropout) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.apply(_init)  # a node table is initialised by its own constructor (not an nn.Embedding)

    def embed_items(self, items: torch.Tensor) -> torch.Tensor:
        x = 0
        if self.item_emb is not None:
            x = self.item_emb(items)
        if self.tok_emb is not None:
            x = x + self.tok_emb(self.tok_index[items]).sum(-2)
        return x

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        t = items.shape[1]
        if t > self.cfg.max_len:
            raise ValueError(f"history of length {t} exceeds max_len {self.cfg.max_len}")
        x = self.embed_items(items) * (self.cfg.d_model**0.5) + self.pos_emb.weight[:t]
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x)

    def last_states(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """forward(items)[b, lengths[b] - 1] [B, d], the state scoring reads, computed for that position
        alone: histories go through in groups of similar length (a short one is not run over the
        longest one's padding), and the last block runs its query and feed-forward for the last position
        only. The same function: right padding and causal attention mean a position never sees what
        follows it. A handful of groups (lengths rounded up to powers of two), not a loop over users."""
        if items.shape[1] > self.cfg.max_len:
            raise ValueError(f"history of length {items.shape[1]} exceeds max_len {self.cfg.max_len}")
        if len(lengths) and int(lengths.min()) < 1:
            raise ValueError("every history needs at least one item")
        bucket = torch.clamp(2 ** torch.ceil(torch.log2(lengths.double())), max=items.shape[1]).long()
        groups = torch.unique(bucket).tolist()
        if len(groups) == 1:  # one group (always for one user): no row selection
            return self._last(items[:, :groups[0]], lengths)
        out = self.pos_emb.weight.new_empty((len(items), self.cfg.d_model))
        for t in groups:
            rows = torch.nonzero(bucket == t).squeeze(1)
            out[rows] = self._last(items[rows, :t], lengths[rows]).to(out.dtype)
        return out

    def _last(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The final state at position lengths - 1 of each row of items [B, t]."""
        t = items.shape[1]
        x = self.drop(self.embed_items(items) * (self.cfg.d_model**0.5) + self.pos_emb.weight[:t])
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = lengths - 1
        x = self.blocks[-1].forward_last(x, last) if len(self.blocks) else x[torch.arange(len(items)), last]
        return self.ln_f(x)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
        if m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
