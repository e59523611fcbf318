"""Backbone ablations against the RecTools SASRec that the published SASRec+SS row came from
(`blondered/transformer_benchmark`, RecTools 0.13), for issue #31.

    python -m bench.experiments.backbone --variant '{"init": "xavier", "scale": false}' -- \
        --dataset beauty --seeds 1 --heads fv --tag x ... (bench.quality's arguments)

Give every variant its own `--tag`: bench.quality reuses a run whose config matches, and the
variant is not part of the config. The variant replaces `sidrec.model.Backbone` (and, for `emb_dropout`, wraps the FV head's
candidate vectors) in this process, then runs `bench.quality` unchanged. Options (default: today's
sidrec backbone):

- scale: multiply item inputs by sqrt(d) (sidrec: true; RecTools: false)
- init: normal (N(0, 0.02), sidrec) | xavier (xavier-normal on every matrix, RecTools)
- emb_dropout: dropout on the item vectors, inputs and the FV head's candidate vectors alike: as
  RecTools does it, one draw over the whole item-ID table per step, read by both (a node table or
  semantic-token inputs: independent draws per read)
- layer: preln (sidrec: x + attn(LN x), x + ff(LN x), GELU, dropout on residual branches) | rectools
  (q = LN x, q + attn(q, x, x), then f = LN(.), f + drop(ff(f)), ReLU, dropout inside the ff)
- positions: forward (sidrec: position 0 is the oldest item of the window) | inverse (RecTools:
  position 0 is the most recent item, so the last input always carries the same position vector)
- padding_keys (layer rectools only): as RecTools, every real position also attends to the
  (max_len - length) left-padding positions, zero vectors whose keys and values are the projections'
  biases (no key padding mask): a "nothing" slot whose weight grows as the history shortens
- fv_bias: the FV head's per-item output bias (sidrec: true; RecTools has none: false freezes it at 0)
- beta2: Adam's second-moment decay for the dense parameters (torch: 0.999; RecTools: 0.98)
- batch_mean: weigh each target by 1 / (targets in its batch), the trainer's weighting before
  `train.weighting` existed (with length-bucketed batches it over-weighs short histories)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn

import sidrec.model as model_pkg
from sidrec.model.backbone import Backbone
from sidrec.data.batching import TrainBatches
from sidrec.model.heads import FullSoftmaxHead
from sidrec.model.node_table import NodeTable

DROPPED: dict = {}  # this step's dropped item table and the parameter it came from (emb_dropout)
OPTIONS = {"scale": True, "init": "normal", "emb_dropout": 0.0, "layer": "preln", "positions": "forward",
           "fv_bias": True, "beta2": 0.999, "padding_keys": False, "batch_mean": False}


class RecToolsBlock(nn.Module):
    """RecTools' SASRecTransformerLayer: the residual of attention starts from the normed input."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.q_ln, self.ff_ln = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.kv = nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.heads, self.p = heads, dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, n_pad: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q_ln(x)
        k, v = self.kv(x).split(d, dim=2)
        qh, kh, vh = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (self.q(q), k, v))
        if n_pad is None:
            a = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, dropout_p=self.p if self.training else 0.0)
        else:
            a = self.attend_with_padding(qh, kh, vh, n_pad)
        x = q + self.proj(a.transpose(1, 2).reshape(b, t, d))
        f = self.ff_ln(x)
        return f + self.drop(self.ff2(self.drop(F.relu(self.ff1(f)))))


    def attend_with_padding(self, q, k, v, n_pad: torch.Tensor) -> torch.Tensor:
        """RecTools pads every history on the left to max_len and masks no key: padded positions are
        zero vectors (its timeline mask), so each real position also attends to n_pad keys equal to
        the key projection's bias, with values equal to the value projection's bias. Those n_pad
        identical keys are one extra key whose logit carries + log(n_pad)."""
        b, h, t, dh = q.shape
        bk, bv = self.kv.bias.split(h * dh)
        bk, bv = bk.view(h, dh), bv.view(h, dh)
        s = q @ k.transpose(-1, -2) / dh**0.5
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        null = (q * bk[None, :, None]).sum(-1, keepdim=True) / dh**0.5 + torch.log(n_pad.float()).view(b, 1, 1, 1)
        p = F.dropout(torch.softmax(torch.cat([s, null], -1), -1), self.p, self.training)
        return p[..., :t] @ v + p[..., t:] * bv[None, :, None]


