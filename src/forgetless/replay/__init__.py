"""Replay: mix the base model's own answers to general (non-target) prompts into the fine-tuning set."""

from forgetless.replay.stage import ReplayConfig, run_replay

__all__ = ["ReplayConfig", "run_replay"]
