"""Models: one shared causal backbone + an output head (FV-MLE, AR-NTP or parallel)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sidrec.model.backbone import Backbone, BackboneConfig
from sidrec.model.heads import (AutoregressiveHead, FullSoftmaxHead, ItemVectors, ParallelHead, SharedTokenVectors,
                                segment_logsumexp)
from sidrec.tokenize.codebook import Codebook

HEADS = ("fv", "ar", "parallel")


@dataclass
class ModelConfig:
    head: str = "ar"  # fv | ar | parallel
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tied: bool = True  # output vectors = input embeddings: fv the item-ID table, ar/parallel the token tables
    constrained: bool = True  # ar: normalise over valid trie children
    item_vectors: str = "none"  # ar: none | leaf | all: node vector += mean item vector below (tied: input table)
    node_bias: bool = False  # ar: a bias per trie node, started at log(#items below it)
    head_hidden: int | None = None  # hidden width of the head MLPs (default 2 * d_model)
    head_dropout: float = 0.0  # ar/parallel: dropout on the head MLPs' hidden units
    head_film: bool = True  # ar: the prefix modulates the context (FiLM); false: no modulation
    head_context: bool = True  # ar: a context MLP per level; false: every level scores the backbone state
    root_score: str = "mean"  # ar, item_vectors all: node item part <q, mean e_i> | lse: log-sum-exp of its
    # items' scores at the first level (O(N)) | lse-all: at every level above the leaves (O(kN)); ablations
    fv_chunk: int | None = 1024  # fv: items per chunk of the streamed softmax loss (None: one pass)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        bb = BackboneConfig(**d.pop("backbone", {}))
        return cls(backbone=bb, **d)


class SeqRecModel(nn.Module):
    """Backbone + head. `nll(items, targets)` trains every position; `encode(items)` gives the
    state at the last real position of each history, which the heads score."""

    def __init__(self, cfg: ModelConfig, n_items: int, codebook: Codebook | None = None):
        super().__init__()
        if cfg.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {cfg.head!r}")
        if cfg.head != "fv" and codebook is None:
            raise ValueError(f"the {cfg.head} head needs a codebook")
        self.cfg = cfg
        self.n_items = n_items
        codes = torch.as_tensor(codebook.codes) if codebook is not None else None
        sizes = codebook.sizes if codebook is not None else None
        self.backbone = Backbone(cfg.backbone, n_items, codes, sizes)
        d = cfg.backbone.d_model
        if cfg.head == "fv":
            tied = self.backbone.item_emb.weight if (cfg.tied and self.backbone.item_emb is not None) else None
            self.head = FullSoftmaxHead(d, n_items, tied, cfg.fv_chunk)
        else:  # tied token vectors need semantic-token inputs (item_input sid or both)
            shared = self.backbone.tok_emb if cfg.tied else None
            if cfg.head == "ar":
                table = self.backbone.item_emb if cfg.tied else None
                self.head = AutoregressiveHead(d, codebook, cfg.constrained, cfg.head_hidden, shared,
                                               cfg.item_vectors, table, cfg.node_bias, cfg.head_dropout,
                                               cfg.head_film, cfg.head_context, cfg.root_score)
            else:
                self.head = ParallelHead(d, codebook, cfg.head_hidden, shared, cfg.head_dropout)

    def forward(self, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.nll(items, targets)

    def nll(self, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-target NLL over all real positions: items/targets [B, T], padding = n_items."""
        h = self.backbone(items)
        mask = targets != self.n_items
        return self.head.nll(h[mask], targets[mask])

    def encode(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.backbone(items)
        return h[torch.arange(len(items), device=h.device), lengths - 1]

    def output_parameters(self) -> int:
        """Parameters of the output layer alone (FV's tied item vectors count as output)."""
        shared = sum(w.numel() for w in self.head.tok_out) if isinstance(
            getattr(self.head, "tok_out", None), SharedTokenVectors) else 0
        if isinstance(getattr(self.head, "item_emb", None), ItemVectors):
            shared += self.head.item_emb.weight.numel()
        return sum(p.numel() for p in self.head.parameters()) + shared


__all__ = ["ModelConfig", "BackboneConfig", "SeqRecModel", "FullSoftmaxHead", "AutoregressiveHead",
           "ParallelHead", "segment_logsumexp", "HEADS"]
