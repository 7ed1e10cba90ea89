"""Weight-space interpolation between a base model and its fine-tune (WiSE-FT, Wortsman et al. 2022).

``theta(alpha) = theta_base + alpha * (theta_tuned - theta_base)``, alpha in [0, 1]: alpha = 0 is the base, alpha = 1
the fine-tune, and one training run gives a whole curve of target gain against forgetting without retraining.

* A LoRA adapter's update is ``scaling * B @ A``, linear in ``scaling``: the interpolation multiplies each layer's
  scaling by alpha (exact; the adapter-disabled view stays the base).
* A full fine-tune: each floating weight is blended with the base's, which must be at hand (``base_model``).
* A DoRA adapter is refused: its magnitude vector re-normalises the direction, so scaling the low-rank part is not
  the straight line between the two weights; merge it into a full model and interpolate that instead.
"""

from __future__ import annotations

import torch

from forgetless.core.errors import ForgetlessError


class InterpolationError(ForgetlessError, ValueError):
    """An interpolation that cannot be done as asked."""


def check_alpha(alpha: float, where: str = "adapter_scale") -> None:
    if not 0.0 <= alpha <= 1.0:
        raise InterpolationError(f"{where} must be in [0, 1] (0: the base, 1: the fine-tune), got {alpha}")


def scale_lora(model, alpha: float) -> int:
    """Multiply the scaling of every LoRA layer of the PEFT ``model`` by ``alpha`` (its active adapters); returns
    the layers scaled."""
    from peft.tuners.lora import LoraLayer

    check_alpha(alpha)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise InterpolationError("adapter_scale: the model has no LoRA layer to scale")
    if any(any(layer.use_dora.values()) for layer in layers):
        raise InterpolationError("adapter_scale: a DoRA adapter does not interpolate linearly in its scale; "
                                 "merge it (train.merge=true) and interpolate the merged model with base_model")
    for layer in layers:
        layer.scale_layer(alpha)  # PEFT's own: the active adapters' scaling times alpha
    return len(layers)


@torch.no_grad()
def blend_weights(tuned, base, alpha: float) -> None:
    """In place: each floating parameter and buffer of ``tuned`` becomes ``base + alpha * (tuned - base)``.

    The two models must have the same parameter names and shapes (a fine-tune of that base)."""
    check_alpha(alpha)
    base_state = base.state_dict()
    for name, value in tuned.state_dict().items():
        if name not in base_state or base_state[name].shape != value.shape:
            raise InterpolationError(f"adapter_scale: the base model has no weight {name} of shape "
                                     f"{tuple(value.shape)}: is it this fine-tune's base?")
        if value.is_floating_point():
            ref = base_state[name].to(value.device, value.dtype)
            value.copy_(ref + alpha * (value - ref))
