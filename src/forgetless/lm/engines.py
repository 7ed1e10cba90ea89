"""The engine a stage samples and scores with, picked by its ``backend`` setting.

Both engines make the same calls on token ids built by :mod:`forgetless.lm.templates`: ``sample(prompts, k,
settings, seed)`` (``[prompt][sample]`` :class:`~forgetless.lm.decode.Sampled` answers), ``score(encoded)``
(per-token NLL, NaN off the response, aligned as in :mod:`forgetless.core.logits`) and ``close()``.
:class:`HfEngine` runs a loaded Hugging Face model (lm/decode.py, score/stage.py);
:class:`~forgetless.lm.vllm_backend.VllmEngine` runs vLLM.
"""

from __future__ import annotations

import numpy as np

from forgetless.core.errors import ConfigError
from forgetless.lm.decode import DecodingSettings, Sampled, sample_batch
from forgetless.lm.scoring import SharedPrefix, score_encoded, use_padding_free
from forgetless.lm.templates import Encoded
from forgetless.lm.vllm_backend import resolve_backend


class HfEngine:
    """Sampling and scoring with a Hugging Face model in memory."""

    def __init__(self, model, tokenizer, batch_tokens: int = 8192, padding_free: bool = False):
        self.model, self.tokenizer, self.batch_tokens = model, tokenizer, batch_tokens
        # Decided once here: the score stage calls score() once per batch, and the check and its warning
        # need not repeat.
        self.padding_free = use_padding_free(model, padding_free)
        self.prefix = SharedPrefix()  # the prompt prefix the examples share, computed once for all score() calls

    def sample(self, prompts: list[list[int]], k: int, settings: DecodingSettings, seed: int) -> list[list[Sampled]]:
        return sample_batch(self.model, self.tokenizer, prompts, k, settings, seed)  # seeded per sample

    def score(self, encoded: list[Encoded]) -> list[np.ndarray]:
        return score_encoded(self.model, encoded, self.tokenizer.pad_token_id, self.batch_tokens, shared=False,
                            padding_free=self.padding_free, prefix=self.prefix)

    def close(self) -> None:
        """Nothing to free: the model goes when the engine does."""


def open_engine(config):
    """The engine of a generate or score config: vLLM or HF by ``config.backend``, on ``config.model``. Under a
    launcher the processes share the work on the HF path (vLLM spreads one model over the GPUs itself)."""
    from forgetless.lm import distributed

    if distributed.launched() and config.backend == "vllm":
        raise ConfigError("backend=vllm runs in one process (vLLM spreads a model over GPUs itself): "
                         "drop the launcher, or use backend=hf to share the work among the processes")
    if resolve_backend(config.backend) == "vllm" and not distributed.launched():
        from forgetless.lm.vllm_backend import VllmEngine

        return VllmEngine.from_config(config)
    from forgetless.lm.modeling import load_adapter, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(config.model, config.revision, config.dtype, config.device,
                                                attn_implementation=getattr(config, "attn_implementation", None))
    adapter = getattr(config, "adapter", None)
    if adapter:  # score a tuned model (DPF's second scoring): base + adapter
        model = load_adapter(model, adapter, config.model)
    return HfEngine(model, tokenizer, config.batch_tokens, getattr(config, "padding_free", False))
