"""The optimisation of one model: dense AdamW for the network, a row-sparse optimizer for the N-row
tables (`train.sparse`), one schedule, global clipping, and the node tables' re-centring after each step.

The Trainer drives it; `bench.scale` times it as it is, so the measured step is the product's step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sidrec.train.sparse import RowAdagrad, RowAdam, clip_grad_norm


class ModelOptimizer:
    """`step(loss)`: backward, (DDP: average the row-sparse gradients), clip, update, re-centre, schedule."""

    def __init__(self, model, cfg, lr_fn, world: int = 1):
        self.model, self.cfg, self.world = model, cfg, world
        self.sparse = model.sparse_parameters() if cfg.sparse else []
        model.set_sparse(bool(self.sparse))
        rest = [(n, p) for n, p in model.named_parameters() if all(p is not q for q in self.sparse)]
        decay = [p for n, p in rest if p.ndim >= 2 and "emb" not in n]
        no_decay = [p for n, p in rest if not (p.ndim >= 2 and "emb" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.sparse_opt = None
        if self.sparse:  # no weight decay on them, as on every embedding
            make = RowAdam if cfg.sparse_optimizer == "adam" else RowAdagrad
            self.sparse_opt = make(self.sparse, lr=cfg.sparse_lr or cfg.lr)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_fn) for o in (self.opt, self.sparse_opt) if o is not None]

    def ddp_ignored(self, model) -> list[str]:
        """Parameter names DDP must not bucket (their gradients are row-sparse: averaged by `step`)."""
        return [n for n, p in model.named_parameters() if any(p is q for q in self.sparse)]

    @property
    def lr(self) -> float:
        return self.scheds[0].get_last_lr()[0]

    def step(self, loss: torch.Tensor) -> None:
        for o in (self.opt, self.sparse_opt):
            if o is not None:
                o.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1 and self.sparse_opt is not None:
            _allreduce_sparse(self.sparse, self.world)
        if self.cfg.grad_clip and self.sparse_opt is not None:
            clip_grad_norm(list(self.model.parameters()), self.cfg.grad_clip)  # dense and row-sparse together
        elif self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        changed = self.sparse_opt.step() if self.sparse_opt is not None else {p: None for p in self.model.parameters()}
        self.model.after_step(changed)  # node tables: re-centre what changed (all of it after a dense step)
        for sched in self.scheds:
            sched.step()

    def flush(self) -> None:
        """Bring every row of the row-sparse tables up to date (what dense Adam's weights would be now):
        before validation and checkpoints, so both see the same model whatever the optimizer's laziness."""
        if self.sparse_opt is not None:
            self.model.after_step(self.sparse_opt.flush())

    def state_dict(self) -> dict:
        out = {"opt": self.opt.state_dict(), "sched": self.scheds[0].state_dict()}
        if self.sparse_opt is not None:
            out |= {"sparse_opt": self.sparse_opt.state_dict(), "sparse_sched": self.scheds[1].state_dict()}
        return out

    def load_state_dict(self, blob: dict) -> None:
        self.opt.load_state_dict(blob["opt"])
        self.scheds[0].load_state_dict(blob["sched"])
        if self.sparse_opt is not None:
            self.sparse_opt.load_state_dict(blob["sparse_opt"])
            self.scheds[1].load_state_dict(blob["sparse_sched"])


def _allreduce_sparse(params: list[torch.Tensor], world: int) -> None:
    """Average row-sparse gradients over the ranks as DDP averages dense ones: every rank gathers every
    rank's (rows, values) and sums them (the union of the rows each rank read)."""
    for p in params:
        g = p.grad.coalesce() if p.grad is not None and p.grad.is_sparse else None
        if g is None:  # dense or none: averaged like DDP would
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            p.grad = grad / world
            continue
        idx, val = g.indices()[0], g.values()
        sizes = [torch.zeros(1, dtype=torch.long, device=p.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(idx)], device=p.device))
        top = int(max(x.item() for x in sizes))
        pad_i = torch.cat([idx, idx.new_zeros(top - len(idx))])
        pad_v = torch.cat([val, val.new_zeros(top - len(idx), *val.shape[1:])])
        all_i, all_v = [torch.empty_like(pad_i) for _ in range(world)], [torch.empty_like(pad_v) for _ in range(world)]
        dist.all_gather(all_i, pad_i)
        dist.all_gather(all_v, pad_v)
        rows = torch.cat([i[: int(n.item())] for i, n in zip(all_i, sizes)])
        vals = torch.cat([v[: int(n.item())] for v, n in zip(all_v, sizes)]) / world
        p.grad = torch.sparse_coo_tensor(rows[None], vals, p.shape).coalesce()
