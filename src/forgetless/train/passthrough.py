"""Trainer options that users of TRL / axolotl expect, passed through to transformers rather than re-written.

* ``attn_implementation`` goes to ``from_pretrained`` (:func:`forgetless.lm.modeling.load_model`);
* ``torch_compile``, ``report_to`` and ``use_liger_kernel`` go to ``TrainingArguments``;
* ``push_to_hub`` / ``hub_model_id``: ``Trainer.push_to_hub`` once, after the final save (every process saves, the
  first one uploads); ``TrainingArguments.push_to_hub`` stays off, so nothing is created or pushed mid-run;
* ``padding_free``: :class:`forgetless.train.collate.FlatBatchCollator`, once the model's attention is seen to keep
  packed examples apart (:func:`forgetless.core.packing.packing_isolates`).

What is checked here fails before the model is loaded (a missing package, a tracker name transformers does not
know) or before the first step (attention that lets packed examples see each other), in one line.

Liger: its fused linear cross-entropy computes the loss of *every* labelled row inside the model's forward, with no
per-token weights and no KL; forgetless's masked loss never passes ``labels`` to the model (it runs the LM head on
trained rows itself, chunked, which already avoids the ``batch x seq x vocab`` logits). So the loss kernels are
turned off (:data:`LIGER_KERNELS`) and Liger's other kernels (RMSNorm, RoPE, SwiGLU, ...) speed up the decoder under
the masked loss unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from forgetless.core.errors import ConfigError, ForgetlessError

logger = logging.getLogger(__name__)

# Liger's kernel switches (liger_kernel_config): the loss stays forgetless's, the rest is Liger's default.
LIGER_KERNELS = {"fused_linear_cross_entropy": False, "cross_entropy": False}
# Trackers whose package is checked before the model loads: name -> (transformers' availability test, package).
# The Trainer checks the other trackers itself when it starts.
_TRACKERS = {"wandb": ("is_wandb_available", "wandb"), "tensorboard": ("is_tensorboard_available", "tensorboard")}


class PushError(ForgetlessError, RuntimeError):
    """The upload to the hub failed after the run was complete and saved."""


def trackers(report_to: tuple[str, ...]) -> list[str]:
    """The ``report_to`` names for ``TrainingArguments``: ``none`` is no tracker."""
    return [name for name in report_to if name != "none"]


def check_options(config, device: str) -> None:
    """Raise ``ValueError`` (one line) for a pass-through option this machine cannot honour."""
    if config.use_liger_kernel:
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("use_liger_kernel needs the package 'liger_kernel' (pip install liger-kernel)")
        if not device.startswith("cuda"):
            raise ConfigError(f"use_liger_kernel needs a CUDA device (Liger's kernels are Triton GPU kernels); "
                             f"this run is on {device}")
    names = trackers(config.report_to)
    if not names:
        return
    from transformers import integrations
    from transformers.integrations.integration_utils import get_reporting_integration_callbacks

    get_reporting_integration_callbacks(names)  # ValueError naming the trackers transformers supports
    for name in names:
        test, package = _TRACKERS.get(name, (None, None))
        if test and not getattr(integrations, test)():
            raise ConfigError(f"report_to={name} needs the package '{package}' (pip install {package})")


def check_padding_free(config, model, sharded: bool) -> None:
    """Refuse ``padding_free`` when the model's attention lets one packed example see the one before it."""
    if not config.padding_free:
        return
    from forgetless.core.packing import packing_isolates

    attention = getattr(model.config, "_attn_implementation", None)
    if sharded:  # the weights are partitioned already: no forward outside the engine
        logger.warning("padding_free: the packing check needs whole weights and is skipped under sharding; "
                       "attention %s", attention)
        return
    if not packing_isolates(model):
        raise ConfigError(f"padding_free needs attention that keeps packed examples apart (position_ids restarting "
                         f"at 0), and attn_implementation={attention} lets them see each other here; use "
                         f"attn_implementation=sdpa, eager or flash_attention_2, or padding_free=false")


def push_final(trainer, tokenizer, config, out: Path) -> None:
    """``Trainer.push_to_hub`` to ``config.hub_model_id``: every process takes part in the save, the first uploads
    what the Trainer saved in its output folder (``checkpoints/``, less the ``checkpoint-*`` folders) and the tokenizer.

    Called after the run is complete on disk; a failed upload raises :class:`PushError` saying so.
    """
    if not config.push_to_hub:
        return
    if trainer.is_world_process_zero():
        # Not the Trainer's processing_class: that would also rewrite the model's special-token ids at train().
        tokenizer.save_pretrained(trainer.args.output_dir)
    try:
        trainer.push_to_hub(commit_message=f"forgetless {config.method} ({config.adapter})")
    except Exception as e:  # whatever failed in the upload (network, token, repo), the run itself is complete
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PushError(f"push to {config.hub_model_id} failed ({type(e).__name__}: {reason[:200]}); the run in "
                        f"{out} is complete, and its {'model' if config.adapter == 'full' else 'adapter'}/ can be "
                        f"uploaded by hand") from None
