"""forgetless: fine-tune language models on a new task without forgetting the old ones.

Implements Selective Token Masking (STM; Wu et al., NeurIPS 2025, arXiv 2501.14315): score each
ground-truth response token by its perplexity under the base model, drop the high-perplexity
tokens from the loss, and train on the rest.
"""

__version__ = "0.1.0"

# The names a user's own training loop needs (docs/own-trainer.md), imported on first use: `import forgetless` stays
# light and the CLI fast.
_EXPORTS = {
    "build_sft_table": "forgetless.api",
    "score_dataset": "forgetless.api",
    "mask_dataset": "forgetless.api",
    "stm_labels": "forgetless.core.masking",
    "weights_for_policy": "forgetless.core.masking",
    "MaskedLossMixin": "forgetless.train.loss",
    "MaskedBatchCollator": "forgetless.train.collate",
    "FlatBatchCollator": "forgetless.train.collate",
    "packing_isolates": "forgetless.core.packing",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'forgetless' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
