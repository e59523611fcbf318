"""Row-sparse optimisation of the N × d tables (item embeddings, node tables, FV-MLE's output table).

Read through sparse lookups, a table's gradient holds only the rows a step read (a COO tensor); a dense
optimizer would still visit all N rows every step (moments, update, clipping), which is what made
training cost grow with the catalogue. These optimizers touch only the rows in the gradient (a dense
gradient counts as every row, so either kind of table works):

- `RowAdam`: Adam with catch-up. A row untouched for s steps had a zero gradient in each: dense Adam
  would have decayed its moments (m <- beta1^s m, v <- beta2^s v) and moved it by the momentum of
  those steps, sum_tau lr_tau c_tau (beta1 / sqrt(beta2))^tau m / sqrt(v) (c: the bias corrections;
  eps is neglected in the skipped steps only). Both are applied when the row is next touched, from a
  per-step record of lr · c; a step that touches most of a small table updates it densely instead; `flush()` brings every row up to date (before validation and
  checkpoints), so the weights then equal dense Adam's on a table whose gradients do not depend on
  the rows' values (a test) — lazy moments without the catch-up (plain SparseAdam) are known to cost
  quality. Memory: two moments per value.
- `RowAdagrad`: row-wise Adagrad (TorchRec / FBGEMM's default for large tables): one accumulator of the
  mean squared gradient per row; no momentum, so a skipped step changes nothing and lazy is exact.
  Memory: one scalar per row, the option at 10^7+ rows.

`clip_grad_norm` clips dense and row-sparse gradients together by their global norm.
"""

from __future__ import annotations

import math

import torch

#: skipped steps whose momentum a catch-up applies; beyond it (beta1/sqrt(beta2))^tau < 1e-11
CATCH_UP_WINDOW = 256
#: a step touching at least 1/DENSE_SHARE of a table's rows updates all of them in one dense pass (the same
#: arithmetic: untouched rows take a zero gradient, as in dense Adam), cheaper than gathering and scattering
DENSE_SHARE = 4
#: rows updated per pass: a block's temporaries (a few MB) are reused from the heap and stay in cache,
#: where one pass over 10^5+ rows pays fresh pages for every temporary (3x slower on a 2-core CPU)
ROW_BLOCK = 4096


