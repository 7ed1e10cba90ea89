"""forgetless: fine-tune language models on a new task without forgetting the old ones.

Implements Selective Token Masking (STM; Wu et al., NeurIPS 2025, arXiv 2501.14315): score each
ground-truth response token by its perplexity under the base model, drop the high-perplexity
tokens from the loss, and train on the rest.
"""

__version__ = "0.1.0"

# The few names a user's own training loop needs, imported on first use (the CLI stays fast).
_EXPORTS = {
    "stm_labels": "forgetless.core.masking",
    "MaskedLossMixin": "forgetless.train.loss",
    "MaskedBatchCollator": "forgetless.train.collate",
    "build_sft_table": "forgetless.train.collate",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'forgetless' has no attribute {name!r}")
