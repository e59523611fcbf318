"""Checks of the theorem on any model + codebook (importable for users' own models).

Each check returns a dict with the measured number, its tolerance and `pass`. They work on a
head object with the sidrec head interface (nll, log_prob_all, contexts/level_scores for beam).
"""

from __future__ import annotations

import numpy as np
import torch

from sidrec.tokenize.codebook import Codebook


def _result(name: str, claim: str, value: float, tol: float, ok: bool, **extra) -> dict:
    return {"check": name, "claim": claim, "value": float(value), "tolerance": tol, "pass": bool(ok), **extra}


def check_bijection(codebook: Codebook, limit: int = 10) -> dict:
    """Claim 1's premise: every item has its own ID (no two items share one). On failure it lists up
    to `limit` groups of colliding items (internal ids)."""
    n_ids = len(np.unique(codebook.keys))
    return _result(
        "bijection", "the item -> semantic-ID map is injective", codebook.n_collisions, 0,
        codebook.n_collisions == 0, n_items=codebook.n_items, distinct_ids=int(n_ids),
        collision_rate_before_resolution=codebook.meta.get("collision_rate_before"),
        colliding_items=codebook.collision_groups(limit),
    )


#: Rounding allowance: a float identity may be off by this many machine epsilons times the magnitude
#: of the log-probabilities involved (log-sum-exp and the k-term sum lose precision in proportion).
ROUNDING_ULPS = 64


def rounding_tolerance(lp: torch.Tensor, floor: float) -> tuple[float, float]:
    """(tolerance, scale): max(floor, ROUNDING_ULPS * eps(dtype) * scale), scale = the largest finite
    |log Q| of the scored items (at least 1), so a correct head never fails on rounding alone."""
    finite = lp[torch.isfinite(lp)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return max(floor, ROUNDING_ULPS * torch.finfo(lp.dtype).eps * scale), scale


def _floor(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-5


@torch.no_grad()
def check_normalization(head, h: torch.Tensor, tol: float | None = None) -> dict:
    """Claims 1/3: sum_i Q(i|x) over all N items. Constrained: = 1; unconstrained: mass leaks.
    tol None: the rounding tolerance of h's dtype and the logits' magnitude (rounding_tolerance)."""
    lp = head.log_prob_all(h)
    if tol is None:
        tol, scale = rounding_tolerance(lp, _floor(h.dtype))
    else:
        scale = None
    mass = lp.double().exp().sum(1)
    err = (mass - 1).abs()
    dev = err.max().item()
    return _result(
        "normalization", "sum over all items of Q(i|x) = 1 for every context", dev, tol, dev <= tol,
        n_contexts=int(len(h)), mean_mass=float(mass.mean()), min_mass=float(mass.min()),
        leaked_mass_mean=float((1 - mass).clamp(min=0).mean()), dtype=str(h.dtype).replace("torch.", ""),
        worst_context=int(err.argmax()), logit_scale=scale,
    )


@torch.no_grad()
def check_loss_identity(head, h: torch.Tensor, targets: torch.Tensor, tol: float | None = None) -> dict:
    """Claim 1: the teacher-forced token loss equals -log Q(i*|x) from exhaustive all-item scoring.
    tol None: the rounding tolerance of h's dtype and the logits' magnitude (rounding_tolerance)."""
    token_loss = head.nll(h, targets)
    lp = head.log_prob_all(h)
    exhaustive = -lp.gather(1, targets[:, None]).squeeze(1)
    if tol is None:
        tol, scale = rounding_tolerance(torch.cat([lp.flatten(), token_loss.flatten()]), _floor(h.dtype))
    else:
        scale = None
    diff = (token_loss - exhaustive).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return _result(
        "loss_identity", "sum_j -log P(c*_j | c*_<j, x) = -log Q(i*|x) per example", diff.max().item(), tol,
        diff.max().item() <= tol, n_examples=int(len(targets)), mean_token_loss=float(token_loss.mean()),
        dtype=str(h.dtype).replace("torch.", ""), worst_context=int(diff.argmax()), logit_scale=scale,
    )


@torch.no_grad()
def check_beam_recall(head, h: torch.Tensor, beams=(1, 5, 10, 20), k: int = 10, min_overlap: float = 0.95) -> dict:
    """Claim 6: how much of the exact top-k beam search recovers, per beam width. A measurement of
    the decoding approximation (it depends on training and width), not an identity: it is marked
    informational, and `sidrec verify` reports it without failing on it."""
    from sidrec.decode.beam import beam_search

    exact = torch.topk(head.log_prob_all(h), k, dim=1).indices
    out = {}
    for b in beams:
        if b < k:
            r = beam_search(head, h, beam=b, k=b)
            found = (r.items[:, :, None] == exact[:, None, :]).any(1).float().sum(1) / k
        else:
            r = beam_search(head, h, beam=b, k=k)
            found = (r.items[:, :, None] == exact[:, None, :]).any(1).float().mean(1)
        out[str(b)] = float(found.mean())
    widest = out[str(max(beams))]
    return _result(
        "beam_recall", f"beam search recovers the exact top-{k} (overlap at the widest beam)", widest,
        min_overlap, widest >= min_overlap, overlap_by_beam=out, k=k, informational=True,
    )
