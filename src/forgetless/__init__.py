"""forgetless: fine-tune language models on a new task without forgetting the old ones.

Implements Selective Token Masking (STM; Wu et al., NeurIPS 2025, arXiv 2501.14315): score each
ground-truth response token by its perplexity under the base model, drop the high-perplexity
tokens from the loss, and train on the rest.
"""

__version__ = "0.1.0"
