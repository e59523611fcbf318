"""Decoding: trie-constrained beam search over semantic IDs and exact all-item ranking."""

from sidrec.decode.beam import beam_search
from sidrec.decode.exact import exact_topk
from sidrec.decode.filters import ItemFilter

__all__ = ["beam_search", "exact_topk", "ItemFilter"]