def _rows_and_values(p: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(row ids, their gradient rows) of a parameter's gradient; rows None: a dense gradient (all)."""
    g = p.grad
    if g.is_sparse:
        g = g.coalesce()
        return g.indices()[0], g.values()
    return None, g


class RowAdam(torch.optim.Optimizer):
    """Adam over the rows each step touches, with catch-up of the steps a row skipped (module doc)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    def _state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.long)
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
            st["last"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)  # step of its last update
            st["lrc"] = torch.zeros(1, dtype=torch.float64, device=p.device)  # lr_t * c_t per step t (t >= 1)
        return st

    @staticmethod
    def _skipped(st: dict, last: torch.Tensor, upto: int, group: dict, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """For rows last updated at `last`, the steps last+1 .. upto with a zero gradient: (s, w) with s
        the number of them and w = sum_tau lr_tau c_tau (beta1 / sqrt(beta2))^tau, the weight of m / sqrt(v)
        in the distance they moved. w depends on a row only through `last`: one sum per distinct step."""
        b1, b2 = group["betas"]
        lasts, inv = torch.unique(last, return_inverse=True)
        tau = torch.arange(1, CATCH_UP_WINDOW + 1, device=last.device)
        steps = lasts[:, None] + tau[None, :]
        gamma = (b1 / math.sqrt(b2)) ** tau.double()
        w = torch.where(steps <= upto, st["lrc"][steps.clamp(max=upto)] * gamma, 0.0).sum(1)
        return (upto - last), w[inv].to(dtype)[:, None]

    def _update(self, p, st, idx: torch.Tensor, g: torch.Tensor | None, t: int, group: dict) -> None:
        """Rows `idx`: catch up the steps they skipped, then (with a gradient g) one Adam step at t, in
        blocks of ROW_BLOCK rows (rows are distinct: blocks are independent)."""
        for lo in range(0, len(idx), ROW_BLOCK):
            self._update_block(p, st, idx[lo:lo + ROW_BLOCK], None if g is None else g[lo:lo + ROW_BLOCK], t, group)

    def _update_block(self, p, st, idx: torch.Tensor, g: torch.Tensor | None, t: int, group: dict) -> None:
        """One block of `_update`: one gather and one scatter of the moments, one index_add into the table."""
        b1, b2 = group["betas"]
        upto = t - 1 if g is not None else t
        last = st["last"][idx]
        s, w = self._skipped(st, last, upto, group, p.dtype)
        m, v = st["exp_avg"][idx], st["exp_avg_sq"][idx]
        # v = 0 only where m = 0 (a row never touched): the tiny offset keeps 0 * rsqrt finite
        move = m * (w * torch.rsqrt(v + torch.finfo(v.dtype).tiny))  # the skipped steps' momentum
        if g is not None:  # decay over the skipped steps and this one, then this step's gradient
            m = torch.addcmul(g * (1 - b1), m, (b1 ** (s + 1).double()).to(m.dtype)[:, None])
            v = torch.addcmul(g * g * (1 - b2), v, (b2 ** (s + 1).double()).to(v.dtype)[:, None])
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            move.addcdiv_(m, v.sqrt().div_(math.sqrt(bc2)).add_(group["eps"]), value=group["lr"] / bc1)
        else:
            m = m * (b1 ** s.double()).to(m.dtype)[:, None]
            v = v * (b2 ** s.double()).to(v.dtype)[:, None]
        st["exp_avg"].index_copy_(0, idx, m)
        st["exp_avg_sq"].index_copy_(0, idx, v)
        st["last"].index_fill_(0, idx, t if g is not None else upto)
        p.data.index_add_(0, idx, -move)

    @torch.no_grad()
    def step(self, closure=None) -> dict:
        """One Adam step over the touched rows; returns {param: changed row ids, or None for all}."""
        changed = {}
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._state(p)
                st["step"] += 1
                t = int(st["step"])
                if len(st["lrc"]) <= t:  # grow the per-step record by doubling
                    st["lrc"] = torch.cat([st["lrc"], st["lrc"].new_zeros(len(st["lrc"]))])
                st["lrc"][t] = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
                rows, g = _rows_and_values(p)
                if rows is not None and len(rows) * DENSE_SHARE < p.shape[0]:
                    self._update(p, st, rows, g, t, group)
                else:  # most rows touched: one dense pass (untouched rows: a zero gradient) is cheaper
                    self._dense(p, st, rows, g, t, group)
                    rows = None
                changed[p] = rows
        return changed

    def _dense(self, p, st, rows: torch.Tensor | None, g: torch.Tensor, t: int, group: dict) -> None:
        """Adam on every row (rows None: g is dense), after catching up the rows left behind."""
        b1, b2 = group["betas"]
        behind = torch.nonzero(st["last"] < t - 1).squeeze(1)
        if len(behind):
            self._update(p, st, behind, None, t - 1, group)
        if rows is not None:
            g = torch.zeros_like(p).index_add_(0, rows, g)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        p.data.addcdiv_(m, v.sqrt().div_(math.sqrt(bc2)).add_(group["eps"]), value=-group["lr"] / bc1)
        st["last"].fill_(t)

    _EXACT = ("last", "lrc")  # integer steps and the float64 record: kept out of load_state_dict's casts

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["state"] = {i: dict(st) for i, st in sd["state"].items()}  # copies: the live state stays whole
        sd["exact"] = {i: {k: st.pop(k) for k in self._EXACT if k in st} for i, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        exact = sd.pop("exact", {})
        super().load_state_dict(sd)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, values in exact.items():
            p = params[int(i)]
            for k, v in values.items():
                self.state[p][k] = v.to(p.device)

    @torch.no_grad()
    def flush(self) -> dict:
        """Bring every row up to the current step (what dense Adam's weights are now); {param: None}."""
        out = {}
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st:
                    self._update(p, st, torch.arange(p.shape[0], device=p.device), None, int(st["step"]), group)
                    out[p] = None
        return out


class RowAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad: acc_r += mean_d g_rd^2; row r -= lr g_r / (sqrt(acc_r) + eps) (module doc)."""

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-8, initial_accumulator: float = 0.0):
        super().__init__(params, {"lr": lr, "eps": eps, "initial_accumulator": initial_accumulator})

    @torch.no_grad()
    def step(self, closure=None) -> dict:
        changed = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["sum"] = torch.full((p.shape[0],), group["initial_accumulator"], dtype=p.dtype, device=p.device)
                rows, g = _rows_and_values(p)
                idx = rows if rows is not None else torch.arange(p.shape[0], device=p.device)
                acc = st["sum"][idx] + g.pow(2).mean(1)
                st["sum"][idx] = acc
                p.data.index_add_(0, idx, -group["lr"] * g / (acc.sqrt() + group["eps"])[:, None])
                changed[p] = rows
        return changed

    def flush(self) -> dict:
        return {}  # nothing is ever pending


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip dense and row-sparse gradients together to a global L2 norm of `max_norm` (as torch's
    clip_grad_norm_: scale by max_norm / (norm + 1e-6) when above); returns the norm before clipping."""
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # duplicate rows summed first: the norm is the gradient's
            grads.append(p.grad.values())
        else:
            grads.append(p.grad)
    if not grads:
        return 0.0
    norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)
    return float(norm)