def variant_backbone(opts: dict) -> type:
    """A Backbone subclass with the variant's options."""

    class Variant(Backbone):
        def __init__(self, cfg, n_items, codes=None, sizes=None, item_table=None):
            super().__init__(cfg, n_items, codes, sizes, item_table)
            d = cfg.d_model
            if opts["layer"] == "rectools":
                self.blocks = nn.ModuleList([RecToolsBlock(d, cfg.n_heads, cfg.d_ff, cfg.dropout)
                                             for _ in range(cfg.n_layers)])
            if opts["init"] == "xavier":
                table = self.item_emb if isinstance(self.item_emb, NodeTable) else None
                skip = {id(p) for p in table.parameters()} if table is not None else set()
                for p in self.parameters():
                    if p.dim() > 1 and id(p) not in skip:
                        nn.init.xavier_normal_(p)
                if table is not None:  # item vectors xavier-normal, then centred as the table keeps them
                    with torch.no_grad():
                        table.rows.zero_()
                        table.rows[table.depth_slice(table.trie.depth)].normal_(0.0, (2 / (n_items + d)) ** 0.5)
                        table.recentre_()
                if isinstance(self.item_emb, nn.Embedding):
                    with torch.no_grad():
                        self.item_emb.weight[self.pad_id].zero_()

        def embed_items(self, items):
            p = opts["emb_dropout"]
            if p and self.training and isinstance(self.item_emb, nn.Embedding) and self.tok_emb is None:
                # RecTools: dropout on the whole table once per step; the FV head reads the same draw
                DROPPED.update(source=self.item_emb.weight, table=F.dropout(self.item_emb.weight, p))
                return F.embedding(items, DROPPED["table"], padding_idx=self.pad_id)
            x = super().embed_items(items)
            return F.dropout(x, p, self.training) if p else x

        def forward(self, items):
            t = items.shape[1]
            x = self.embed_items(items) * (self.cfg.d_model**0.5 if opts["scale"] else 1.0)
            if opts["positions"] == "inverse":  # right padding: position = steps back from the last real item
                n = (items != self.pad_id).sum(1, keepdim=True)
                pos = (n - 1 - torch.arange(t, device=items.device)).clamp(min=0)
                x = self.drop(x + self.pos_emb(pos))
            else:
                x = self.drop(x + self.pos_emb.weight[:t])
            n_pad = None
            if opts["padding_keys"]:
                n_pad = self.cfg.max_len - (items != self.pad_id).sum(1)  # 0 keys: log 0 = -inf, no weight
            for blk in self.blocks:
                x = blk(x, n_pad) if n_pad is not None else blk(x)
            return self.ln_f(x)

        def last_states(self, items, lengths):  # the whole forward pass: the variants' own inputs and blocks
            return self(items)[torch.arange(len(items), device=items.device), lengths - 1]

    return Variant


def install(opts: dict) -> None:
    """Patch this process's model builder with the variant."""
    bad = set(opts) - set(OPTIONS)
    if bad:
        raise SystemExit(f"unknown variant options {sorted(bad)} (known: {sorted(OPTIONS)})")
    full = {**OPTIONS, **opts}
    model_pkg.Backbone = variant_backbone(full)
    if not full["fv_bias"]:
        init = FullSoftmaxHead.__init__

        def no_bias(self, *a, **k):
            init(self, *a, **k)
            self.bias.requires_grad_(False)

        FullSoftmaxHead.__init__ = no_bias
    if full["beta2"] != 0.999:
        adamw = torch.optim.AdamW
        torch.optim.AdamW = lambda params, **k: adamw(params, **{**k, "betas": (0.9, full["beta2"])})
    if full["batch_mean"]:
        TrainBatches.weights = lambda self, rows, weighting: torch.full(
            (int(self.length[rows].sum()),), 1.0 / float(self.length[rows].sum()))
    p = full["emb_dropout"]
    if p:
        rows, weight = FullSoftmaxHead.item_rows, FullSoftmaxHead.item_weight

        def dropped(self) -> torch.Tensor | None:
            train = self.training and torch.is_grad_enabled()
            tied = train and self.table is None and DROPPED.get("source") is self.weight
            return DROPPED["table"] if tied else None

        def item_rows(self, i):
            t = dropped(self)
            if t is not None:
                return F.embedding(i, t)
            return F.dropout(rows(self, i), p, self.training and torch.is_grad_enabled())

        def item_weight(self):
            t = dropped(self)
            if t is not None:
                return t[: self.n_items]
            return F.dropout(weight(self), p, self.training and torch.is_grad_enabled())

        FullSoftmaxHead.item_rows, FullSoftmaxHead.item_weight = item_rows, item_weight


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="{}", help="JSON object of options (see the module doc)")
    a = ap.parse_args(argv[:cut])
    install(json.loads(a.variant))
    from bench import quality

    sys.argv = ["bench.quality", *argv[cut + 1:]]
    quality.main()


if __name__ == "__main__":
    main()
