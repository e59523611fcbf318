"""Row-sparse optimisation of the N × d tables (item embeddings, node tables, FV-MLE's output table).

Read through sparse lookups, a table's gradient holds only the rows a step read (a COO tensor); a dense
optimizer would still visit all N rows every step (moments, update, clipping), which is what made
training cost grow with the catalogue. These optimizers touch only the rows in the gradient (a dense
gradient counts as every row, so either kind of table works):

- `RowAdam`: Adam with catch-up. A row untouched for s steps had a zero gradient in each: dense Adam
  would have decayed its moments (m <- beta1^s m, v <- beta2^s v) and moved it by the momentum of
  those steps, sum_tau lr_tau c_tau (beta1 / sqrt(beta2))^tau m / sqrt(v) (c: the bias corrections;
  eps is neglected in the skipped steps only). Both are applied when the row is next touched, from a
  per-step record of lr · c; `flush()` brings every row up to date (before validation and
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
    def _catch_up(p, st, rows: torch.Tensor, upto: int, group: dict) -> None:
        """Apply the skipped steps last+1 .. upto of `rows` (zero gradient in each)."""
        b1, b2 = group["betas"]
        last = st["last"][rows]
        todo = last < upto
        if not bool(todo.any()):
            return
        rows, last = rows[todo], last[todo]
        s = upto - last
        # the momentum's weight depends on the row only through its last step: one sum per distinct step
        lasts, inv = torch.unique(last, return_inverse=True)
        tau = torch.arange(1, CATCH_UP_WINDOW + 1, device=p.device)
        steps = lasts[:, None] + tau[None, :]
        gamma = (b1 / math.sqrt(b2)) ** tau.double()
        w = torch.where(steps <= upto, st["lrc"][steps.clamp(max=upto)] * gamma, 0.0).sum(1)
        m, v = st["exp_avg"][rows], st["exp_avg_sq"][rows]
        shift = w[inv].to(p.dtype)[:, None] * torch.where(v > 0, m / v.sqrt(), torch.zeros_like(m))
        p.data.index_add_(0, rows, -shift)
        st["exp_avg"][rows] = m * (b1 ** s.double()).to(m.dtype)[:, None]
        st["exp_avg_sq"][rows] = v * (b2 ** s.double()).to(v.dtype)[:, None]
        st["last"][rows] = upto

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
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                st["lrc"][t] = group["lr"] * math.sqrt(bc2) / bc1
                rows, g = _rows_and_values(p)
                idx = rows if rows is not None else torch.arange(p.shape[0], device=p.device)
                self._catch_up(p, st, idx, t - 1, group)
                m = st["exp_avg"][idx].mul_(b1).add_(g, alpha=1 - b1)
                v = st["exp_avg_sq"][idx].mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"][idx], st["exp_avg_sq"][idx] = m, v
                p.data.index_add_(0, idx, -(group["lr"] / bc1) * m / (v.sqrt() / math.sqrt(bc2) + group["eps"]))
                st["last"][idx] = t
                changed[p] = rows
        return changed

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
                    for lo in range(0, p.shape[0], 1 << 16):  # in row chunks: bounded memory at 10^7 rows
                        rows = torch.arange(lo, min(lo + (1 << 16), p.shape[0]), device=p.device)
                        self._catch_up(p, st, rows, int(st["step"]), group)
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
