"""Training: AdamW + warmup/cosine, clipping, early stopping, atomic checkpoints, resume, DDP."""

from sidrec.train.trainer import TrainConfig, Trainer, load_model

__all__ = ["TrainConfig", "Trainer", "load_model"]
