"""A trained model extended to items added after training (catalogue versions, `sidrec.run.catalog`).

What the model holds per item and was never trained for a new one:

- its item vector (the tied item-ID table: the backbone's input row and, in the AR head, the
  vector averaged into every trie node above it): by default the trained vector of its nearest
  trained item by content (`content_map`), stored with the weights' stamp; else, or with other weights,
  the *prefix mean*: the mean trained vector of the items that share its longest ID prefix — its
  siblings under the same k-1 tokens, else k-2, ... else all items;
- a trie node that did not exist (its leaf, and any new prefix) gets the mean trained bias of its
  siblings the same way.

Prefix means are derived from the trained weights at load time (never stored), so they always
match the weights. FV-MLE has no content path (a new item has no output vector); the parallel head
needs only the codes.
"""

from __future__ import annotations

import numpy as np
import torch

from sidrec.model import SeqRecModel
from sidrec.model.node_table import NodeTable
from sidrec.tokenize.codebook import Codebook, mixed_radix


def content_map(x_trained: np.ndarray, vectors: np.ndarray, neighbours: int = 1, chunk: int = 1024):
    """x -> vectors: a new item takes the trained vector of its nearest trained item by content
    (cosine similarity in the tokenizer's embedding space; with neighbours > 1, their similarity-
    weighted mean). Catalogues are full of near-twins (another size, colour or edition of a product)
    whose trained vector carries who buys such an item; on Beauty's cold start one neighbour ranked
    cold items best, a ridge regression from content to vectors worst (it shrinks every vector)."""
    xt = torch.from_numpy(_unit(x_trained))
    v = torch.as_tensor(np.asarray(vectors, dtype=np.float32))

    def apply(new: np.ndarray) -> np.ndarray:
        xn = torch.from_numpy(_unit(new))
        out = []
        for s in range(0, len(xn), chunk):  # [chunk, N] similarities at a time
            sim, idx = torch.topk(xn[s:s + chunk] @ xt.T, min(neighbours, len(xt)), dim=1)
            w = torch.softmax(sim * 20.0, dim=1)  # sharp: the nearest twin dominates
            out.append((w[..., None] * v[idx]).sum(1))
        return torch.cat(out).numpy() if out else np.zeros((0, v.shape[1]), np.float32)

    return apply


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)




def prefix_mean(base_codes: np.ndarray, values: torch.Tensor, query_codes: np.ndarray, sizes: list[int]) -> torch.Tensor:
    """For each query code row: the mean of `values` over the base rows that share its longest prefix
    (all its tokens but the last first, then shorter prefixes, down to the mean of all rows)."""
    depth = query_codes.shape[1]
    out = values.new_zeros((len(query_codes), *values.shape[1:]))
    done = np.zeros(len(query_codes), dtype=bool)
    for length in range(depth - 1, -1, -1):
        bk = mixed_radix(base_codes[:, :length], sizes[:length])
        qk = mixed_radix(query_codes[:, :length], sizes[:length])
        uniq, inv = np.unique(bk, return_inverse=True)
        sums = values.new_zeros((len(uniq), *values.shape[1:])).index_add_(0, torch.as_tensor(inv), values)
        counts = torch.as_tensor(np.bincount(inv, minlength=len(uniq)), dtype=values.dtype)
        pos = np.searchsorted(uniq, qk).clip(max=len(uniq) - 1)
        hit = (uniq[pos] == qk) & ~done
        idx = torch.as_tensor(pos[hit])
        out[torch.as_tensor(np.flatnonzero(hit))] = sums[idx] / counts[idx].reshape(-1, *[1] * (values.dim() - 1))
        done |= hit
    return out


