"""Synthetic data with a known ground truth P*(i | history).

Items have a two-level latent hierarchy (category -> subcategory -> item) and synthetic titles
that name their category and subcategory, so text-based tokenizers have structure to find.
Users follow a Markov process over latent item vectors with popularity:

    m(h)        = sum_t decay^(L-1-t) z[h_t] / sum_t decay^(L-1-t)     (EMA of the history)
    P*(i | h)   = softmax_i( beta * <m(h), z_i> + bias_i )              (empty history: m = 0)

P* is computable exactly for any prefix, so later stages can measure KL to the truth and the
Bayes-optimal Recall/NDCG (the expected metric of ranking by P* itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sidrec import io
from sidrec.data.prepare import SequenceData
from sidrec.errors import UserError

_CATEGORY_WORDS = [
    "kitchen", "garden", "audio", "outdoor", "beauty", "toys", "office", "pet", "baby", "sports",
    "camera", "grocery", "tools", "music", "travel", "jewelry", "lighting", "books", "gaming",
    "bath", "crafts", "health", "auto", "fitness", "video", "bedding", "phone", "watch", "shoes",
    "luggage", "coffee", "tea",
]
_SUB_WORDS = [
    "deluxe", "compact", "classic", "pro", "mini", "organic", "wireless", "portable", "vintage",
    "smart", "eco", "travel", "premium", "basic", "heavy duty", "kids", "ultra", "natural",
    "modern", "rustic", "sport", "silent", "turbo", "soft", "crystal", "nano", "family", "studio",
    "urban", "alpine", "marine", "solar",
]
_NOUNS = [
    "kit", "set", "pack", "bundle", "case", "stand", "holder", "cleaner", "brush", "lamp", "speaker",
    "cream", "bottle", "bag", "mat", "cover", "charger", "filter", "spray", "tray",
]
_ADJ = ["red", "blue", "black", "white", "green", "large", "small", "round", "square", "slim", "bold", "light"]


@dataclass
class SynthWorld:
    """Parameters of the generating process; `log_prob` gives P* for any batch of histories."""

    latent: np.ndarray  # [N, d] unit vectors
    bias: np.ndarray  # [N] popularity logits
    category: np.ndarray  # [N] top-level category
    subcategory: np.ndarray  # [N] global subcategory index
    beta: float
    decay: float

    @property
    def n_items(self) -> int:
        return len(self.bias)

    def summary(self, histories: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """EMA of latent vectors over each history. histories: [B, L] right-padded."""
        z = torch.from_numpy(self.latent)
        L = histories.shape[1]
        pos = torch.arange(L)
        lens = torch.from_numpy(np.asarray(lengths, dtype=np.int64))
        w = self.decay ** (lens[:, None] - 1 - pos[None, :]).clamp(min=0).double()
        w = (w * (pos[None, :] < lens[:, None])).float()
        idx = torch.from_numpy(np.maximum(histories, 0).astype(np.int64))
        m = (w[..., None] * z[idx]).sum(1)
        return m / w.sum(1, keepdim=True).clamp(min=1e-12)

    def logits(self, histories: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        m = self.summary(histories, lengths)
        return self.beta * m @ torch.from_numpy(self.latent).T + torch.from_numpy(self.bias)

    def log_prob(self, histories: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """log P*(. | history) for every item: [B, N] (rows sum to 1 in probability space)."""
        return torch.log_softmax(self.logits(histories, lengths).double(), dim=-1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "latent": self.latent, "bias": self.bias, "category": self.category,
            "subcategory": self.subcategory, "beta": np.float64(self.beta), "decay": np.float64(self.decay),
        }

    @classmethod
    def load(cls, path: str | Path) -> "SynthWorld":
        a = io.load_npz(path, required=("latent", "bias", "category", "subcategory", "beta", "decay"))
        with io.reading(path, "synthetic world"):
            n = len(a["latent"])
            if a["latent"].ndim != 2 or not all(len(a[k]) == n for k in ("bias", "category", "subcategory")):
                raise ValueError("the world's arrays disagree on the number of items")
            return cls(a["latent"], a["bias"], a["category"], a["subcategory"], float(a["beta"]), float(a["decay"]))


def make_world(
    n_items: int, dim: int = 16, n_categories: int = 8, n_sub: int = 8, beta: float = 6.0,
    decay: float = 0.6, pop_std: float = 1.0, seed: int = 0,
) -> SynthWorld:
    """Items around subcategory centres around category centres (a 2-level hierarchy)."""
    rng = np.random.default_rng(seed)
    cat_c = rng.normal(size=(n_categories, dim))
    sub_c = cat_c[:, None, :] + 0.6 * rng.normal(size=(n_categories, n_sub, dim))
    cat = rng.integers(0, n_categories, n_items)
    sub_local = rng.integers(0, n_sub, n_items)
    z = sub_c[cat, sub_local] + 0.35 * rng.normal(size=(n_items, dim))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    bias = pop_std * rng.normal(size=n_items)
    return SynthWorld(z.astype(np.float32), bias.astype(np.float32), cat, cat * n_sub + sub_local, beta, decay)


def item_titles(world: SynthWorld, seed: int = 0) -> pd.DataFrame:
    """Synthetic item text: a title naming brand, style and noun, plus a category path."""
    rng = np.random.default_rng(seed + 1)
    n = world.n_items
    cw = np.array(_CATEGORY_WORDS)[world.category % len(_CATEGORY_WORDS)]
    sw = np.array(_SUB_WORDS)[world.subcategory % len(_SUB_WORDS)]
    noun = np.array(_NOUNS)[rng.integers(0, len(_NOUNS), n)]
    adj = np.array(_ADJ)[rng.integers(0, len(_ADJ), n)]
    model = rng.integers(100, 999, n).astype(str)
    title = np.char.add(np.char.add(np.char.add(np.char.add(sw, " "), cw), " "), noun)
    title = np.char.add(np.char.add(np.char.add(np.char.add(title, " "), adj), " model "), model)
    categories = np.char.add(np.char.add(cw, ", "), np.char.add(sw, " " + "line"))
    return pd.DataFrame({"item": np.arange(n).astype(str), "title": title, "categories": categories})


def sample_sequences(
    world: SynthWorld, n_users: int, min_len: int = 5, mean_len: float = 10.0, max_len: int = 50,
    seed: int = 0, chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw user sequences from P* (Gumbel-max, deterministic per seed). Returns CSR arrays."""
    chunk = chunk or max(1, min(4096, 2**24 // world.n_items))  # ~64 MB of logits at a time
    rng = np.random.default_rng(seed + 2)
    extra = rng.geometric(1.0 / max(1.0, mean_len - min_len + 1), n_users) - 1
    lens = np.minimum(min_len + extra, max_len)
    z = torch.from_numpy(world.latent)
    bias = torch.from_numpy(world.bias)
    seqs = np.zeros((n_users, lens.max()), dtype=np.int32)
    gen = torch.Generator().manual_seed(seed + 3)
    for s in range(0, n_users, chunk):
        e = min(n_users, s + chunk)
        acc = torch.zeros(e - s, z.shape[1])
        wsum = torch.zeros(e - s, 1)
        for t in range(int(lens[s:e].max())):
            m = acc / wsum.clamp(min=1e-12)
            logits = world.beta * m @ z.T + bias
            u = torch.rand(logits.shape, generator=gen).clamp_(1e-10, 1.0)
            nxt = torch.argmax(logits - torch.log(-torch.log(u)), dim=1)
            seqs[s:e, t] = nxt.numpy()
            acc = world.decay * acc + z[nxt]
            wsum = world.decay * wsum + 1.0
    mask = np.arange(seqs.shape[1])[None, :] < lens[:, None]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return offsets, seqs[mask].astype(np.int32)


def make_synthetic(
    n_items: int = 2000, n_users: int = 5000, dim: int = 16, seed: int = 0, **world_kw
) -> tuple[SequenceData, SynthWorld]:
    """Generate a complete dataset (all N items in the catalog) plus its generating world."""
    if n_items < 2 or n_users < 1:
        raise UserError("synthetic data needs at least 2 items and 1 user")
    world = make_world(n_items, dim=dim, seed=seed, **world_kw)
    offsets, items = sample_sequences(world, n_users, seed=seed)
    meta = {
        "source": f"synthetic(n_items={n_items}, n_users={n_users}, dim={dim}, seed={seed})",
        "has_time": False, "kcore": 0, "dedup": "none", "max_seq_len": None,
        "tie_break": "generation order", "synthetic": True, "seed": seed,
        "beta": world.beta, "decay": world.decay,
    }
    data = SequenceData(
        offsets=offsets, items=items, user_ids=np.arange(n_users).astype(str),
        item_table=item_titles(world, seed), meta=meta,
    )
    return data, world


def save_synthetic(data: SequenceData, world: SynthWorld, out: str | Path, marker: dict | None = None) -> None:
    data.save(out, extra=lambda tmp: io.save_npz(tmp / "world.npz", **world.to_arrays()), marker=marker)


def load_world(data_dir: str | Path) -> SynthWorld:
    p = Path(data_dir) / "world.npz"
    if not p.exists():
        raise UserError("not a synthetic data directory (no world.npz)", str(data_dir))
    return SynthWorld.load(p)


def padded_histories(data: SequenceData, split: str, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [U, L] histories (-1 = pad) for a split, keeping the most recent max_len."""
    end = data.history_end(split)
    start = data.offsets[:-1]
    if max_len is not None:
        start = np.maximum(start, end - max_len)
    lens = end - start
    L = max(1, int(lens.max()))
    idx = start[:, None] + np.arange(L)[None, :]
    valid = np.arange(L)[None, :] < lens[:, None]
    h = np.where(valid, data.items[np.minimum(idx, len(data.items) - 1)], -1)
    return h.astype(np.int64), lens


def bayes_optimal(world: SynthWorld, data: SequenceData, split: str = "test", ks=(1, 5, 10, 20),
                  chunk: int | None = None) -> dict:
    """Expected metrics of the Bayes-optimal ranker (ranking by P* itself) on a split.

    With the target drawn from P*, E[Recall@K] is the mass of the top-K items and E[NDCG@K] is
    sum_r p_(r) / log2(r + 2). Also reported: the NLL of the realised targets under P* and the
    entropy of P* (the irreducible loss any model faces).
    """
    chunk = chunk or max(1, min(2048, 2**24 // world.n_items))
    hist, lens = padded_histories(data, split)
    targets = torch.from_numpy(data.targets(split).astype(np.int64))
    kmax = max(ks)
    disc = 1.0 / torch.log2(torch.arange(kmax, dtype=torch.float64) + 2)
    sums = {f"recall@{k}": 0.0 for k in ks} | {f"ndcg@{k}": 0.0 for k in ks}
    nll = ent = 0.0
    for s in range(0, len(lens), chunk):
        lp = world.log_prob(hist[s : s + chunk], lens[s : s + chunk])
        p = lp.exp()
        top = torch.topk(p, min(kmax, p.shape[1]), dim=1).values
        for k in ks:
            sums[f"recall@{k}"] += top[:, :k].sum().item()
            sums[f"ndcg@{k}"] += (top[:, :k] * disc[: top[:, :k].shape[1]]).sum().item()
        nll -= lp.gather(1, targets[s : s + chunk, None]).sum().item()
        ent -= (p * lp).sum().item()
    n = len(lens)
    out = {k: v / n for k, v in sums.items()}
    out["nll"] = nll / n
    out["entropy"] = ent / n
    out["n_users"] = n
    return out
