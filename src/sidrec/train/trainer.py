"""The training loop (nanoGPT-sized): one model, one optimizer, one schedule.

It writes through `sidrec.run.RunDir` (best weights, checkpoints, metrics) and knows nothing of
evaluation: the caller passes `validate(model) -> metrics` (see `sidrec.evaluate.validator`),
whose NDCG@10 selects the checkpoint and drives early stopping. After `fit`, the model holds the
selected (best-validation) weights.

Resume is exact: batches of epoch e are a pure function of (seed, e), the RNG state is saved
with each checkpoint, and mid-epoch checkpoints record how many batches were done and the running
sum of the epoch's losses. A resumed CPU run reaches bit-identical parameters and writes a
metrics.jsonl identical to an uninterrupted run's (wall-clock figures go to timings.jsonl).

Data-parallel training (torchrun, gloo or nccl): every rank takes an interleaved share of each
global batch and scales its weighted loss by world_size, so DDP's gradient averaging yields exactly
the single-process gradient of the global batch. The weights (`TrainBatches.weights`: per target or
per user) do not depend on how users are grouped into batches.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from sidrec.data.batching import TrainBatches
from sidrec.data.prepare import SequenceData
from sidrec.model import SeqRecModel
from sidrec.run import RunDir
from sidrec.train.config import TrainConfig, pick_device
from sidrec.train.optim import ModelOptimizer


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            p = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
            return 0.5 * (1 + math.cos(math.pi * p))
        if cfg.schedule == "inverse-sqrt":
            return math.sqrt(max(1, cfg.warmup_steps) / (step + 1))
        return 1.0

    return f


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torch.distributed. Only rank 0 writes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    def __init__(self, model: SeqRecModel, data: SequenceData, cfg: TrainConfig, run_dir: str | Path | RunDir,
                 validate: Callable[[SeqRecModel], dict] | None = None, on_epoch_end=None):
        """validate(model) -> metrics with "ndcg@10" (or "selection", higher is better, when present):
        selects the best checkpoint and stops early
        (None: no validation, the last weights are kept). on_epoch_end(model, epoch) -> dict merged
        into the epoch's log line."""
        self.on_epoch_end = on_epoch_end
        self.validate = validate
        self.cfg = cfg
        self.data = data
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir.create(run_dir, resume=True)
        self.rank, self.world = dist_info()
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)
        self.batches = TrainBatches(data, model.cfg.backbone.max_len, cfg.batch_size, cfg.seed, cfg.bucket)
        total = cfg.epochs * len(self.batches)
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        self.optim = ModelOptimizer(model, cfg, lr_lambda(cfg, total), self.world)
        self.ddp = None
        if self.world > 1:
            # DDP buckets dense gradients only: the row-sparse ones are averaged by the optimizer
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.model, self.optim.ddp_ignored(self.model))
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.state = {"epoch": 0, "batch": 0, "step": 0, "best": -1e30, "best_epoch": -1, "bad_epochs": 0,
                      "done": False, "epoch_loss_sum": 0.0, "epoch_loss_n": 0, "step_seconds": 0.0}

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        self.optim.flush()
        if self.rank == 0:
            self.run.save_state({"model": self.model.state_dict(), **self.optim.state_dict(),
                                 "rng": torch.get_rng_state(), "state": dict(self.state)})

    def load_checkpoint(self) -> bool:
        blob = self.run.load_state(self.device)
        if blob is None:
            return False
        from sidrec.io import reading

        with reading(self.run.state_path, "trainer checkpoint (does it match this model?)"):
            self.model.load_state_dict(blob["model"])
            self.optim.load_state_dict(blob)
            torch.set_rng_state(blob["rng"].cpu())
        self.state.update(blob["state"])
        return True

    def save_best(self) -> None:
        if self.rank == 0:
            self.run.save_weights(self.model)

    def log(self, rec: dict, timings: dict | None = None) -> None:
        if self.rank == 0:
            self.run.log(rec, timings)

    # -- one optimisation step --------------------------------------------------------------
    def step(self, rows: np.ndarray) -> float:
        """One global batch: a step on its weighted NLL (`TrainConfig.weighting`); returns the mean
        NLL per target over the global batch (the logged loss, whatever the weighting)."""
        mine = rows[self.rank :: self.world]
        b = self.batches.make(mine)
        n_global = self.batches.length[rows].sum()
        net = self.ddp or self.model
        net.train()
        amp = self.cfg.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            nll = net(b.items.to(self.device), b.targets.to(self.device)).float()
        w = self.batches.weights(mine, self.cfg.weighting).to(self.device)
        self.optim.step((nll * w).sum() * self.world)  # DDP averages: the global batch's weighted sum
        out = nll.detach().sum() / float(n_global)
        if self.world > 1:
            dist.all_reduce(out)
        return float(out)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        """Train until epochs, patience or max_steps run out; returns the final state. The model then
        holds the best-validation weights (the last ones when there is no validation)."""
        if not (resume and self.load_checkpoint()):
            if self.rank == 0:
                self.run.reset_logs()
        elif self.rank == 0:
            self.run.truncate_logs(self.state["step"])
        cfg, st = self.cfg, self.state
        n_batches = len(self.batches)
        total = cfg.epochs * n_batches if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * n_batches)
        bar = tqdm(total=total, initial=st["step"], disable=None if self.rank == 0 else True, unit="step",
                   dynamic_ncols=True)
        t_log, n_tgt = time.perf_counter(), 0
        while not st["done"] and st["epoch"] < cfg.epochs:
            order = self.batches.order(st["epoch"])
            t_epoch = time.perf_counter()
            for bi in range(st["batch"], n_batches):
                rows = order[bi]
                t_step = time.perf_counter()
                loss = self.step(rows)
                st["step_seconds"] = st.get("step_seconds", 0.0) + time.perf_counter() - t_step
                st["epoch_loss_sum"] += loss
                st["epoch_loss_n"] += 1
                n_tgt += int(self.batches.length[rows].sum())
                st["batch"], st["step"] = bi + 1, st["step"] + 1
                bar.update(1)
                if st["step"] % cfg.log_every == 0:
                    rate = n_tgt / max(time.perf_counter() - t_log, 1e-9)
                    bar.set_postfix(epoch=st["epoch"], loss=f"{loss:.4f}", tgt_s=f"{rate:.0f}")
                    self.log({"step": st["step"], "epoch": st["epoch"], "loss": loss,
                              "lr": self.optim.lr}, {"targets_per_s": round(rate, 1)})
                    t_log, n_tgt = time.perf_counter(), 0
                if cfg.ckpt_every_steps and st["step"] % cfg.ckpt_every_steps == 0:
                    self.save_checkpoint()
                if (cfg.max_steps and st["step"] >= cfg.max_steps) or \
                        (cfg.max_seconds and st["step_seconds"] >= cfg.max_seconds):
                    st["done"] = True
                    break
            if st["batch"] >= n_batches or (st["done"] and cfg.max_seconds):  # a time budget ends with a validation
                self._end_epoch(time.perf_counter() - t_epoch, bar)
            if st["epoch"] >= cfg.epochs:
                st["done"] = True
            self.save_checkpoint()
        bar.close()
        if self.validate is None or not self.run.has_weights():
            self.save_best()  # no validation: the last weights are the model
        else:
            self.run.load_weights(self.model, self.device)  # the selected checkpoint, not the last
        return dict(st)

    def _end_epoch(self, train_s: float, bar) -> None:
        """Validate, select, early-stop and log the epoch that just finished."""
        cfg, st = self.cfg, self.state
        ep = st["epoch"]
        n = st["epoch_loss_n"]
        rec = {"epoch": ep, "step": st["step"], "train_loss": st["epoch_loss_sum"] / n if n else None}
        timings = {"train_s": round(train_s, 2)}
        st.update(epoch=ep + 1, batch=0, epoch_loss_sum=0.0, epoch_loss_n=0)
        self.optim.flush()
        if self.validate is not None and ((ep + 1) % cfg.eval_every == 0 or st["epoch"] >= cfg.epochs):
            t_valid = time.perf_counter()
            m = self.validate(self.model)
            rec["valid"] = {k: v for k, v in m.items() if not k.startswith("_")}
            timings["valid_s"] = round(time.perf_counter() - t_valid, 2)
            score = m.get("selection", m["ndcg@10"])  # a validator may select on another score (higher: better)
            if score > st["best"]:
                st.update(best=score, best_epoch=ep, bad_epochs=0)
                self.save_best()
            else:
                st["bad_epochs"] += 1
            bar.set_postfix(epoch=ep, valid_ndcg10=f"{m['ndcg@10']:.4f}", best=f"{st['best']:.4f}")
            if st["bad_epochs"] >= cfg.patience:
                st["done"] = True
        if self.on_epoch_end is not None:
            rec.update(self.on_epoch_end(self.model, ep) or {})
        self.log(rec, timings)


def ddp_setup() -> bool:
    """Initialise torch.distributed when launched by torchrun; returns True if distributed."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return True
    return False


__all__ = ["Trainer", "ddp_setup", "dist_info", "lr_lambda"]
