"""What a train run writes at its end: the adapter or model (saved through the Trainer, so FSDP / ZeRO-3
weights are gathered), the merged model, and the weight diagnostics (from memory, or from the saved files when
the weights are sharded across processes). Every write goes to a temporary name and is renamed."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from forgetless.core.diagnostics import adapter_updates, full_updates
from forgetless.train.parallel import barrier

logger = logging.getLogger(__name__)


def save_atomic(save, target: Path, main: bool = True, sync=lambda: None) -> None:
    """``save(tmp_dir)`` then rename to ``target`` (replacing an old one).

    Called by every process with ``sync`` a barrier when ``save`` is a collective (gathering FSDP / ZeRO-3 weights):
    only the ``main`` process clears and renames, after every process has finished saving.
    """
    tmp = target.with_name(f".{target.name}.tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    sync()
    save(tmp)
    sync()
    if main:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    sync()


def weight_diagnostics(config, model, base_state) -> dict:
    if config.adapter == "full":
        return full_updates(model, base_state, config.diagnostics_top_k)
    return adapter_updates(model, top_k=config.diagnostics_top_k)


def print_diagnostics(diag: dict, summary: dict) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    console.print(f"[bold]trained[/bold] {summary['trained_tokens_seen']} tokens in {summary['global_steps']} steps "
                  f"({summary['wall_time_s']:.1f} s); table masked fraction {summary['table']['masked_fraction']:.3f}")
    console.print(f"[bold]||dW||_F total[/bold] {diag['total_frobenius']:.4f} over {diag['num_modules']} modules; "
                  f"mean effective rank {diag['mean_effective_rank']:.2f}; largest {diag['largest_module']}")


def save_outputs(config, out: Path, trainer, tokenizer, sharded: bool) -> None:
    """Adapter (or full model), tokenizer, and the merged model when asked; every process takes part.

    Through ``Trainer.save_model``, which gathers FSDP (full state dict) and ZeRO-3 (16-bit gathered) weights
    before the first process writes them.
    """
    main = trainer.is_world_process_zero()

    def save(d: Path):
        trainer.save_model(str(d))
        if main:
            tokenizer.save_pretrained(d)
            (d / "training_args.bin").unlink(missing_ok=True)  # the Trainer's pickle; config.json has our settings

    save_atomic(save, out / ("model" if config.adapter == "full" else "adapter"), main, sync=barrier)
    if config.merge:  # the first process alone
        if main:
            merged = merged_model(config, out, trainer, sharded)
            save_atomic(lambda d: (merged.save_pretrained(d), tokenizer.save_pretrained(d)), out / "merged")
        barrier()


def merged_model(config, out: Path, trainer, sharded: bool):
    """The adapter merged into the base: from the first process's full copy, or (weights sharded across
    processes) from the base reloaded on the CPU and the adapter just saved."""
    if not sharded:
        return trainer.model.merge_and_unload()
    from forgetless.lm.modeling import load_adapter, load_model

    base = load_model(config.model, config.revision, config.dtype, str(trainer.args.device), place=False)
    return load_adapter(base, str(out / "adapter"), config.model).merge_and_unload()


def saved_diagnostics(config, out: Path, device) -> dict:
    """Weight diagnostics from the saved outputs and the base reloaded (the in-memory weights are sharded).

    LoRA needs only the ``r x r`` cores (cheap on the CPU); DoRA and full fine-tuning take SVDs of whole matrices,
    so they run on this process's device when it has room.
    """
    from transformers import AutoModelForCausalLM

    from forgetless.lm.modeling import load_adapter, load_model

    base = load_model(config.model, config.revision, config.dtype, str(device), place=False)
    if config.adapter == "full":
        base_state = {k: v for k, v in base.state_dict().items() if v.dim() == 2}
        tuned = AutoModelForCausalLM.from_pretrained(out / "model", dtype=base.dtype)
    else:
        tuned = load_adapter(base, str(out / "adapter"), config.model)
        base_state = None
    if config.adapter != "lora" and torch.device(device).type == "cuda":
        try:
            tuned = tuned.to(device)
        except torch.cuda.OutOfMemoryError:
            logger.warning("diagnostics on the CPU (no room on %s): the SVDs may take a while", device)
            tuned = tuned.cpu()
    return weight_diagnostics(config, tuned, base_state)
