"""Batching: bucketed training batches (little padding) and padded evaluation histories.

Real histories are usually far shorter than max_len (`sidrec data stats` prints their lengths):
padding every sequence to max_len wastes most of the compute. Training users are sorted by length (with a seeded jitter
so batches differ between epochs), cut into batches, and the batch order is shuffled; each
batch is padded only to its own longest sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sidrec.data.prepare import SequenceData


@dataclass
class Batch:
    items: torch.Tensor  # [B, T] inputs, right-padded with pad_id
    targets: torch.Tensor  # [B, T] next items, pad_id where there is no target
    n_targets: int


def pad_windows(items: np.ndarray, start: np.ndarray, length: np.ndarray, pad_id: int) -> np.ndarray:
    """[B, max(length)] windows items[start:start+length] of a flat array, right-padded with pad_id."""
    t = max(1, int(length.max()))
    idx = start[:, None] + np.arange(t)[None, :]
    valid = np.arange(t)[None, :] < length[:, None]
    return np.where(valid, items[np.minimum(idx, len(items) - 1)], pad_id).astype(np.int64)


class TrainBatches:
    """Deterministic bucketed batches of the training prefixes (everything but the last 2 items).

    Each user contributes the last `max_len` (input, next-item) pairs of its training prefix.
    """

    def __init__(self, data: SequenceData, max_len: int, batch_size: int, seed: int = 0, bucket: bool = True):
        end = data.history_end("train")
        start = np.maximum(data.offsets[:-1], end - max_len - 1)
        length = end - start - 1  # number of (input, target) pairs
        keep = length > 0
        self.users = np.flatnonzero(keep)
        self.start, self.length = start[keep], length[keep]
        self.items = data.items
        self.pad_id = data.n_items
        self.batch_size = batch_size
        self.seed = seed
        self.bucket = bucket

    @property
    def n_targets(self) -> int:
        return int(self.length.sum())

    def __len__(self) -> int:
        return -(-len(self.users) // self.batch_size)

    def order(self, epoch: int) -> list[np.ndarray]:
        """Row indices of each batch for an epoch (same seed + epoch -> same batches)."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.bucket:
            key = self.length + rng.uniform(0, 2.0, len(self.length))  # jitter mixes neighbouring lengths
            rows = np.argsort(key, kind="stable")
        else:
            rows = rng.permutation(len(self.length))
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        perm = rng.permutation(len(batches))
        return [batches[i] for i in perm]

    def weights(self, rows: np.ndarray, weighting: str) -> torch.Tensor:
        """Per-target loss weights of `rows`' targets, in the order the model returns their NLLs
        (row-major over the right-padded batch). Batch-independent by design: with length-bucketed
        batches, averaging each batch on its own would weigh a target by 1 / its batch's size, so
        short histories would count several times more than long ones. `target` gives every
        training target weight 1 / (mean targets per batch); `user` gives each user's targets
        1 / (its target count x mean users per batch), so every user counts alike (what a
        one-target-per-user test measures). Either way, the expected loss over an epoch is the
        same whichever batching is used."""
        n = self.length[rows]
        if weighting == "target":
            w = np.full(n.sum(), len(self) / self.n_targets)
        elif weighting == "user":
            w = np.repeat(len(self) / (len(self.length) * n), n)
        else:
            raise ValueError(f"weighting must be target or user, not {weighting!r}")
        return torch.from_numpy(w.astype(np.float32))

    def make(self, rows: np.ndarray) -> Batch:
        s, n = self.start[rows], self.length[rows]
        x = pad_windows(self.items, s, n, self.pad_id)
        y = pad_windows(self.items, s + 1, n, self.pad_id)
        return Batch(torch.from_numpy(x), torch.from_numpy(y), int(n.sum()))


def eval_histories(data: SequenceData, split: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each user's input history for `split`, truncated to the last max_len."""
    end = data.history_end(split)
    start = np.maximum(data.offsets[:-1], end - max_len)
    return start, end - start


def seen_items(data: SequenceData, split: str, users: np.ndarray) -> torch.Tensor:
    """[B, S] every item of each user's whole history before the `split` target, right-padded with
    n_items: what "seen" means everywhere (evaluation, the API, the server, benchmarks), however
    long the history and whatever window the model reads."""
    start = data.offsets[:-1][users]
    return torch.from_numpy(pad_windows(data.items, start, data.history_end(split)[users] - start, data.n_items))


def eval_batches(data: SequenceData, split: str, max_len: int, batch_size: int, users: np.ndarray | None = None):
    """Yield (user_ids, items [B, T], lengths [B]) sorted by history length (little padding)."""
    start, length = eval_histories(data, split, max_len)
    users = np.arange(data.n_users) if users is None else np.asarray(users)
    users = users[np.argsort(length[users], kind="stable")]
    for i in range(0, len(users), batch_size):
        u = users[i : i + batch_size]
        x = pad_windows(data.items, start[u], length[u], data.n_items)
        yield u, torch.from_numpy(x), torch.from_numpy(length[u].astype(np.int64))
