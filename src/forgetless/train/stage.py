"""Masked-loss fine-tuning: LoRA, DoRA or full, on a training table whose masks are already applied.

Every method of the paper trains through this one path; a method only changes which table is trained on (the
masking stage decides the tokens) and, for ``kl``, adds ``kl_coef * KL(tuned || base)`` on trained tokens. The loss
and its normalisation are in :mod:`forgetless.train.loss`; the training loop is the Hugging Face Trainer (checkpoints,
resume with the same data order and optimizer state, accelerate / DeepSpeed / FSDP launchers, ``report_to``).

Run: ``run_train(TrainConfig(data="masks/stm.parquet", output_dir="runs/stm"))``. Outputs in ``output_dir``:
``adapter/`` (or ``model/`` for full fine-tuning), optional ``merged/``, ``loss.jsonl``, ``diagnostics.json``,
``train_summary.json``, ``config.json``, ``manifest.json``, and ``checkpoints/`` while training; with
``keep=best-epoch`` also ``epochs/epoch-<k>/`` and ``epochs.jsonl`` (:mod:`forgetless.train.select`).

Several GPUs: one process each, ``torchrun --nproc_per_node N -m forgetless.cli train ...`` or ``accelerate launch
--config_file configs/accelerate/<ddp|fsdp|zero2|zero3>.yaml -m forgetless.cli train ...``; what changes across
processes is in :mod:`forgetless.train.parallel` and ``docs/many-gpus.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from forgetless.core.errors import ConfigError
from forgetless import __version__
from forgetless.train.card import card_text, mask_facts, write_card
from forgetless.train.collate import FlatBatchCollator, MaskedBatchCollator, TableError, read_table, table_counts
from forgetless.lm.artifacts import file_sha256, write_json, write_manifest, write_text
from forgetless.train.config import ADAPTERS, METHODS, TrainConfig  # noqa: F401  (re-exported)
from forgetless.train.loss import MaskedLossMixin, NonFiniteLossError
from forgetless.train.outputs import print_diagnostics, save_outputs, saved_diagnostics, weight_diagnostics
from forgetless.train.parallel import barrier, initialized, launch_device, refuse_data_parallel, sharding_engine
from forgetless.train.passthrough import LIGER_KERNELS, check_options, check_padding_free, push_final, trackers
from forgetless.train.select import best_epoch_callback, load_best_epoch, selection_measure

logger = logging.getLogger(__name__)

def _trainer_class():
    from transformers import Trainer

    class MaskedLossTrainer(MaskedLossMixin, Trainer):
        """HF Trainer whose loss is :func:`forgetless.train.loss.compute_masked_loss`."""

    return MaskedLossTrainer


def _logged_step(line: str) -> float:
    """Step of a loss.jsonl line; infinity for a line cut short by a kill (so it is dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _loss_log_callback(path: Path):
    """The loss log; its ``trainer`` is set once the Trainer is built (the callback reads the Trainer's loss
    statistics, which no ``on_*`` hook receives), and ``tokens`` counts the trained tokens it logged."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Appends one JSON line per logging step: step, loss, lr, trained tokens (and nll/kl per token), all
        processes together (and the tokens of each process, ``trained_tokens_by_rank``, when there are several)."""

        trimmed = False
        trainer = None
        tokens = 0

        def on_step_begin(self, args, state, control, **kwargs):
            # After a resume keep only the lines of steps the checkpoint had reached (the state is restored
            # after on_train_begin, so this happens before the first step instead).
            if self.trimmed or not state.is_world_process_zero:
                return
            self.trimmed = True
            lines = path.read_text().splitlines() if path.exists() else []
            kept = [ln for ln in lines if _logged_step(ln) <= state.global_step]  # a cut last line goes too
            write_text(path, "".join(ln + "\n" for ln in kept))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            stats = self.trainer.pop_loss_stats()  # summed over processes; on every process (a collective)
            tokens = stats["trained_tokens"]
            row = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                   "grad_norm": logs.get("grad_norm"), "trained_tokens": tokens,
                   "nll_per_token": stats["nll_sum"] / max(tokens, 1)}
            if self.trainer.kl_coef > 0:
                row["kl_per_token"] = stats["kl_sum"] / max(tokens, 1)
            if len(stats["trained_tokens_by_rank"]) > 1:
                row["trained_tokens_by_rank"] = stats["trained_tokens_by_rank"]
            self.tokens += tokens
            if not state.is_world_process_zero:
                return
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    return LossLog()


def prepare_model(config: TrainConfig, model):
    """Wrap ``model`` with the configured adapter; for full fine-tuning return it (all weights trainable)."""
    if config.adapter == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    if config.gradient_checkpointing:
        # Checkpointed layers of a frozen base need an input that requires grad, or no gradient reaches the adapter.
        model.enable_input_require_grads()
    targets = config.target_modules if config.target_modules == "all-linear" else [
        t.strip() for t in config.target_modules.split(",") if t.strip()]
    peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=targets, use_dora=config.adapter == "dora", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_config)


