"""Masked-loss fine-tuning: LoRA, DoRA or full, on a training table whose masks are already applied.

Every method of the paper trains through this one path; a method only changes which table is trained on (the
masking stage decides the tokens) and, for ``kl``, adds ``kl_coef * KL(tuned || base)`` on trained tokens. The loss
and its normalisation are in :mod:`forgetless.train.loss`; the training loop is the Hugging Face Trainer (checkpoints,
resume with the same data order and optimizer state, accelerate / DeepSpeed / FSDP launchers, ``report_to``).

Run: ``run_train(TrainConfig(data="masks/stm.parquet", output_dir="runs/stm"))``. Outputs in ``output_dir``:
``adapter/`` (or ``model/`` for full fine-tuning), optional ``merged/``, ``loss.jsonl``, ``diagnostics.json``,
``train_summary.json``, ``config.json``, ``manifest.json``, and ``checkpoints/`` while training.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forgetless import __version__
from forgetless.train.collate import MaskedBatchCollator, TableError, read_table, table_counts
from forgetless.core.diagnostics import adapter_updates, full_updates
from forgetless.lm.artifacts import write_json
from forgetless.train.loss import MaskedLossMixin, NonFiniteLossError
from forgetless.lm.modeling import file_sha256

logger = logging.getLogger(__name__)

METHODS = ("sft", "stm", "random-mask", "inverse-mask", "soft", "kl", "self-output", "rephrase")
ADAPTERS = ("lora", "dora", "full")


@dataclass(frozen=True)
class TrainConfig:
    data: str = field(metadata={"help": "training table (Parquet) written by the masking stage or build_sft_table"})
    output_dir: str = field(metadata={"help": "run directory; everything is written inside it"})
    model: str = field(default="embedded", metadata={"help": "'embedded', a local model directory or a hub name"})
    revision: str | None = field(default=None, metadata={"help": "hub revision of the model"})
    method: str = field(default="sft", metadata={"help": f"label of the method ({', '.join(METHODS)}); "
                                                          "'kl' needs kl_coef > 0"})
    kl_coef: float = field(default=0.0, metadata={"help": "beta of beta * KL(tuned || base) on trained tokens"})
    adapter: str = field(default="lora", metadata={"help": "lora, dora or full (fine-tune every weight)"})
    lora_r: int = field(default=16, metadata={"help": "adapter rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "adapter alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input"})
    target_modules: str = field(default="all-linear", metadata={
        "help": "'all-linear' (every linear layer but the LM head) or comma-separated module names"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(default="linear", metadata={"help": "HF scheduler name: linear, cosine, constant..."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "linear warm-up: a fraction of the steps if < 1, else a number of steps"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the table (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = use epochs"})
    batch_size: int = field(default=4, metadata={"help": "examples per micro-batch per device"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (the weight-decay baseline)"})
    optim: str = field(default="adamw_torch", metadata={"help": "HF optimizer name (adamw_torch, sgd, ...)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, dropout and data order"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: no checkpoints)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    merge: bool = field(default=False, metadata={"help": "also write the adapter merged into the model"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed config file (run under accelerate)"})
    logging_steps: int = field(default=1, metadata={"help": "optimizer steps per loss.jsonl line"})
    diagnostics_top_k: int = field(default=8, metadata={"help": "singular values kept per module"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.method == "kl" and self.kl_coef <= 0:
            raise ValueError("method 'kl' needs kl_coef > 0")
        if self.kl_coef < 0:
            raise ValueError("kl_coef must be >= 0")
        for name in ("lora_r", "batch_size", "grad_accum", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_dropout must be in [0, 1)")
        if self.max_steps < 1 and self.epochs <= 0:
            raise ValueError("set epochs > 0 or max_steps >= 1")
        if self.save_steps < 0:
            raise ValueError("save_steps must be >= 0")
        if self.merge and self.adapter == "full":
            raise ValueError("merge applies to adapters; full fine-tuning already writes the whole model")


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


def _loss_log_callback(path: Path, trainer_ref: dict):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Appends one JSON line per logging step: step, loss, lr, trained tokens (and nll/kl per token)."""

        trimmed = False

        def on_step_begin(self, args, state, control, **kwargs):
            # After a resume keep only the lines of steps the checkpoint had reached (the state is restored
            # after on_train_begin, so this happens before the first step instead).
            if self.trimmed or not state.is_world_process_zero:
                return
            self.trimmed = True
            lines = path.read_text().splitlines() if path.exists() else []
            kept = [ln for ln in lines if _logged_step(ln) <= state.global_step]  # a cut last line goes too
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, path)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            stats = trainer_ref["trainer"].loss_stats
            tokens = sum(s["trained_tokens"] for s in stats)
            row = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                   "grad_norm": logs.get("grad_norm"), "trained_tokens": int(tokens),
                   "nll_per_token": sum(s["nll_sum"] for s in stats) / max(tokens, 1)}
            if stats and stats[0]["kl_sum"] is not None:
                row["kl_per_token"] = sum(s["kl_sum"] for s in stats) / max(tokens, 1)
            trainer_ref["tokens"] = trainer_ref.get("tokens", 0) + int(tokens)
            stats.clear()  # on every process; only the first one writes
            if not state.is_world_process_zero:
                return
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    return LossLog()


