"""Eval: generative task scores (MBPP, GSM8K, MATH, ARC, text-to-SQL, your own) with per-item records."""

from forgetless.eval.stage import EvalConfig, run_eval

__all__ = ["EvalConfig", "run_eval"]
