"""Score: per-token NLL of each ground-truth response under the base model (``scores.parquet``)."""

from forgetless.score.stage import ScoreConfig, run_score

__all__ = ["ScoreConfig", "run_score"]
