"""Training the memory: SFT data, the loss, the Ray Train loop, defaults, post-training checks, the stage."""

from memo.training.stage import build_memory, train

__all__ = ["build_memory", "train"]
