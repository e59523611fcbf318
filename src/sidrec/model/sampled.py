"""Sampled softmax with logQ correction: FV-MLE's training loss at catalogue scale.

The exact loss needs every item's logit per target (O(N) per target). Sampled softmax scores the
target against K negatives drawn from a proposal Q (one set shared by the batch, or, with
`shared=False`, K fresh ones for every target as RecTools' SASRec draws them), each negative's logit
corrected by -log(K Q(i)) (logQ correction) and negatives equal to the target removed: the sum of
the corrected exponentials estimates the partition function without bias, so the loss estimates
the full cross-entropy, but its log makes it (and its gradient) biased for finite K, which is why
sampled softmax only approximates MLE (Bengio & Senecal 2008; Jean et al. 2015). Samplers:

- uniform: Q(i) = 1/N (the correction is the constant log(N/K): it scales the negatives' sum up
  to an estimate of the full partition function);
- popularity: Q(i) proportional to the item's count in the training data (plus one), drawn by
  inverse-CDF search, O(K log N) per step;
- in-batch: the negatives are the batch's own targets, so Q is again the popularity distribution
  (K = the number of targets in the batch); no extra item vectors are read.

Without the correction (`logq=False`, as SASRec implementations such as RecTools' train) the loss
is a plain softmax over the target and its K negatives: it no longer estimates the full
cross-entropy, and pushes the negatives down less hard.

Shared negatives cost one [n, K] product and touch K item vectors per step; per-target negatives
gather an [n, K, d] block (n·K·d memory) and reach up to n·K item vectors, so far more of the
catalogue gets a negative gradient at every step.
"""

from __future__ import annotations

import math

import torch

SAMPLERS = ("uniform", "popularity", "in-batch")


class NegativeSampler(torch.nn.Module):
    """Draws K negatives per step (shared by the batch) or per target, and knows log Q of any item."""

    def __init__(self, n_items: int, kind: str = "uniform", k: int = 256, shared: bool = True, logq: bool = True):
        super().__init__()
        if kind not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, not {kind!r}")
        self.n_items, self.kind, self.k, self.logq = n_items, kind, k, logq
        self.shared = shared or kind == "in-batch"  # in-batch negatives are the batch's: shared by definition
        # popularity: set from the training data by `set_counts`; until then uniform
        self.register_buffer("cdf", torch.zeros(0), persistent=False)
        self.register_buffer("log_q", torch.zeros(0), persistent=False)

    def set_counts(self, counts: torch.Tensor) -> None:
        """Item counts in the training targets (popularity and in-batch samplers)."""
        p = counts.double() + 1.0
        p = p / p.sum()
        self.cdf = torch.cumsum(p, 0).to(self.cdf.device)
        self.log_q = torch.log(p).float().to(self.log_q.device)

    def item_log_q(self, items: torch.Tensor) -> torch.Tensor:
        if self.kind == "uniform" or not len(self.log_q):
            return torch.full(items.shape, -math.log(self.n_items), device=items.device)
        return self.log_q[items]

    def sample(self, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(negatives, K): [K] shared by the batch, or [n, K] (K per target) when not `shared`;
        in-batch: the batch's targets."""
        if self.kind == "in-batch":
            return targets, len(targets)
        shape = (self.k,) if self.shared else (len(targets), self.k)
        if self.kind == "popularity" and len(self.cdf):
            u = torch.rand(shape, dtype=torch.float64, device=targets.device)
            return torch.searchsorted(self.cdf, u).clamp(max=self.n_items - 1), self.k
        return torch.randint(0, self.n_items, shape, device=targets.device), self.k


def sampled_softmax_nll(h: torch.Tensor, rows, b: torch.Tensor, targets: torch.Tensor,
                        sampler: NegativeSampler) -> torch.Tensor:
    """Per-target sampled-softmax loss [n] for logits <h, w_i> + b_i (see the module doc), where
    rows(items) -> [..., d] reads the item vectors of `items` (only they get a gradient), or is the
    [N, d] table itself."""
    if isinstance(rows, torch.Tensor):
        table = rows
        rows = lambda i: torch.index_select(table, 0, i.flatten()).view(*i.shape, -1)  # noqa: E731
    neg, k = sampler.sample(targets)
    pos = (h * rows(targets)).sum(-1) + torch.index_select(b, 0, targets)
    correction = math.log(k) + sampler.item_log_q(neg) if sampler.logq else 0.0
    bias = torch.index_select(b, 0, neg.flatten()).view(neg.shape) - correction
    if neg.ndim == 1:  # shared: one [n, K] product
        logits = torch.addmm(bias, h, rows(neg).T)
        hits = neg[None, :] == targets[:, None]
    else:  # per target: [n, K, d] gathered vectors, one dot product each
        wn = rows(neg.flatten()).view(*neg.shape, -1)
        logits = torch.baddbmm(bias[:, :, None], wn, h[:, :, None]).squeeze(-1)
        hits = neg == targets[:, None]
    logits = logits.masked_fill(hits, float("-inf"))  # accidental hits
    return torch.logsumexp(torch.cat([pos[:, None], logits], 1), 1) - pos
