"""vLLM for generation and scoring, used only where it is installed and a CUDA GPU is present.

``backend`` (eval, generate and score configs) is ``hf`` (lm/decode.py, score/stage.py), ``vllm``, or ``auto``:
vllm when the package is installed and ``torch.cuda.is_available()``, else hf. vLLM is imported on first use
only, so forgetless installs and runs without it; ``backend=vllm`` where it cannot run fails in one line.

Prompts reach vLLM as token ids (``TokensPrompt``) built by :mod:`forgetless.lm.templates`, never as text:
vLLM would tokenise the rendered template again and put the tokenizer's BOS before the template's own (two
``<|begin_of_text|>`` on Llama-3). Both engines see the same tokens, and the new tokens are cut at the same stop
tokens (:func:`forgetless.lm.decode.cut_at_stop`) and decoded by the same tokenizer.

Scoring reads ``prompt_logprobs``: ``RequestOutput.prompt_logprobs[i]`` is None for ``i = 0`` and otherwise maps
token ids (the prompt's own ``input_ids[i]`` always among them) to ``log p(token | tokens < i)``. So
``nll[i] = -prompt_logprobs[i][input_ids[i]]`` is stored at position ``i``, the alignment of
:mod:`forgetless.core.logits`, NaN where the token is not a response token.

Adapters: a PEFT LoRA adapter is served through ``LoRARequest``; a DoRA adapter is refused (vLLM cannot load
DoRA's magnitude vectors): use backend=hf, or merge it into the model first.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from forgetless.core.errors import ConfigError, ForgetlessError
from forgetless.lm.decode import DecodingSettings, Sampled, cut_at_stop, stop_token_ids
from forgetless.lm.templates import Encoded, encode_prompt

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "vllm")
# LoRA ranks vLLM allocates slots for; an adapter's rank is rounded up to the next one.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class BackendError(ForgetlessError, RuntimeError):
    """The vLLM backend cannot run here, or cannot serve this adapter; the message says why."""


def check_backend_settings(backend: str, tensor_parallel_size: int, gpu_memory_utilization: float,
                           max_model_len: int | None) -> None:
    """The checks of the backend fields every stage config carries (called from their ``__post_init__``)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if tensor_parallel_size < 1:
        raise ConfigError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if max_model_len is not None and max_model_len < 2:
        raise ConfigError(f"max_model_len must be >= 2 (or null: the model's own), got {max_model_len}")


def _missing_for_vllm() -> str | None:
    """What backend=vllm lacks here, or None."""
    if "vllm" not in sys.modules and importlib.util.find_spec("vllm") is None:
        return "the vllm package, which is not installed (pip install vllm on a CUDA machine)"
    if not torch.cuda.is_available():
        return "a CUDA GPU, and torch.cuda.is_available() is false"
    return None


def vllm_available() -> bool:
    """vLLM is installed and a CUDA device exists."""
    return _missing_for_vllm() is None


def resolve_backend(backend: str) -> str:
    """``hf`` or ``vllm``: the engine a stage runs on. ``vllm`` requested where it cannot run raises
    :class:`BackendError`."""
    if backend == "hf":
        return "hf"
    missing = _missing_for_vllm()
    if backend == "auto":
        logger.info("backend=auto: %s", f"hf (vLLM needs {missing})" if missing else "vllm")
        return "hf" if missing else "vllm"
    if missing:
        raise BackendError(f"backend=vllm needs {missing}; use backend=hf or auto")
    return "vllm"


def lora_rank(adapter: str) -> int:
    """The rank of the PEFT LoRA adapter in directory ``adapter``; DoRA and other adapter kinds are refused."""
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise BackendError(f"adapter {adapter}: no adapter_config.json there (not a PEFT adapter directory)")
    config = json.loads(path.read_text())
    if config.get("use_dora"):
        raise BackendError(f"adapter {adapter} is a DoRA adapter (use_dora), which vLLM cannot load: "
                           "use backend=hf, or merge the adapter into the model and evaluate the merged model")
    if config.get("peft_type", "LORA") != "LORA":
        raise BackendError(f"adapter {adapter} is a {config['peft_type']} adapter; vLLM serves LoRA adapters "
                           "only: use backend=hf")
    return int(config.get("r", 16))