def training_arguments(config: TrainConfig, out: Path, device: str, dtype: torch.dtype):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.learning_rate,
        # Since transformers 5.0 a float warmup_steps < 1 is a share of the steps, >= 1 a count (get_warmup_steps):
        # warmup_ratio's own meaning (transformers' own warmup_ratio was deprecated in 5.0, and is gone in 5.23).
        lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_ratio,
        num_train_epochs=config.epochs, max_steps=config.max_steps, weight_decay=config.weight_decay,
        optim=config.optim, max_grad_norm=config.max_grad_norm, seed=config.seed, data_seed=config.seed,
        save_strategy="steps" if config.save_steps else "no", save_steps=checkpoint_interval(config.save_steps),
        save_total_limit=config.save_total_limit, logging_steps=config.logging_steps,
        report_to=trackers(config.report_to), run_name=out.name, torch_compile=config.torch_compile,
        use_liger_kernel=config.use_liger_kernel,
        liger_kernel_config=dict(LIGER_KERNELS) if config.use_liger_kernel else None,
        hub_model_id=config.hub_model_id,  # push_to_hub stays False: push_final uploads once, at the end
        remove_unused_columns=False, label_names=["labels"], use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16, **checkpointing_argument(config.gradient_checkpointing),
        deepspeed=config.deepspeed, dataloader_num_workers=0,
        # The normalisation needs the trained tokens of every process (transformers 5.23 default; stated, not assumed).
        average_tokens_across_devices=True,
        # Every trainable weight takes part in every forward (an all-masked batch too, through `hidden.sum() * 0`):
        # DDP need not search the graph for unused ones (the Trainer's default for a PEFT model).
        ddp_find_unused_parameters=False,
    )


