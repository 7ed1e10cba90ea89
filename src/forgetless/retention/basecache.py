"""The base model's side of a comparison, computed once and cached on disk.

Drift and held-out measures compare a tuned model with the base it came from. The base side
(greedy answers, top-k next-token distributions, per-token NLL) depends only on the base
weights and the inputs, so it is cached under a key of (base fingerprint, inputs hash,
settings); each tuned model then costs one forward pass per item.

The base is, in order of preference: an explicit ``base_model``; else, for a PEFT model, the
same model with its adapter disabled (``model.disable_adapter()``: no second copy in memory).
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import torch

from forgetless.core.errors import ConfigError
from forgetless.lm import artifacts


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


@contextlib.contextmanager
def base_view(model, base_model=None):
    """Yield the model that computes base-side quantities (see the module docstring)."""
    if base_model is not None:
        yield base_model
    elif is_peft(model):
        with model.disable_adapter():
            yield model
    else:
        raise ConfigError("the base distribution needs base_model (or a PEFT model whose adapter can be disabled)")


def _is_adapter_param(name: str) -> bool:
    return any(tag in name for tag in ("lora_", "modules_to_save", "dora_", "vera_", "ia3_"))


@torch.no_grad()
def weights_digest(model, samples: int = 4096) -> str:
    """Cheap content hash of the non-adapter weights (shapes, sums and a strided sample).

    A plain model and the same weights wrapped by PEFT give the same digest: adapter
    parameters are skipped and the base parameters come in the same order.
    """
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        if _is_adapter_param(name):
            continue
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(repr((tuple(param.shape), float(flat.double().sum()))).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return "weights:" + h.hexdigest()[:16]


def base_fingerprint(model, base_model=None, given: str | None = None) -> str:
    """Cache identity of the base: ``given`` (e.g. modeling.model_fingerprint) or a weights digest."""
    if given:
        return given
    with base_view(model, base_model) as base:
        return weights_digest(base)


def ids_hash(sequences: list[list[int]]) -> str:
    return artifacts.json_digest(sequences, 16)


def cache_path(cache_dir: str | Path, kind: str, key: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"{kind}-{artifacts.json_digest(key, 20, sort_keys=True)}.pt"


def load_cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached payload at ``path`` if it exists and was written for exactly ``key``."""
    if not path.is_file():
        return None
    payload = torch.load(path, weights_only=True)
    return payload if payload.get("key") == key else None


def save_cached(path: Path, key: dict[str, Any], payload: dict[str, Any]) -> None:
    """Write atomically (temp name, then rename). Under a launcher the first process writes and every process
    waits for it, so that a later lookup finds the file on every process alike (:mod:`forgetless.lm.distributed`)."""
    from forgetless.lm import distributed

    if distributed.is_main():
        artifacts.write_atomic(path, lambda tmp: torch.save({**payload, "key": key}, tmp))
    distributed.barrier()