def max_lora_rank(rank: int) -> int:
    """The smallest LoRA slot rank of vLLM that holds ``rank``.

    >>> max_lora_rank(16), max_lora_rank(17)
    (16, 32)
    """
    fits = [r for r in LORA_RANKS if r >= rank]
    if not fits:
        raise BackendError(f"LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]}): use backend=hf")
    return fits[0]


def prompt_nll(input_ids: list[int], prompt_logprobs: list, response_mask: list[int]) -> np.ndarray:
    """Per-token NLL (float32, ``len(input_ids)``) from vLLM's ``prompt_logprobs`` of the same prompt.

    Position ``i`` holds ``-log p(input_ids[i] | input_ids[:i])`` where ``response_mask[i]`` is set, NaN elsewhere
    and at position 0 (no context; vLLM gives None there). Entries are vLLM ``Logprob`` objects or plain floats.

    >>> prompt_nll([5, 6, 7], [None, {6: -0.5, 1: -0.2}, {7: -2.0}], [0, 1, 1]).tolist()
    [nan, 0.5, 2.0]
    """
    if len(prompt_logprobs) != len(input_ids):
        raise ValueError(f"vLLM returned {len(prompt_logprobs)} prompt logprobs for a {len(input_ids)}-token prompt")
    nll = np.full(len(input_ids), np.nan, dtype=np.float32)
    for i in range(1, len(input_ids)):
        if response_mask[i]:
            entry = prompt_logprobs[i][input_ids[i]]
            nll[i] = -getattr(entry, "logprob", entry)
    return nll