def save_atomic(save, target: Path) -> None:
    """``save(tmp_dir)`` then rename to ``target`` (replacing an old one)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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
        lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_ratio,
        num_train_epochs=config.epochs, max_steps=config.max_steps, weight_decay=config.weight_decay,
        optim=config.optim, max_grad_norm=config.max_grad_norm, seed=config.seed, data_seed=config.seed,
        save_strategy="steps" if config.save_steps else "no", save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit, logging_steps=config.logging_steps, report_to=[],
        remove_unused_columns=False, label_names=["labels"], use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16, activation_checkpointing=config.gradient_checkpointing,
        deepspeed=config.deepspeed, dataloader_num_workers=0,
    )


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


def weight_diagnostics(config: TrainConfig, model, base_state) -> dict:
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


def manifest(config: TrainConfig, tokenizer) -> dict:
    import peft
    import transformers
    import trl

    from forgetless.lm.modeling import model_fingerprint
    from forgetless.lm.templates import template_hash

    return {
        "stage": "train", "forgetless": __version__, "model": config.model, "revision": config.revision,
        "model_fingerprint": model_fingerprint(config.model, config.revision),
        "template_hash": template_hash(tokenizer), "data": str(Path(config.data).resolve()),
        "data_fingerprint": file_sha256(Path(config.data))[:16],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "trl": trl.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save_outputs(config: TrainConfig, out: Path, model, tokenizer) -> None:
    """Adapter (or full model), tokenizer, and the merged model when asked."""
    def save(d: Path):
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)

    save_atomic(save, out / ("model" if config.adapter == "full" else "adapter"))
    if config.merge:
        merged = model.merge_and_unload()
        save_atomic(lambda d: (merged.save_pretrained(d), tokenizer.save_pretrained(d)), out / "merged")


def run_train(config: TrainConfig, callbacks: list | None = None) -> Path:
    """Fine-tune as configured; returns the run directory (see the module docstring for what it holds)."""
    from transformers import set_seed

    from forgetless.lm.modeling import load_model_and_tokenizer, pick_dtype

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", dataclasses.asdict(config))
    device = resolve_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    set_seed(config.seed)
    rows = read_table(config.data)
    counts = table_counts(rows)
    logger.info("training table: %s", counts)
    if counts["trained_tokens"] == 0:
        raise TableError(f"{config.data}: all {counts['response_tokens']} response tokens of its "
                         f"{counts['examples']} examples are masked: nothing to train on")
    if counts["examples_without_trained_tokens"]:
        logger.warning("%s: %d of %d examples have every response token masked (they add no loss)",
                       config.data, counts["examples_without_trained_tokens"], counts["examples"])
    model, tokenizer = load_model_and_tokenizer(config.model, config.revision, config.dtype, device)
    model.config.use_cache = False
    # Full fine-tuning keeps W0 for the diagnostics and, for the KL method, a frozen reference model.
    base_state = ({k: v.detach().cpu().clone() for k, v in model.state_dict().items() if v.dim() == 2}
                  if config.adapter == "full" else None)
    reference = None
    if config.adapter == "full" and config.kl_coef > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    model = prepare_model(config, model)
    resume_from = last_checkpoint(out) if config.resume else None
    if not config.resume and (out / "loss.jsonl").exists():
        (out / "loss.jsonl").unlink()
    ref: dict = {}
    trainer = _trainer_class()(
        model=model, args=training_arguments(config, out, device, dtype), train_dataset=rows,
        data_collator=MaskedBatchCollator(tokenizer.pad_token_id), kl_coef=config.kl_coef, reference=reference,
        callbacks=[_loss_log_callback(out / "loss.jsonl", ref), *(callbacks or [])], record_stats=True,
    )
    ref["trainer"] = trainer
    if reference is not None:
        reference.to(trainer.args.device)
    start = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except NonFiniteLossError as e:
        kept = last_checkpoint(out)
        raise NonFiniteLossError(f"{e}; last good checkpoint: {kept or 'none (save_steps=0)'}"
                                 f"{' (resume=true continues from it)' if kept else ''}") from None
    wall = time.time() - start
    if not trainer.is_world_process_zero():
        return out  # one process writes the outputs
    model = trainer.model
    model.eval()
    diag = weight_diagnostics(config, model, base_state)
    write_json(out / "diagnostics.json", diag)
    summary = {"table": counts, "global_steps": result.global_step, "train_loss": result.training_loss,
               "trained_tokens_seen": ref.get("tokens", 0), "wall_time_s": wall,
               "resumed_from": resume_from, "method": config.method, "adapter": config.adapter}
    write_json(out / "train_summary.json", summary)
    save_outputs(config, out, model, tokenizer)
    write_json(out / "manifest.json", manifest(config, tokenizer))
    print_diagnostics(diag, summary)
    return out