def checkpointing_argument(on: bool) -> dict:
    """Activation checkpointing under the name the installed transformers takes: ``activation_checkpointing`` since
    it was renamed in the 5.x line, ``gradient_checkpointing`` before (the lowest version declared, 5.12.1)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def checkpoint_interval(save_steps: float) -> float | int:
    """The Trainer's ``save_steps``: a count of steps, or below 1 a share of them (resolved when training starts);
    any value with checkpoints off."""
    return save_steps if 0 < save_steps < 1 else int(save_steps) or 500


def check_fresh_start(config: TrainConfig, out: Path) -> None:
    """A fresh run (``resume=false``) into a folder that holds an interrupted run's checkpoints would train over
    them; it stops, before any model loads, saying how to continue or start over."""
    kept = None if config.resume else last_checkpoint(out)
    if kept:
        raise ConfigError(f"{out} holds an interrupted run's checkpoint ({Path(kept).name}): resume=true continues "
                          f"it; to start over, remove {out / 'checkpoints'} or choose another output_dir")


def drop_checkpoints(out: Path) -> None:
    """A finished run's ``checkpoint-*`` folders: they exist to resume it, and a full fine-tune's take the size
    of the model and its optimizer state each."""
    for d in sorted((out / "checkpoints").glob("checkpoint-*")):
        shutil.rmtree(d, ignore_errors=True)


def last_checkpoint(out: Path) -> str | None:
    """The newest *complete* checkpoint: the Trainer writes ``trainer_state.json`` last and not atomically, so a
    kill while saving leaves a newer folder without a readable one (which the Trainer's own pick would take)."""
    folder = out / "checkpoints"
    found = []
    for d in folder.glob("checkpoint-*") if folder.is_dir() else []:
        try:
            step = int(d.name.split("-", 1)[1])
            json.loads((d / "trainer_state.json").read_text())
        except (ValueError, OSError):
            logger.warning("ignoring incomplete checkpoint %s (interrupted while saving)", d)
            continue
        found.append((step, str(d)))
    return max(found)[1] if found else None


def manifest(config: TrainConfig, tokenizer) -> dict:
    import peft
    import transformers

    from forgetless.lm.modeling import model_fingerprint
    from forgetless.lm.templates import template_hash

    return {
        "stage": "train", "forgetless": __version__, "model": config.model, "revision": config.revision,
        "model_fingerprint": model_fingerprint(config.model, config.revision),
        "template_hash": template_hash(tokenizer), "data": str(Path(config.data).resolve()),
        "data_fingerprint": file_sha256(Path(config.data), 16),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def reference_copy(config: TrainConfig, model, engine: str | None, device):
    """Frozen copy of the base for the KL term of full fine-tuning (LoRA / DoRA use the adapter-disabled model).

    The copy is whole on every process (never sharded): the weights once more per device. ZeRO-3 cannot give one
    (its partitioned weights deep-copy as empty tensors), nor can FSDP's rank-0-only loading (meta weights).
    """
    if config.adapter != "full" or config.kl_coef <= 0:
        return None
    advice = "use adapter=lora or dora (their base is the model with the adapter disabled: no copy)"
    if engine == "zero3":
        raise ConfigError(f"KL to the base with full fine-tuning needs a whole reference copy, which ZeRO-3 cannot "
                         f"give; {advice}, or ZeRO-2 / FSDP / DDP")
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError(f"KL to the base with full fine-tuning needs a whole reference copy, but this process "
                         f"loaded no weights (FSDP cpu_ram_efficient_loading); {advice}, or turn that option off")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if size > free:
            raise ConfigError(f"KL reference model ({size / 2**30:.1f} GiB, whole on every device) does not fit "
                             f"on {device} ({free / 2**30:.1f} GiB free); {advice}")
    logger.warning("KL reference: a whole frozen copy of the model (%.2f GiB) on every device, not sharded",
                   size / 2**30)
    return copy.deepcopy(model).eval().requires_grad_(False)


def read_training_table(path: str) -> tuple[list[dict], dict]:
    """The table's rows and counts; refuses a table with nothing to train on."""
    rows = read_table(path)
    counts = table_counts(rows)
    logger.info("training table: %s", counts)
    if counts["trained_tokens"] == 0:
        raise TableError(f"{path}: all {counts['response_tokens']} response tokens of its "
                         f"{counts['examples']} examples are masked: nothing to train on")
    if counts["examples_without_trained_tokens"]:
        logger.warning("%s: %d of %d examples have every response token masked (they add no loss)",
                       path, counts["examples_without_trained_tokens"], counts["examples"])
    return rows, counts


def run_train(config: TrainConfig, callbacks: list | None = None, select_measure=None) -> Path:
    """Fine-tune as configured; returns the run directory (see the module docstring for what it holds).

    ``select_measure`` (model -> record with ``score`` and ``higher_is_better``) replaces the measure of
    ``config.select_on`` for ``keep=best-epoch`` (:mod:`forgetless.train.select`).
    """
    out = Path(config.output_dir)
    keep_group = initialized()  # a group started before training (``forgetless run`` under a launcher) outlives it
    args, engine = start_run(config, out)
    rows, counts = read_training_table(config.data)
    model, tokenizer, base_state, reference = load_training_model(config, args, engine)
    resume_from = resume_point(config, out, main=args.process_index == 0)
    callbacks = with_best_epoch(config, out, tokenizer, callbacks, select_measure)
    trainer, loss_log = build_trainer(config, args, model, tokenizer, rows, reference, out / "loss.jsonl", callbacks)
    trained = train(trainer, out, resume_from, loss_log, keep_group)
    kept, diag = save_trained(config, out, trainer, tokenizer, base_state, engine)
    if args.process_index == 0:  # one process writes the rest
        summary = {"table": counts, **trained, "method": config.method, "adapter": config.adapter,
                   "processes": args.world_size, "distributed": trainer.accelerator.distributed_type.value,
                   "weights_sharded": engine, **kept}
        write_run_files(config, out, tokenizer, counts, diag, summary, args.device)
        drop_checkpoints(out)
    try:
        push_final(trainer, tokenizer, config, out)  # the run is complete on disk first
    finally:
        end_processes(trainer, keep_group)
    return out


def start_run(config: TrainConfig, out: Path):
    """(TrainingArguments, sharding engine): the processes and devices set up, the options checked, ``config.json``
    written and the seed set."""
    from transformers import set_seed

    from forgetless.lm.modeling import pick_dtype

    check_fresh_start(config, out)
    device = launch_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    # The accelerate state (process group, this process's device, DeepSpeed's zero.Init switch) is created here,
    # before the model is loaded, so every process loads onto its own device and ZeRO-3 partitions while loading.
    args = training_arguments(config, out, device, dtype)
    refuse_data_parallel(args)
    check_options(config, device)
    engine = sharding_engine(args)
    if args.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dataclasses.asdict(config))
    set_seed(config.seed)
    return args, engine


def load_training_model(config: TrainConfig, args, engine: str | None):
    """(model with its adapter, tokenizer, W0 for the diagnostics or None, KL reference or None)."""
    from forgetless.lm.modeling import load_model, load_tokenizer

    # Sharding engines place (and shard) the weights themselves; otherwise each process loads onto its device.
    model = load_model(config.model, config.revision, config.dtype, str(args.device), place=engine is None,
                       attn_implementation=config.attn_implementation)
    tokenizer = load_tokenizer(config.model, config.revision)
    model.config.use_cache = False
    check_padding_free(config, model, sharded=engine is not None)
    # Full fine-tuning keeps W0 for the diagnostics (first process; sharded weights are diagnosed from the saved
    # files instead) and, for the KL method, a frozen reference model.
    base_state = ({k: v.detach().cpu().clone() for k, v in model.state_dict().items() if v.dim() == 2}
                  if config.adapter == "full" and args.process_index == 0 and engine is None else None)
    reference = reference_copy(config, model, engine, args.device)
    return prepare_model(config, model), tokenizer, base_state, reference


def resume_point(config: TrainConfig, out: Path, main: bool) -> str | None:
    """The checkpoint to resume from (``config.resume``); a fresh run drops an earlier run's loss log."""
    resume_from = last_checkpoint(out) if config.resume else None
    if main and not config.resume and (out / "loss.jsonl").exists():
        (out / "loss.jsonl").unlink()
    return resume_from


def with_best_epoch(config: TrainConfig, out: Path, tokenizer, callbacks: list | None, select_measure) -> list:
    """``callbacks`` and, for ``keep=best-epoch``, the callback that saves and measures every epoch."""
    callbacks = list(callbacks or [])
    if config.keep == "best-epoch":
        measure = select_measure or selection_measure(config, tokenizer)
        callbacks.append(best_epoch_callback(out, measure, config.select_on, fresh=not config.resume))
    return callbacks


def build_trainer(config: TrainConfig, args, model, tokenizer, rows: list[dict], reference, loss_path: Path,
                  callbacks: list):
    """(the masked-loss Trainer, its loss log): the loss log first among the callbacks."""
    loss_log = _loss_log_callback(loss_path)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=rows,
        data_collator=FlatBatchCollator() if config.padding_free else MaskedBatchCollator(tokenizer.pad_token_id),
        kl_coef=config.kl_coef, reference=reference, loss_type=config.loss_type,
        callbacks=[loss_log, *callbacks], record_stats=True,
    )
    loss_log.trainer = trainer
    if reference is not None:
        reference.to(trainer.args.device)
    return trainer, loss_log