def request_seed(seed: int, index: int) -> int:
    """A 48-bit seed for prompt ``index`` of a batch seeded ``seed``. vLLM gives the ``n`` samples of a request the
    seeds ``s, s + 1, ...``; hashed seeds keep those runs apart across prompts and batches."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:6], "big")


class VllmEngine:
    """One vLLM ``LLM`` (a model, optionally a LoRA adapter) and the calls the stages make of it.

    ``generate_answers`` is eval's GenerateFn, ``sample`` and ``score`` are what the generate and score stages call
    (the HF path: :func:`forgetless.lm.decode.sample_batch`, :func:`forgetless.lm.scoring.score_encoded`).
    """

    def __init__(self, model: str, tokenizer, revision: str | None = None, adapter: str | None = None,
                 dtype: str = "auto", tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, seed: int = 0, show_progress: bool = True):
        lora = {}
        if adapter:
            lora = {"enable_lora": True, "max_loras": 1, "max_lora_rank": max_lora_rank(lora_rank(adapter))}
        from vllm import LLM

        self.tokenizer, self.stops, self.show_progress = tokenizer, stop_token_ids(tokenizer), show_progress
        self.lora_request = None
        if adapter:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", 1, str(Path(adapter).resolve()))
        extra = {"revision": revision} if revision else {}
        self.llm = LLM(model=model, dtype=vllm_dtype(dtype), seed=seed, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, **extra, **lora)

    @classmethod
    def from_config(cls, cfg) -> "VllmEngine":
        """The engine of a stage config (``model``, ``revision``, ``dtype``, the backend fields, ``adapter`` if any)."""
        from forgetless.lm.modeling import load_tokenizer, resolve_model_path

        adapter = getattr(cfg, "adapter", None)
        if adapter:
            lora_rank(adapter)  # refuse DoRA before vLLM starts (a minute on a large model)
        return cls(resolve_model_path(cfg.model), load_tokenizer(cfg.model, cfg.revision), cfg.revision, adapter,
                   cfg.dtype, cfg.tensor_parallel_size, cfg.gpu_memory_utilization, cfg.max_model_len,
                   show_progress=getattr(cfg, "progress", True))

    def _run(self, prompts: list[list[int]], params) -> list:
        if not prompts:  # nothing to ask (e.g. no answer left to score); vLLM is not called with an empty batch
            return []
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                 lora_request=self.lora_request, use_tqdm=self.show_progress)

    def _params(self, settings: DecodingSettings, n: int = 1, seed: int | None = None):
        from vllm import SamplingParams

        sampling = ({"temperature": 0.0} if settings.greedy
                    else {"temperature": settings.temperature, "top_p": settings.top_p})
        return SamplingParams(n=n, max_tokens=settings.max_new_tokens, stop_token_ids=self.stops, seed=seed,
                              detokenize=False, **sampling)

    def _cut(self, completion) -> tuple[list[int], bool]:
        """(new ids before the first stop token, whether the answer ended on its own rather than at max_tokens)."""
        kept, found = cut_at_stop(list(completion.token_ids), set(self.stops))
        return kept, found or completion.finish_reason == "stop"

    def decode_ids(self, prompts: list[list[int]], settings: DecodingSettings) -> list[tuple[list[int], bool]]:
        """One answer per prompt (token ids), in input order: ``(new ids, finished)``; all prompts in one call."""
        params = self._params(settings) if settings.greedy else \
            [self._params(settings, seed=request_seed(settings.seed, p)) for p in range(len(prompts))]
        return [self._cut(out.outputs[0]) for out in self._run(prompts, params)]

    def generate_answers(self, prompts: list[list[dict[str, str]]], settings: DecodingSettings) -> list[Sampled]:
        """One answer per chat prompt, decoded as :func:`forgetless.lm.decode.generate_answers` decodes, finished
        when it ended at a stop token (``finish_reason`` "stop") rather than at the budget ("length"); eval's
        GenerateFn."""
        ids = [encode_prompt(self.tokenizer, messages) for messages in prompts]
        return [Sampled(self.tokenizer.decode(new, skip_special_tokens=True), finished, len(new))
                for new, finished in self.decode_ids(ids, settings)]

    def generate(self, prompts: list[list[dict[str, str]]], settings: DecodingSettings) -> list[str]:
        """One completion per chat prompt: the texts of :meth:`generate_answers`."""
        return [a.text for a in self.generate_answers(prompts, settings)]

    def sample(self, prompts: list[list[int]], k: int, settings: DecodingSettings, seed: int) -> list[list[Sampled]]:
        """``k`` samples per prompt (token ids), ``[prompt][sample]``: one request per prompt with ``n=k``."""
        if settings.greedy:
            raise ValueError("sample samples: give settings with greedy=False")
        params = [self._params(settings, n=k, seed=request_seed(seed, p)) for p in range(len(prompts))]
        return [[Sampled(self.tokenizer.decode(ids, skip_special_tokens=True), finished, len(ids))
                 for ids, finished in map(self._cut, out.outputs)] for out in self._run(prompts, params)]

    def score(self, encoded: list[Encoded]) -> list[np.ndarray]:
        """Per-token NLL (NaN off the response) of each encoded example, as
        :func:`forgetless.lm.scoring.score_encoded`."""
        from vllm import SamplingParams

        # temperature 1: the logprobs are the model's own distribution whichever vLLM version processes them.
        params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=1.0, detokenize=False)
        outputs = self._run([e.input_ids for e in encoded], params)
        return [prompt_nll(e.input_ids, out.prompt_logprobs, e.response_mask) for e, out in zip(encoded, outputs)]

    def close(self) -> None:
        """Let go of vLLM's GPU memory, so that a later stage in this process (training) has it."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def vllm_dtype(dtype: str) -> str:
    """vLLM's dtype name for a forgetless ``dtype`` setting: ``auto`` is what the HF path loads on a GPU
    (bf16 where supported)."""
    from forgetless.lm.modeling import pick_dtype

    return str(pick_dtype(dtype, "cuda")).removeprefix("torch.")
