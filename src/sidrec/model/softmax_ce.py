"""Exact full-vocabulary softmax cross-entropy without the [n, N] round trips of the textbook version.

`softmax_ce(h, W, b, y)` returns per-row -log softmax(h W^T + b)[y]. Two modes:

- chunk_size=None: one [n, N] buffer. Forward turns the logits into probabilities in place and
  keeps them; backward turns them into the logit gradient in place (softmax - onehot) and runs
  the two GEMMs. Fewer passes over the big matrix than log_softmax + nll_loss.
- chunk_size=C: the memory-efficient variant (for catalogs of 10^6+ items). Forward streams item
  chunks with an online logsumexp; backward recomputes each chunk's logits. Peak extra memory is
  O(n * C) instead of O(n * N), for one more GEMM.
"""

from __future__ import annotations

import torch


class _SoftmaxCE(torch.autograd.Function):
    """GEMMs in the inputs' dtype (bf16 under autocast), softmax statistics in at least float32."""

    @staticmethod
    def forward(ctx, h, w, b, y, chunk_size):
        n_items = w.shape[0]
        acc = torch.promote_types(h.dtype, torch.float32)
        rows = torch.arange(len(y), device=h.device)
        if chunk_size is None or chunk_size >= n_items:
            z = torch.addmm(b, h, w.t()).to(acc)
            target = z[rows, y].clone()
            lse = torch.logsumexp(z, 1)
            z.sub_(lse[:, None]).exp_()  # probabilities, kept for backward
            ctx.save_for_backward(h, w, z, y)
            ctx.chunk_size = None
            return lse - target
        lse = torch.full((len(y),), float("-inf"), dtype=acc, device=h.device)
        target = torch.empty(len(y), dtype=acc, device=h.device)
        for s in range(0, n_items, chunk_size):
            z = torch.addmm(b[s : s + chunk_size], h, w[s : s + chunk_size].t()).to(acc)
            lse = torch.logaddexp(lse, torch.logsumexp(z, 1))
            inside = (y >= s) & (y < s + chunk_size)
            target[inside] = z[rows[inside], y[inside] - s]
        ctx.save_for_backward(h, w, b, y, lse)
        ctx.chunk_size = chunk_size
        return lse - target

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.chunk_size is None:
            h, w, p, y = ctx.saved_tensors
            rows = torch.arange(len(y), device=h.device)
            p[rows, y] -= 1.0
            p.mul_(grad_out[:, None])
            g = p.to(w.dtype)
            return g @ w, g.t() @ h, p.sum(0).to(w.dtype), None, None
        h, w, b, y, lse = ctx.saved_tensors
        rows = torch.arange(len(y), device=h.device)
        gh = torch.zeros(h.shape, dtype=lse.dtype, device=h.device)  # summed over chunks: keep it precise
        gw = torch.empty_like(w)
        gb = torch.empty_like(b)
        c = ctx.chunk_size
        for s in range(0, w.shape[0], c):
            p = torch.addmm(b[s : s + c], h, w[s : s + c].t()).to(lse.dtype).sub_(lse[:, None]).exp_()
            inside = (y >= s) & (y < s + c)
            p[rows[inside], y[inside] - s] -= 1.0
            p.mul_(grad_out[:, None])
            g = p.to(w.dtype)
            gh += g @ w[s : s + c]
            gw[s : s + c] = g.t() @ h
            gb[s : s + c] = p.sum(0)
        return gh.to(h.dtype), gw, gb, None, None


def softmax_ce(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
               chunk_size: int | None = None) -> torch.Tensor:
    """Per-row exact cross-entropy of softmax(h @ w.T + b) against targets y (see module doc).

    Under autocast the GEMMs run in the autocast dtype and the logsumexp in float32 (a custom
    Function sees autocast's mixed dtypes otherwise)."""
    dev = h.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else \
        torch.promote_types(torch.promote_types(h.dtype, w.dtype), b.dtype)
    h, w, b = h.to(dt), w.to(dt), b.to(dt)
    with torch.autocast(dev, enabled=False):
        return _SoftmaxCE.apply(h, w, b, y, chunk_size)
