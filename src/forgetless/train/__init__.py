"""Train: LoRA, DoRA or full fine-tuning on a masked table, with weight diagnostics."""

from forgetless.train.stage import TrainConfig, run_train

__all__ = ["TrainConfig", "run_train"]
