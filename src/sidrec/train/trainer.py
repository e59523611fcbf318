"""The training loop (nanoGPT-sized): one model, one optimizer, one schedule.

Run directory: config.yaml (resolved), codebook/, model.safetensors (best on validation),
trainer_state.pt (the latest checkpoint: model, optimizer, schedule, RNG, counters),
metrics.jsonl (one JSON line per log step and per evaluation).

Resume is exact: batches of epoch e are a pure function of (seed, e), the RNG state is saved
with each checkpoint, and mid-epoch checkpoints record how many batches were done. A resumed
CPU run reaches bit-identical parameters to an uninterrupted one.

Data-parallel training (torchrun, gloo or nccl): every rank takes an interleaved share of each
global batch and scales its summed loss by world_size / global_targets, so DDP's gradient
averaging yields exactly the single-process gradient of the global batch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from tqdm import tqdm

from sidrec import io
from sidrec.data.batching import TrainBatches
from sidrec.data.prepare import SequenceData
from sidrec.model import ModelConfig, SeqRecModel
from sidrec.tokenize.codebook import Codebook


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256  # sequences per (global) batch
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | inverse-sqrt | constant
    grad_clip: float = 1.0
    patience: int = 10  # epochs without validation NDCG@10 improvement before stopping
    eval_every: int = 1  # epochs
    eval_batch_size: int = 1024
    eval_users: int = 0  # 0: all users; else a fixed random subset for faster validation
    exclude_seen: bool = False  # validation protocol (the pipeline sets it from eval.exclude_seen)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA
    ckpt_every_steps: int = 0  # 0: checkpoint at epoch ends only
    max_steps: int = 0  # 0: no limit (tests and benchmarks stop early)
    log_every: int = 50
    bucket: bool = True  # length-bucketed batches (False: random batches padded to their max)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    def __init__(self, model: SeqRecModel, data: SequenceData, cfg: TrainConfig, run_dir: str | Path,
                 on_epoch_end=None):
        self.on_epoch_end = on_epoch_end  # optional callback(model, epoch) -> dict merged into the log
        self.cfg = cfg
        self.data = data
        self.run = Path(run_dir)
        self.rank, self.world = _dist_info()
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)
        self.ddp = None
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.batches = TrainBatches(data, model.cfg.backbone.max_len, cfg.batch_size, cfg.seed, cfg.bucket)
        total = cfg.epochs * len(self.batches)
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, total))
        self.state = {"epoch": 0, "batch": 0, "step": 0, "best": -1.0, "best_epoch": -1, "bad_epochs": 0,
                      "done": False}
        self.eval_users = None
        if cfg.eval_users and cfg.eval_users < data.n_users:
            rng = np.random.default_rng(cfg.seed)
            self.eval_users = np.sort(rng.choice(data.n_users, cfg.eval_users, replace=False))

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.run / "trainer_state.pt"

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        blob = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "rng": torch.get_rng_state(), "state": dict(self.state)}
        with io.atomic_path(self.ckpt_path) as tmp:
            torch.save(blob, tmp)

    def load_checkpoint(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        blob = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(blob["model"])
        self.opt.load_state_dict(blob["opt"])
        self.sched.load_state_dict(blob["sched"])
        torch.set_rng_state(blob["rng"].cpu())
        self.state.update(blob["state"])
        return True

    def save_best(self) -> None:
        if self.rank == 0:
            with io.atomic_path(self.run / "model.safetensors") as tmp:
                st_save_model(self.model, str(tmp))  # handles the tied FV item vectors

    def log(self, rec: dict) -> None:
        if self.rank == 0:
            io.append_jsonl(self.run / "metrics.jsonl", rec)

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone)."""
        p = self.run / "metrics.jsonl"
        if self.rank != 0 or not p.exists():
            return
        import json

        keep = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        io.write_text(p, "".join(ln + "\n" for ln in keep))

    # -- one optimisation step --------------------------------------------------------------
    def step(self, rows: np.ndarray) -> float:
        """One global batch; returns the mean NLL per target over the global batch."""
        mine = rows[self.rank :: self.world]
        b = self.batches.make(mine)
        n_global = self.batches.length[rows].sum()
        net = self.ddp or self.model
        net.train()
        amp = self.cfg.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            nll = net(b.items.to(self.device), b.targets.to(self.device))
        loss = nll.float().sum() * (self.world / float(n_global))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        out = loss.detach() / self.world
        if self.world > 1:
            dist.all_reduce(out)
        return float(out)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        """Train until epochs, patience or max_steps run out; returns the final state."""
        from sidrec.evaluate import evaluate_split

        self.run.mkdir(parents=True, exist_ok=True)
        if resume and self.load_checkpoint():
            self._truncate_log(self.state["step"])
        elif (self.run / "metrics.jsonl").exists() and self.rank == 0:
            (self.run / "metrics.jsonl").unlink()
        cfg, st = self.cfg, self.state
        n_batches = len(self.batches)
        total = cfg.epochs * n_batches if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * n_batches)
        bar = tqdm(total=total, initial=st["step"], disable=None if self.rank == 0 else True, unit="step",
                   dynamic_ncols=True)
        t_log, n_tgt = time.perf_counter(), 0
        while not st["done"] and st["epoch"] < cfg.epochs:
            order = self.batches.order(st["epoch"])
            losses, t_epoch = [], time.perf_counter()
            for bi in range(st["batch"], n_batches):
                rows = order[bi]
                loss = self.step(rows)
                losses.append(loss)
                n_tgt += int(self.batches.length[rows].sum())
                st["batch"], st["step"] = bi + 1, st["step"] + 1
                bar.update(1)
                if st["step"] % cfg.log_every == 0:
                    dt = time.perf_counter() - t_log
                    rate = n_tgt / max(dt, 1e-9)
                    bar.set_postfix(epoch=st["epoch"], loss=f"{loss:.4f}", tgt_s=f"{rate:.0f}")
                    self.log({"step": st["step"], "epoch": st["epoch"], "loss": loss,
                              "lr": self.sched.get_last_lr()[0], "targets_per_s": round(rate, 1)})
                    t_log, n_tgt = time.perf_counter(), 0
                if cfg.ckpt_every_steps and st["step"] % cfg.ckpt_every_steps == 0:
                    self.save_checkpoint()
                if cfg.max_steps and st["step"] >= cfg.max_steps:
                    st["done"] = True
                    break
            epoch_done = st["batch"] >= n_batches
            if epoch_done:
                ep = st["epoch"]
                st["epoch"], st["batch"] = ep + 1, 0
                rec = {"epoch": ep, "step": st["step"], "train_loss": float(np.mean(losses)) if losses else None,
                       "train_s": round(time.perf_counter() - t_epoch, 2)}
                if (ep + 1) % cfg.eval_every == 0 or st["epoch"] >= cfg.epochs:
                    t_valid = time.perf_counter()
                    m = evaluate_split(self.model, self.data, "valid", batch_size=cfg.eval_batch_size,
                                       device=self.device, users=self.eval_users,
                                       exclude_seen=cfg.exclude_seen)
                    rec["valid"] = {k: v for k, v in m.items() if not k.startswith("_")}
                    rec["valid_s"] = round(time.perf_counter() - t_valid, 2)
                    if m["ndcg@10"] > st["best"]:
                        st.update(best=m["ndcg@10"], best_epoch=ep, bad_epochs=0)
                        self.save_best()
                    else:
                        st["bad_epochs"] += 1
                    bar.set_postfix(epoch=ep, valid_ndcg10=f"{m['ndcg@10']:.4f}", best=f"{st['best']:.4f}")
                    if st["bad_epochs"] >= cfg.patience:
                        st["done"] = True
                if self.on_epoch_end is not None:
                    rec.update(self.on_epoch_end(self.model, ep) or {})
                self.log(rec)
            if st["epoch"] >= cfg.epochs:
                st["done"] = True
            self.save_checkpoint()
        bar.close()
        if not (self.run / "model.safetensors").exists():
            self.save_best()
        return dict(st)


def save_run_config(run: Path, config: dict) -> None:
    import yaml

    io.write_text(run / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def load_model(run: str | Path, device: str | torch.device = "cpu") -> tuple[SeqRecModel, dict]:
    """Rebuild a trained model from its run directory (config.yaml + codebook/ + model.safetensors)."""
    import yaml

    from sidrec.errors import UserError

    run = Path(run)
    if not (run / "model.safetensors").exists() or not (run / "config.yaml").exists():
        raise UserError("not a trained run directory (needs config.yaml and model.safetensors)", str(run))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    codebook = Codebook.load(run / "codebook") if (run / "codebook" / "codebook.npz").exists() else None
    mcfg = ModelConfig.from_dict(cfg["model"])
    model = SeqRecModel(mcfg, int(cfg["n_items"]), codebook)
    st_load_model(model, str(run / "model.safetensors"), device=str(device))
    return model.to(device).eval(), cfg


def ddp_setup() -> bool:
    """Initialise torch.distributed when launched by torchrun; returns True if distributed."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return True
    return False


__all__ = ["TrainConfig", "Trainer", "load_model", "save_run_config", "ddp_setup", "asdict"]
