"""Training: AdamW + warmup/cosine, clipping, early stopping, atomic checkpoints, resume, DDP."""

from sidrec.train.config import TrainConfig, pick_device


def __getattr__(name: str):
    if name == "Trainer":  # imported on first use: the config layer reads TrainConfig without the loop
        from sidrec.train.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'sidrec.train' has no attribute {name!r}")


__all__ = ["TrainConfig", "Trainer", "pick_device"]
