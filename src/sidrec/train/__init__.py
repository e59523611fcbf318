"""Training: AdamW + warmup/cosine, clipping, early stopping, atomic checkpoints, resume, DDP."""

from sidrec.train.trainer import TrainConfig, Trainer, pick_device

__all__ = ["TrainConfig", "Trainer", "pick_device"]
