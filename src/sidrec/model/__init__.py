"""Models: one shared causal backbone + an output head (FV-MLE, AR-NTP or parallel)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sidrec.model.backbone import Backbone, BackboneConfig
from sidrec.model.sampled import NegativeSampler
from sidrec.model.heads import (AutoregressiveHead, FullSoftmaxHead, Head, ItemVectors, JointHead, ParallelHead,
                                SharedTokenVectors, segment_logsumexp)
from sidrec.model.node_table import NodeTable
from sidrec.tokenize.codebook import Codebook

HEADS = ("fv", "ar", "parallel", "joint")


@dataclass(frozen=True)
class HeadKind:
    """What a head name tells the pipeline before any model is built (a built head says the same
    through the `Head` interface)."""

    semantic_ids: bool  # it scores through a codebook (FV-MLE scores item ids)
    beam: bool  # it decodes by beam search
    mix: bool  # it has a ranking weight chosen on validation after training


HEAD_KINDS = {"fv": HeadKind(False, False, False), "ar": HeadKind(True, True, False),
              "parallel": HeadKind(True, False, False), "joint": HeadKind(True, True, True)}
#: Head names a `sidrec run` config may list besides HEADS: named settings of one of them.
HEAD_VARIANTS = {"ar-unconstrained": {"head": "ar", "constrained": False, "item_vectors": False}}  # verify's
# counter-example: a token-level softmax over the whole vocabulary, no item vectors


def head_settings(name: str) -> dict:
    """The model settings a head name stands for."""
    return dict(HEAD_VARIANTS.get(name, {"head": name}))


def head_kind(model: dict) -> HeadKind:
    """The kind of head a model config section asks for."""
    return HEAD_KINDS[model["head"]]


def needs_codebook(model: dict) -> bool:
    """Whether a model config section needs semantic IDs: its head scores through them, or its
    backbone reads them."""
    return head_kind(model).semantic_ids or model["backbone"]["item_input"] != "id"


@dataclass
class ModelConfig:
    """The model; its defaults are the tuned recipe the dataset configs use."""

    head: str = "ar"  # fv | ar | parallel | joint (AR + FV on one backbone)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tied: bool = True  # output vectors = input embeddings: fv the item-ID table, ar/parallel the token tables
    constrained: bool = True  # ar: normalise over valid trie children (false: the verifier's counter-example)
    item_vectors: bool = True  # ar: node vector += mean item vector below it, plus one bias per node
    node_table: bool = True  # ar, joint: item vectors as a centred node table (training touches only read rows)
    head_hidden: int | None = None  # hidden width of the head MLPs (default 2 * d_model)
    fv_chunk: int | None = 1024  # fv: items per chunk of the streamed softmax loss (None: one pass)
    fv_loss: str = "full"  # fv: full (exact softmax) | sampled (sampled softmax with logQ correction)
    fv_sampler: str = "uniform"  # fv, sampled: uniform | popularity | in-batch negatives
    fv_negatives: int = 256  # fv, sampled: negatives per step (uniform, popularity), or per target
    fv_shared_negatives: bool = True  # fv, sampled: one set per step (false: K fresh ones for every target)
    fv_logq: bool = True  # fv, sampled: logQ-correct the negatives' logits (false: a plain softmax over them)
    joint_fv_weight: float = 1.0  # joint: loss = nll_ar + joint_fv_weight * nll_fv
    joint_mix: float = 0.5  # joint: rank by (1 - mix) log Q_ar + mix log Q_fv

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = upgrade_model_dict(d)
        bb = BackboneConfig(**d.pop("backbone", {}))
        return cls(backbone=bb, **d)


#: Model keys of earlier versions whose only remaining value is the recipe's (their other values
#: were ablations, removed from the product head; results in docs/experiments.md).
RETIRED_KEYS = {"head_film": True, "head_context": True, "head_dropout": 0.0, "root_score": "mean"}


def upgrade_model_dict(d: dict) -> dict:
    """A model section written by an earlier sidrec, in today's keys (ValueError for a removed ablation):
    item_vectors none/all with node_bias false/true become item_vectors false/true."""
    d = dict(d)
    for key, keep in RETIRED_KEYS.items():
        if key in d and d.pop(key) != keep:
            raise ValueError(f"model.{key} other than {keep!r} was an ablation that sidrec no longer has")
    legacy_bias = d.pop("node_bias", None)
    if legacy_bias is not None and not isinstance(legacy_bias, bool):
        raise ValueError(f"model.node_bias must be true or false, not {legacy_bias!r}")
    iv = d.get("item_vectors")
    if iv in ("none", "leaf", "all"):  # the old spelling; any other value is left to the schema
        if iv == "leaf" or (legacy_bias is not None and bool(legacy_bias) != (iv == "all")):
            raise ValueError(f"model.item_vectors {iv!r} with node_bias {legacy_bias!r} was an ablation that "
                             "sidrec no longer has (item vectors and node biases now come together)")
        d["item_vectors"] = iv == "all"
    elif legacy_bias is not None and bool(legacy_bias) != bool(iv if iv is not None else True):
        raise ValueError("model.node_bias is no longer a separate switch: it comes with model.item_vectors")
    return d


def uses_node_table(cfg: ModelConfig, codebook: Codebook | None) -> bool:
    """Whether the AR item vectors are a node table: asked for, and possible (one leaf per item; a
    codebook with collisions, a counter-example, keeps free item vectors)."""
    return bool(cfg.node_table and cfg.head in ("ar", "joint") and cfg.item_vectors and codebook is not None
                and codebook.trie.n_nodes(codebook.trie.depth) == codebook.n_items)


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
        self.precision = "float32"  # of the item tables: narrowed only for serving (narrow_tables_)
        codes = torch.as_tensor(codebook.codes) if codebook is not None else None
        sizes = codebook.sizes if codebook is not None else None
        table = None
        if uses_node_table(cfg, codebook) and cfg.tied and cfg.backbone.item_input != "sid":
            table = NodeTable(codebook, cfg.backbone.d_model)  # one table: the backbone's inputs, the head's vectors
        self.backbone = Backbone(cfg.backbone, n_items, codes, sizes, item_table=table)
        d = cfg.backbone.d_model
        self.head: Head = _BUILDERS[cfg.head](self.backbone, cfg, d, n_items, codebook)

    @property
    def supports_beam(self) -> bool:
        return self.head.supports_beam

    def forward(self, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.nll(items, targets)

    def nll(self, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-target NLL over all real positions: items/targets [B, T], padding = n_items."""
        h = self.backbone(items)
        mask = targets != self.n_items
        return self.head.nll(h[mask], targets[mask])

    def encode(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The state at each history's last real position [B, d] (what every head scores)."""
        return self.backbone.last_states(items, lengths)

    def _heads(self) -> list[nn.Module]:
        return [self.head.ar, self.head.fv] if isinstance(self.head, JointHead) else [self.head]

    def tables(self) -> list[nn.Module]:
        """The N-row lookup tables: the item-ID embedding or node table, an AR head's own table."""
        out = [self.backbone.item_emb] if self.backbone.item_emb is not None else []
        for h in self._heads():
            own = getattr(h, "own_nodes", None) or getattr(h, "item_emb", None)
            if isinstance(own, (nn.Embedding, NodeTable)):
                out.append(own)
        return out

    def item_vector_table(self) -> nn.Module | None:
        """The table holding the item vectors new items' content vectors are fitted to: the backbone's
        item-ID or node table (tied: also the AR head's item vectors), else an AR head's own."""
        if self.backbone.item_emb is not None:
            return self.backbone.item_emb
        own = getattr(self.head, "own_nodes", None) or getattr(self.head, "item_emb", None)
        return own if isinstance(own, nn.Module) else None

    def item_vector_key(self) -> str | None:
        """The state-dict key of that table when it is a plain embedding (None: a node table or none)."""
        if self.backbone.item_emb is not None:
            return "backbone.item_emb.weight"
        return "head.item_emb.weight" if isinstance(getattr(self.head, "item_emb", None), nn.Embedding) else None

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The parameters with one row per item or trie node (FV's own output vectors included): what
        a row-sparse optimizer updates."""
        out = []
        for t in self.tables():
            out += [t.rows, t.node_bias] if isinstance(t, NodeTable) else [t.weight]
        out += [h.weight for h in self._heads() if isinstance(h, FullSoftmaxHead) and h.table is None]
        return list({id(p): p for p in out}.values())  # a tied table once

    def set_sparse(self, on: bool) -> None:
        """Read the N-row tables with sparse lookups in training (row-sparse gradients)."""
        for t in [*self.tables(), *(h for h in self._heads() if isinstance(h, FullSoftmaxHead))]:
            t.sparse = on

    @torch.no_grad()
    def narrow_tables_(self, precision: str) -> None:
        """Serve from item tables stored in `precision` (float16, bfloat16, int8: `sidrec.model.lowp`):
        the AR scoring tables are computed in float32 and narrowed, then the node table's rows. For
        node-table models (AR-NTP and the joint model, the default); inference only from here on."""
        if precision == "float32":
            return
        nodes = [t for t in self.tables() if isinstance(t, NodeTable)]
        if not nodes:
            raise ValueError("reduced-precision tables need a node-table model (AR-NTP or joint with "
                             "model.node_table, the default)")
        device = nodes[0].rows.device
        for h in self._heads():
            if isinstance(h, AutoregressiveHead):
                h.narrow_tables_(precision, device)
        for t in nodes:
            t.narrow_(precision)
        self.precision = precision

    @torch.no_grad()
    def table_bytes(self) -> int:
        """Bytes held by the N-row tables and the AR scoring tables (what grows with the catalogue)."""
        total = sum(t.nbytes if isinstance(t, NodeTable) else t.weight.nbytes
                    for t in {id(t): t for t in self.tables()}.values())
        for h in self._heads():
            if isinstance(h, AutoregressiveHead):
                for w, c in h.eval_cache(next(self.parameters()).device):
                    total += w.nbytes + c.nbytes
        return total

    def after_step(self, changed: dict) -> None:
        """After an optimizer step: re-centre the node tables' sibling groups whose rows changed
        (`changed`: {parameter: row ids, or None for all}; a parameter missing from it did not change)."""
        for t in self.tables():
            if isinstance(t, NodeTable) and t.rows in changed:
                t.recentre_(changed[t.rows])

    def output_parameters(self) -> int:
        """Parameters of the output layer alone (FV's tied item vectors count as output)."""
        shared = sum(w.numel() for w in self.head.tok_out) if isinstance(
            getattr(self.head, "tok_out", None), SharedTokenVectors) else 0
        if isinstance(getattr(self.head, "item_emb", None), ItemVectors):
            shared += self.head.item_emb.weight.numel()
        nodes = getattr(self.head, "nodes", None)
        if nodes is not None and getattr(self.head, "own_nodes", None) is None:  # the backbone's node table
            shared += nodes.rows.numel() + nodes.node_bias.numel()
        return sum(p.numel() for p in self.head.parameters()) + shared


def _fv(backbone: Backbone, cfg: ModelConfig, d: int, n_items: int, codebook) -> FullSoftmaxHead:
    shared = backbone.item_emb if (cfg.tied and backbone.item_emb is not None) else None
    sampler = NegativeSampler(n_items, cfg.fv_sampler, cfg.fv_negatives, cfg.fv_shared_negatives,
                              cfg.fv_logq) if cfg.fv_loss == "sampled" else None
    if isinstance(shared, NodeTable):  # the joint head's FV vectors: the node table's path sums
        return FullSoftmaxHead(d, n_items, None, cfg.fv_chunk, sampler, table=shared)
    return FullSoftmaxHead(d, n_items, shared.weight if shared is not None else None, cfg.fv_chunk, sampler)


def _ar(backbone: Backbone, cfg: ModelConfig, d: int, n_items: int, codebook) -> AutoregressiveHead:
    # tied token vectors need semantic-token inputs (item_input sid or both), tied item vectors item ids
    return AutoregressiveHead(d, codebook, constrained=cfg.constrained, item_vectors=cfg.item_vectors,
                              hidden=cfg.head_hidden, shared_tokens=backbone.tok_emb if cfg.tied else None,
                              item_table=backbone.item_emb if cfg.tied else None,
                              node_table=uses_node_table(cfg, codebook))


def _parallel(backbone: Backbone, cfg: ModelConfig, d: int, n_items: int, codebook) -> ParallelHead:
    return ParallelHead(d, codebook, hidden=cfg.head_hidden, shared_tokens=backbone.tok_emb if cfg.tied else None)


def _joint(backbone: Backbone, cfg: ModelConfig, d: int, n_items: int, codebook) -> JointHead:
    return JointHead(_ar(backbone, cfg, d, n_items, codebook), _fv(backbone, cfg, d, n_items, codebook),
                     fv_weight=cfg.joint_fv_weight, mix=cfg.joint_mix)


_BUILDERS = {"fv": _fv, "ar": _ar, "parallel": _parallel, "joint": _joint}

__all__ = ["Head", "HeadKind", "HEAD_KINDS", "HEAD_VARIANTS", "head_settings", "head_kind", "needs_codebook",
           "upgrade_model_dict", "ModelConfig", "BackboneConfig", "SeqRecModel", "FullSoftmaxHead", "AutoregressiveHead",
           "JointHead",
           "ParallelHead", "segment_logsumexp", "HEADS"]