def extend_model(model, base: Codebook, ext: Codebook, vectors: np.ndarray | None = None):
    """A model over the extended catalogue: trained weights for trained items and nodes; for what is
    new, the stored content vectors of the added items where given (`vectors` [n - n0, d], NaN: none),
    else prefix means (see the module doc). Same configuration, n_items = ext.n_items."""
    n0, n = base.n_items, ext.n_items
    device = next(model.parameters()).device
    new = SeqRecModel(model.cfg, n, ext)
    old = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {}
    for key, target in new.state_dict().items():
        value = old[key]
        if value.shape == target.shape:
            state[key] = value
        elif key in ("backbone.item_emb.weight", "head.item_emb.weight"):
            rows = value[:n0]
            added = prefix_mean(base.codes, rows, ext.codes[n0:], ext.sizes)
            if vectors is not None and key == model.item_vector_key():
                given = torch.as_tensor(vectors, dtype=added.dtype)
                added = torch.where(torch.isnan(given), added, given)
            pad = value[n0:]  # the padding row of the input table (empty for the head's own table)
            state[key] = torch.cat([rows, added, pad])
        elif key.endswith(".rows"):  # a node table: new nodes get zero rows (prefix means), see NodeTable
            owner = key.rsplit(".", 1)[0]
            state[key] = model.get_submodule(owner).extended_rows(new.get_submodule(owner), base.trie.keys)
        elif key.endswith(".node_bias") and target.ndim == 2:  # a node table's biases, depth by depth
            state[key] = _table_biases(model.get_submodule(key.rsplit(".", 1)[0]), target, base, ext)
        elif key.startswith("head.node_bias."):
            state[key] = _node_values(int(key.rsplit(".", 1)[1]) + 1, value, base, ext)
        else:
            raise RuntimeError(f"cannot extend parameter {key} from {tuple(value.shape)} to {tuple(target.shape)}")
    new.load_state_dict(state)
    table = new.item_vector_table()
    if vectors is not None and table is not None and not isinstance(table, torch.nn.Embedding):
        given = ~np.isnan(vectors).any(1)  # a node table: the content vectors through the new leaves
        table.set_items_(torch.as_tensor(np.flatnonzero(given) + n0), torch.as_tensor(vectors[given]))
    return new.to(device).eval()


def _table_biases(table, target: torch.Tensor, base: Codebook, ext: Codebook) -> torch.Tensor:
    """A node table's biases on the extended trie (`_node_values` at every depth; the root's kept)."""
    bias = table.node_bias.detach().cpu()[:, 0]
    out = target.new_zeros(target.shape)
    out[0, 0] = bias[0]
    new_off = NodeTable.offsets(ext.trie)
    for depth in range(1, ext.trie.depth + 1):
        out[new_off[depth]:new_off[depth + 1], 0] = _node_values(depth, bias[table.depth_slice(depth)], base, ext)
    return out


def item_table(model) -> torch.Tensor | None:
    """The trained item vectors [N, d] content vectors are fitted to (`SeqRecModel.item_vector_table`;
    None: the model has none); a node table's are its path sums."""
    table = model.item_vector_table()
    if table is None:
        return None
    with torch.no_grad():
        return table.weight[: model.n_items].detach().cpu()


def _node_values(depth: int, value: torch.Tensor, base: Codebook, ext: Codebook) -> torch.Tensor:
    """Depth-`depth` node biases on the extended trie: trained nodes keep theirs, new nodes the prefix mean."""
    bt, et = base.trie, ext.trie
    pos = np.searchsorted(bt.keys[depth], et.keys[depth]).clip(max=len(bt.keys[depth]) - 1)
    known = bt.keys[depth][pos] == et.keys[depth]
    out = value.new_empty(et.n_nodes(depth))
    out[torch.as_tensor(np.flatnonzero(known))] = value[torch.as_tensor(pos[known])]
    if (~known).any():
        base_codes = base.codes[bt.first_item[depth], :depth]
        new_codes = ext.codes[et.first_item[depth][~known], :depth]
        out[torch.as_tensor(np.flatnonzero(~known))] = prefix_mean(base_codes, value, new_codes, ext.sizes)
    return out