def train(trainer, out: Path, resume_from: str | None, loss_log, keep_group: bool) -> dict:
    """Train; returns what ``train_summary.json`` records of it. A non-finite loss ends every process and names
    the last good checkpoint."""
    start = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except NonFiniteLossError as e:
        end_processes(trainer, keep_group)  # every process raised at the same micro-batch
        kept = last_checkpoint(out)
        raise NonFiniteLossError(f"{e}; last good checkpoint: {kept or 'none (save_steps=0)'}"
                                 f"{' (resume=true continues from it)' if kept else ''}") from None
    wall = time.time() - start
    return {"global_steps": result.global_step, "train_loss": result.training_loss,
            "trained_tokens_seen": loss_log.tokens, "wall_time_s": wall, "resumed_from": resume_from}


def save_trained(config: TrainConfig, out: Path, trainer, tokenizer, base_state, engine: str | None):
    """(what ``train_summary.json`` records of the kept weights, the weight diagnostics or None): the best epoch
    loaded (``keep=best-epoch``), diagnosed on the first process before any merge, and saved."""
    model = trainer.model
    model.eval()
    kept = load_best_epoch(model, out) if config.keep == "best-epoch" else {"keep": "last"}
    main = trainer.args.process_index == 0
    diag = weight_diagnostics(config, model, base_state) if main and engine is None else None  # before a merge
    save_outputs(config, out, trainer, tokenizer, sharded=engine is not None)
    return kept, diag


def write_run_files(config: TrainConfig, out: Path, tokenizer, counts: dict, diag: dict | None, summary: dict,
                    device) -> None:
    """``diagnostics.json`` (from the saved weights when they were sharded), ``train_summary.json``, the manifest
    and the model card; prints the diagnostics."""
    if diag is None:
        diag = saved_diagnostics(config, out, device)
    write_json(out / "diagnostics.json", diag)
    write_json(out / "train_summary.json", summary)
    run_manifest = manifest(config, tokenizer)
    write_manifest(out, **run_manifest)
    weights = out / ("model" if config.adapter == "full" else "adapter")
    write_card(weights, card_text(config, run_manifest, counts, mask_facts(config.data)))
    print_diagnostics(diag, summary)


def end_processes(trainer, keep_group: bool = False) -> None:
    """Wait for every process, then take the process group down (``Accelerator.end_training``; nothing in one
    process).

    Processes that exit one by one, with the group still up, can abort at exit (seen with gloo:
    "terminate called without an active exception"); a later ``run_train`` in the same processes starts a new group.
    ``keep_group``: the group was there before training (``forgetless run`` under a launcher, whose later stages
    share their work through it): only the trackers end.
    """
    barrier()
    if keep_group:
        for tracker in trainer.accelerator.trackers:
            tracker.finish()
    else:
        trainer.accelerator.end_training()  # what Trainer.end does (transformers 5.12 has no Trainer.end)
