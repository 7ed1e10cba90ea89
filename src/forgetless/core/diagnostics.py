"""Weight-update diagnostics: how far and in how many directions fine-tuning moved each weight matrix.

``dW`` is always the *effective* change of the weight the layer multiplies its input by:

* LoRA: ``dW = scaling * B @ A``;
* DoRA: ``dW = m / ||W + scaling * B @ A||_row * (W + scaling * B @ A) - W`` (the magnitude ``m`` rescales each
  output row; the norm is per output row, as PEFT computes it for linear layers);
* full fine-tuning: ``dW = W - W0``.

Per module: the Frobenius norm ``||dW||_F``, the top singular values and the *effective rank* of Roy & Vetterli
(2007): ``exp(H(p))`` with ``p_i = s_i / sum(s)`` over the singular values ``s`` (1.0 for a rank-1 update, ``n``
for ``n`` equal singular values, 0.0 for a zero update). The total is ``sqrt(sum of squared module norms)``, the
Frobenius norm of all updates stacked together.
"""

from __future__ import annotations

import math

import torch


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli effective rank ``exp(entropy(s / sum(s)))``; 0.0 for an all-zero spectrum.

    >>> round(effective_rank(torch.tensor([2.0, 2.0, 0.0])), 6)
    2.0
    """
    s = singular_values.double().clamp(min=0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B @ A``: ``(r, in), (out, r) -> (out, in)`` in fp32."""
    return scaling * (lora_b.double() @ lora_a.double()).float()


def dora_delta(weight, lora_a, lora_b, scaling: float, magnitude) -> torch.Tensor:
    """Effective DoRA change of a linear weight ``(out, in)``; ``magnitude`` is ``(out,)``."""
    w = weight.double()
    directed = w + scaling * (lora_b.double() @ lora_a.double())
    norm = torch.linalg.norm(directed, dim=1)  # (out,)
    return ((magnitude.double() / norm)[:, None] * directed - w).float()


def lowrank_singular_values(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of ``scaling * B @ A`` from an ``r x r`` core (QR of both factors): exact and cheap."""
    qb, rb = torch.linalg.qr(lora_b.double())  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(lora_a.double().T)  # (in, r), (r, r)
    return torch.linalg.svdvals(scaling * rb @ ra.T).float()


def update_stats(delta: torch.Tensor, top_k: int = 8, singular_values: torch.Tensor | None = None) -> dict:
    """``frobenius``, ``effective_rank``, ``top_singular_values`` (descending) and ``shape`` of one update."""
    s = singular_values if singular_values is not None else torch.linalg.svdvals(delta.double()).float()
    return {
        "shape": list(delta.shape),
        "frobenius": float(torch.linalg.norm(delta.double())),
        "effective_rank": effective_rank(s),
        "top_singular_values": [float(v) for v in s[:top_k]],
    }


def summarize(modules: dict[str, dict]) -> dict:
    """Total ``sqrt(sum ||dW||_F^2)``, the largest module update and the count, plus the per-module stats."""
    norms = {name: m["frobenius"] for name, m in modules.items()}
    largest = max(norms, key=norms.get) if norms else None
    return {
        "total_frobenius": math.sqrt(sum(v * v for v in norms.values())),
        "sum_of_module_frobenius": sum(norms.values()),
        "num_modules": len(modules),
        "largest_module": largest,
        "mean_effective_rank": (sum(m["effective_rank"] for m in modules.values()) / len(modules)) if modules else 0.0,
        "modules": modules,
    }


def _transposed(module, w: torch.Tensor) -> torch.Tensor:
    return w.T if getattr(module, "fan_in_fan_out", False) else w


def adapter_updates(model, adapter: str = "default", top_k: int = 8) -> dict:
    """Diagnostics of every LoRA / DoRA layer of a PEFT model (see the module docstring)."""
    from peft.tuners.lora import LoraLayer

    modules = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        # On the weights' own device: the SVDs of large models are slow on a CPU.
        a = module.lora_A[adapter].weight.detach().float()
        b = module.lora_B[adapter].weight.detach().float()
        scaling = float(module.scaling[adapter])
        if module.use_dora.get(adapter, False):
            w = _transposed(module, module.get_base_layer().weight.detach().float())
            m = module.lora_magnitude_vector[adapter].weight.detach().float().reshape(-1)
            modules[name] = update_stats(dora_delta(w, a, b, scaling, m), top_k)
        else:
            modules[name] = update_stats(lora_delta(a, b, scaling), top_k, lowrank_singular_values(a, b, scaling))
    return summarize(modules)


def full_updates(model, base_state: dict[str, torch.Tensor], top_k: int = 8) -> dict:
    """Diagnostics of ``W - W0`` for every 2-D weight of a linear layer (LM head and embeddings left out)."""
    modules = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or f"{name}.weight" not in base_state:
            continue
        if module.weight.shape[0] == getattr(getattr(model, "config", None), "vocab_size", -1):
            continue  # the LM head (often tied to the embeddings) is not a "layer" update in the paper's sense
        w = module.weight.detach().float()
        delta = w - base_state[f"{name}.weight"].to(w.device).float()
        modules[name] = update_stats(delta, top_k)
    return summarize(modules)
