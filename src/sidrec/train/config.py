"""Training settings and the device rule: what the config file, the trainer and evaluation share,
kept apart from the trainer so that reading a config does not import the training loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sidrec.errors import UserError


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256  # sequences per (global) batch
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    schedule: str = "cosine"  # cosine | inverse-sqrt | constant
    grad_clip: float = 1.0
    patience: int = 8  # epochs without validation NDCG@10 improvement before stopping
    eval_every: int = 1  # epochs
    eval_batch_size: int = 1024
    eval_users: int = 0  # 0: all users; else a fixed random subset for faster validation
    exclude_seen: bool = False  # validation protocol (the pipeline sets it from eval.exclude_seen)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA
    ckpt_every_steps: int = 0  # 0: checkpoint at epoch ends only
    max_steps: int = 0  # 0: no limit (tests and benchmarks stop early)
    max_seconds: float = 0  # 0: no limit; else stop once the optimisation steps took this long (a time budget)
    log_every: int = 50
    bucket: bool = True  # length-bucketed batches (False: random batches padded to their max)
    weighting: str = "target"  # the objective's weights: target (every target alike) | user (every user alike)
    sparse: bool = True  # the N-row tables: sparse lookups and a row-sparse optimizer (sidrec.train.sparse)
    sparse_optimizer: str = "adam"  # adam (with catch-up of skipped steps) | adagrad (row-wise)
    sparse_lr: float = 0  # the row-sparse optimizer's learning rate (0: lr)


def pick_device(name: str | torch.device) -> torch.device:
    """One device rule for training, evaluation and recommendation: auto = the GPU when there is one."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: no CUDA GPU is available (use auto or cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (auto, cpu, cuda)") from None
