"""Eval: generative task scores (MBPP, GSM8K, MATH, ARC, text-to-SQL, your own) with per-item records."""

# The stage (and the model code it loads) is imported on first use: a task module (forgetless.eval.tasks.gsm8k)
# imports this package first and must stay free of torch.
_EXPORTS = {"EvalConfig": "forgetless.eval.stage", "run_eval": "forgetless.eval.stage"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'forgetless.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
