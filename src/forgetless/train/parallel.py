"""Training across processes (torchrun / accelerate launch): the few places where more than one process matters.

One process per device is the only multi-device layout supported: ``nn.DataParallel`` (what the Trainer falls back to
when one process sees several GPUs) is refused, because its replicas would share the hidden-state hook of
:mod:`forgetless.train.loss` and it splits the step-wide token count by a guess. Everything here is a no-op in a
single process, so ``forgetless train`` runs unchanged without a launcher.

* :func:`launch_device` (from :mod:`forgetless.lm.distributed`, shared with the data stages) pins this rank's GPU
  (``LOCAL_RANK``) before anything touches CUDA;
* :func:`sharding_engine` says whether the weights will be sharded (FSDP, ZeRO-3), which decides how the model is
  loaded, saved and diagnosed;
* :func:`call_inside_forward` runs the masked loss inside the wrapper's forward, where FSDP / ZeRO-3 have gathered the
  weights and will reduce their gradients;
* :func:`any_process`, :func:`gather_rows`, :func:`barrier` are the collectives training needs.
"""

from __future__ import annotations

import logging
import os

import torch

from forgetless.core.errors import ForgetlessError
from forgetless.lm.distributed import barrier, initialized, launch_device, world_size  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


class DataParallelError(ForgetlessError, RuntimeError):
    """One process sees several GPUs: the Trainer would use ``nn.DataParallel``, which this loss does not support."""


def refuse_data_parallel(args) -> None:
    """Raise :class:`DataParallelError` when the Trainer would wrap the model in ``nn.DataParallel``."""
    if args.n_gpu > 1:
        raise DataParallelError(
            f"this process sees {args.n_gpu} GPUs and would train with nn.DataParallel, which forgetless does not "
            f"support: launch one process per GPU (torchrun --nproc_per_node {args.n_gpu} -m forgetless.cli train ..., "
            f"or accelerate launch -m forgetless.cli train ...), or use one GPU (CUDA_VISIBLE_DEVICES=0)")


def sharding_engine(args) -> str | None:
    """``"fsdp"``, ``"zero3"`` when the weights will be sharded across processes, else None (one process, DDP,
    ZeRO-1/2). Read from the TrainingArguments (``deepspeed=`` / ``fsdp=``) and the accelerate
    launcher's environment."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return "zero3"
    if args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        if args.world_size > 1 and args.device.type != "cpu":
            return "fsdp"
        # accelerate 1.15 turns FSDP on only for several GPU-like processes; CPU processes run as DDP.
        logger.warning("FSDP was asked for, but %d %s process(es) train with whole copies of the model (DDP)",
                       args.world_size, args.device.type)
    return None


def any_process(flag: torch.Tensor) -> bool:
    """True when ``flag`` (a bool scalar tensor) is set on any process; one small all-reduce, on every process."""
    if not initialized():
        return bool(flag)
    flag = flag.detach().to(torch.int32).reshape(1).clone()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def gather_rows(row: torch.Tensor) -> torch.Tensor:
    """``(K,) -> (world, K)``: the vector of every process, in rank order (one all-gather, on every process)."""
    if not initialized():
        return row[None]
    parts = [torch.empty_like(row) for _ in range(world_size())]
    torch.distributed.all_gather(parts, row.contiguous())
    return torch.stack(parts)


def unwrap(model):
    """The module under DDP / FSDP1 / DeepSpeed wrappers (``.module``); PEFT models are left as they are."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def call_inside_forward(wrapper, fn, *args, **kwargs):
    """Run ``fn(inner, *args)`` as the forward of ``inner = unwrap(wrapper)``, called through ``wrapper``.

    The masked loss runs the LM head on hand-picked rows, outside the model's own forward. Called that way a sharded
    head is not usable: ZeRO-3 has partitioned ``lm_head.weight`` to shape ``[0]``, FSDP2 holds it as a DTensor
    shard, and neither would reduce its gradient. Rerouted through the wrapper's forward (the "forward redirection"
    of Lightning and TRL), the whole loss happens where the engine has gathered the weights and hooked the outputs
    for backward; under DDP and in one process it changes nothing. ``kwargs`` go through the wrapper (put only
    integer tensors there: FSDP's mixed precision casts floating inputs); ``fn`` must return tensors only.
    """
    inner = unwrap(wrapper)
    had_own = "forward" in vars(inner)
    original = inner.forward

    def redirected(*_args, **_kwargs):
        restore()  # fn may call the real forward
        return fn(inner, *args, **_kwargs)

    def restore():
        if had_own:
            inner.forward = original
        else:
            vars(inner).pop("forward", None)

    inner.forward = redirected
    try:
        return wrapper(**kwargs)
    finally:
        restore()
