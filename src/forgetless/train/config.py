"""The training stage's settings (:func:`forgetless.train.stage.run_train` runs them): the recipe, the adapter, the
optimisation, checkpoints, and what is passed through to the Hugging Face Trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

from forgetless.core.recipes import RECIPES, TRAIN_METHODS
from forgetless.lm.model_args import ModelArgs
from forgetless.train.loss import LOSS_TYPES
from forgetless.train.select import check_selection

METHODS = TRAIN_METHODS  # the recipes (forgetless.core.recipes) that do not train as another one
ADAPTERS = ("lora", "dora", "full")
# How a run is checkpointed, not what it trains: a finished stage's stamp is compared without them, so a run that
# resumed, or checkpoints at another interval, is the same result.
CHECKPOINTING = ("save_steps", "save_total_limit", "resume")


@dataclass(frozen=True)
class TrainConfig(ModelArgs):
    """Settings of the training stage; the model is :class:`ModelArgs`."""

    data: str = field(metadata={"help": "training table (Parquet) written by the masking stage or build_sft_table"})
    output_dir: str = field(metadata={"help": "run directory; everything is written inside it"})
    method: str = field(default="sft", metadata={"help": f"label of the method ({', '.join(METHODS)}); "
                                                          "'kl' needs kl_coef > 0"})
    kl_coef: float = field(default=0.0, metadata={"help": "beta of beta * KL(tuned || base) on trained tokens"})
    loss_type: str = field(default="nll", metadata={"help": "nll, or dft: each token's loss times its own detached "
                                                            "probability under the current model "
                                                            "(TRL's loss_type='dft')"})
    adapter: str = field(default="lora", metadata={"help": "lora, dora or full (fine-tune every weight)"})
    lora_r: int = field(default=16, metadata={"help": "adapter rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "adapter alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input"})
    target_modules: str = field(default="all-linear", metadata={
        "help": "'all-linear' (every linear layer but the LM head) or comma-separated module names"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(default="linear", metadata={"help": "HF scheduler name: linear, cosine, constant..."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "linear warm-up: a fraction of the steps if < 1, "
                                                               "else a number of steps"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the table (ignored when max_steps > 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 = use epochs"})
    batch_size: int = field(default=4, metadata={"help": "examples per micro-batch per device"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (the weight-decay baseline)"})
    optim: str = field(default="adamw_torch", metadata={"help": "HF optimizer name (adamw_torch, sgd, ...)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, dropout and data order"})
    save_steps: float = field(default=0.1, metadata={
        "help": "checkpoint every N optimizer steps; below 1, every such share of the run's steps (0.1: ten "
                "checkpoints); 0: none. Checkpoints are for resuming: a finished run removes them"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    merge: bool = field(default=False, metadata={"help": "also write the adapter merged into the model"})
    # 'auto' resolves as None does (forgetless.lm.distributed.launch_device), but every finished training run's
    # stamp holds device='auto': the shared default would re-train them all on resume.
    device: str = field(default="auto", kw_only=True, metadata={"help": "auto, cpu or cuda"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for activation memory"})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config file (run under torchrun / "
                                                                  "accelerate launch; or use an accelerate config)"})
    keep: str = field(default="last", metadata={"help": "the weights a run keeps: last, or best-epoch (the epoch best "
                                                        "on select_on; ties: the earlier)"})
    select_on: str = field(default="gen:mbpp-validation", metadata={"help": "best-epoch: an eval task (mbpp: pass@1) "
                                                                            "or a behaviour record "
                                                                            "gen:<source>[:<metric>] "
                                                                            "(gen:mbpp-validation: asserts passed)"})
    select_limit: int | None = field(default=None,
                                     metadata={"help": "best-epoch: first N items of select_on (none: all)"})
    logging_steps: int = field(default=1, metadata={"help": "optimizer steps per loss.jsonl line"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "transformers attention: sdpa, eager, flash_attention_2, ... (default: transformers' choice)"})
    padding_free: bool = field(default=False, metadata={
        "help": "each micro-batch as one row without padding, position_ids restarting per example (needs attention "
                "that keeps them apart: checked)"})
    torch_compile: bool = field(default=False, metadata={"help": "TrainingArguments.torch_compile"})
    use_liger_kernel: bool = field(default=False, metadata={
        "help": "Liger's Triton kernels (CUDA, package liger_kernel); the masked loss stays forgetless's"})
    report_to: tuple[str, ...] = field(default=("none",), metadata={
        "help": "trackers of the Trainer's logs: none, wandb, tensorboard, ... (TensorBoard: checkpoints/runs/)"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the final adapter / model with the Trainer"})
    hub_model_id: str | None = field(default=None, metadata={"help": "hub repository for push_to_hub: user/name"})
    diagnostics_top_k: int = field(default=8, metadata={"help": "singular values kept per module"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        recipe = RECIPES[self.method]
        if recipe.loss != "nll" and self.loss_type != recipe.loss:
            raise ValueError(f"method {self.method!r} needs loss_type={recipe.loss!r}")
        if recipe.kl and self.kl_coef <= 0:
            raise ValueError(f"method {self.method!r} needs kl_coef > 0")
        if self.kl_coef < 0:
            raise ValueError("kl_coef must be >= 0")
        for name in ("lora_r", "batch_size", "grad_accum", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_dropout must be in [0, 1)")
        if self.max_steps < 1 and self.epochs <= 0:
            raise ValueError("set epochs > 0 or max_steps >= 1")
        if self.save_steps < 0 or (self.save_steps >= 1 and self.save_steps != int(self.save_steps)):
            raise ValueError(f"save_steps must be a whole number of steps, a share of the steps in (0, 1), or 0; "
                             f"got {self.save_steps}")
        if self.merge and self.adapter == "full":
            raise ValueError("merge applies to adapters; full fine-tuning already writes the whole model")
        check_selection(self)
        if self.push_to_hub != bool(self.hub_model_id):
            raise ValueError("push_to_hub and hub_model_id go together: set both (hub_model_id=user/name) or neither")
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"report_to 'none' cannot be combined with trackers, got {list(self.report_to)}")
