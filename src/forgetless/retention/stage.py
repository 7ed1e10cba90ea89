"""The retention stage: ``run_retention(config) -> output dir`` (wired to ``forgetless eval``).

Loads the tuned model (a model, or a base plus a PEFT adapter), evaluates the MC tasks, the
drift from the base on non-target prompts, behaviour on prompt sets (greedy answers against the
base's: working kept, format, accuracy, surprise; graded success on a target set with tests),
and the held-out target NLL by kind, and writes one
record per measure (:mod:`.records`) plus ``config.json`` and ``manifest.json`` (last: it marks
the stage complete). Evaluating the base itself (no adapter, no base_model) gives drift 0 and
the base rows of the report. A re-run after a crash keeps the measures the stage finished, when its settings,
code and weights are the same (:mod:`.progress`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from forgetless.lm import artifacts, distributed
from forgetless.lm.interpolate import blend_weights, check_alpha, scale_lora
from forgetless.lm.model_args import ModelArgs
from forgetless.retention.measures import MeasureSettings, measure_retention
from forgetless.retention.progress import Progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionConfig(MeasureSettings, ModelArgs):
    """The model to measure (:class:`ModelArgs`: the tuned model, or the base its ``adapter`` is loaded on) and
    where to write; what to measure is :class:`MeasureSettings`."""

    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter dir applied on `model`; its base is "
                                                                "`model` with the adapter disabled"})
    base_model: str | None = field(default=None, metadata={"help": "separate base model for drift/held-out (full "
                                                                   "fine-tunes); none: adapter-disabled "
                                                                   "view, or `model` itself"})
    adapter_scale: float = field(default=1.0, metadata={"help": "WiSE-FT interpolation alpha in [0, 1]: base + alpha * "
                                                                "(tuned - base); a LoRA adapter's scale, or a full "
                                                                "fine-tune blended with base_model"})
    output_dir: str = field(default="runs/retention", metadata={"help": "where the records are written"})
    cache_dir: str | None = field(default=None, metadata={"help": "cache of base answers/statistics (default: "
                                                                  "$FORGETLESS_CACHE/retention)"})

    def __post_init__(self):
        super().__post_init__()
        if self.base_model and self.adapter:
            raise ValueError("give either adapter (its base is `model`) or base_model, not both")
        check_alpha(self.adapter_scale)
        if self.adapter_scale != 1.0 and not (self.adapter or self.base_model):
            raise ValueError("adapter_scale: interpolation needs the fine-tune's adapter, or base_model (the base "
                             "weights of a full fine-tune)")


def load_models(config: RetentionConfig):
    """(tuned model, tokenizer, separate base model or None, base id for cache keys)."""
    from forgetless.lm.modeling import load_model, load_model_and_tokenizer, model_fingerprint

    model, tokenizer = load_model_and_tokenizer(config.model, config.revision, config.dtype, config.device)
    base_id = model_fingerprint(config.model, config.revision)
    base = None
    if config.adapter:
        from forgetless.lm.modeling import load_adapter

        model = load_adapter(model, config.adapter, config.model)
        if config.adapter_scale != 1.0:
            scale_lora(model, config.adapter_scale)
    elif config.base_model:
        base = load_model(config.base_model, None, config.dtype, config.device)
        base_id = model_fingerprint(config.base_model)
        if config.adapter_scale != 1.0:
            blend_weights(model, base, config.adapter_scale)
    else:
        # The model is its own base: drift 0, the reference rows of the report. A full
        # fine-tune evaluated this way would wrongly show no drift, so say so.
        logger.warning("retention: no adapter or base_model given; %s is treated as its own base (drift 0)",
                       config.model)
        base = model
    return model, tokenizer, base, base_id


def stage_key(config: RetentionConfig) -> str:
    """What a stage's records are made of: its settings (less where they are written), the measure code, this
    version, and the fingerprints of the model, the adapter and the separate base (their files, not their names)."""
    from forgetless import __version__
    from forgetless.lm.modeling import model_fingerprint
    from forgetless.retention.measures import code_key

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("output_dir", "cache_dir")}
    weights = {name: model_fingerprint(path) if path else None
               for name, path in (("adapter", config.adapter), ("base_model", config.base_model))}
    return artifacts.json_digest({**settings, **weights, "model_fingerprint": model_fingerprint(config.model,
                                  config.revision), "code": code_key(), "version": __version__}, 24,
                                 sort_keys=True, default=str)


def run_retention(config: RetentionConfig) -> Path:
    """Evaluate every retention measure of ``config``; returns the output directory. Under a launcher the
    processes share each measure's batches and the first one writes (:mod:`forgetless.lm.distributed`)."""
    from forgetless.lm.modeling import cache_dir as forgetless_cache

    distributed.start()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(config.cache_dir) if config.cache_dir else forgetless_cache() / "retention"
    if distributed.is_main():
        artifacts.write_json(out / "config.json", dataclasses.asdict(config))
    progress = Progress(out, stage_key(config))
    model, tokenizer, base, base_id = load_models(config)
    started = time.time()
    tasks = list(measure_retention(model, tokenizer, base, config, out, cache, base_id, progress))
    if distributed.is_main():
        artifacts.write_manifest(out, stage="retention", model=config.model, adapter=config.adapter,
                                 adapter_scale=config.adapter_scale, base=base_id, tasks=tasks,
                                 seconds=round(time.time() - started, 1))
    distributed.barrier()
    return out

