"""The model settings every stage repeats, with one set of defaults: which model, how it is loaded, and (for the stages
that can generate through vLLM) the engine. Each stage config embeds them by inheritance, so ``cfg.model`` and
``cfg.device`` read as before; the fields are keyword-only, so a stage config's own fields keep their positions."""

from __future__ import annotations

from dataclasses import dataclass, field

from forgetless.lm.modeling import EMBEDDED


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """The model a stage loads, and how (:func:`forgetless.lm.modeling.load_model`)."""

    model: str = field(default=EMBEDDED, metadata={"help": "'embedded', a local model directory or a hub name"})
    revision: str | None = field(default=None, metadata={"help": "hub revision of `model` (commit, tag or branch)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, else fp32), float32, bfloat16, float16"})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})


@dataclass(frozen=True, kw_only=True)
class EngineArgs(ModelArgs):
    """:class:`ModelArgs` plus the engine of a stage that can run on vLLM (checked by
    :func:`forgetless.lm.vllm_backend.check_backend_settings` in the stage's own ``__post_init__``)."""

    backend: str = field(default="auto", metadata={"help": "hf | vllm | auto (vllm when installed and CUDA present, "
                                                           "else hf)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs one model is split across"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: share of GPU memory it may take "
                                                                         "(weights + KV cache)"})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM: longest prompt + answer in tokens "
                                                                      "(null: the model's own)"})
