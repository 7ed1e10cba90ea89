"""``forgetless run CONFIG.yaml``: a whole comparison, from data to a forgetting report.

Stages, each skipped when its output exists and was made from the same settings, so an
interrupted grid resumes where it stopped:

    score the training data -> mask per method -> train per method (x learning rate)
    -> evaluate base and every tuned model -> retention measures -> report

Everything lands in ``out_dir``: ``scores/``, ``masks/<policy>/``, ``train/<label>/``,
``eval/<label>/``, ``retention/<label>/`` and ``report/``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from forgetless.lm import artifacts
from forgetless.config import ConfigError, build
from forgetless.mask.stage import MASKED_FILE, MaskConfig, run_mask
from forgetless.lm.modeling import EMBEDDED
from forgetless.score.stage import SCORES_FILE, ScoreConfig, run_score

logger = logging.getLogger(__name__)

STAMP = ".run_stamp.json"

# method -> (masking policy, TrainConfig fields the method implies)
METHOD_POLICIES: dict[str, tuple[str, dict[str, Any]]] = {
    "sft": ("none", {}),
    "stm": ("threshold", {}),
    "auto-tau": ("auto-tau", {"method": "stm"}),
    "random-mask": ("random", {}),
    "inverse-mask": ("inverse", {}),
    "soft": ("inverse-ppl", {}),
    "kl": ("none", {}),
    "weight-decay": ("none", {"method": "sft"}),
    "self-output": ("none", {}),
    "rephrase": ("none", {}),
}


@dataclass(frozen=True)
class MethodSpec:
    """One recipe of the comparison."""

    method: str = field(metadata={"help": f"one of {', '.join(METHOD_POLICIES)}"})
    name: str | None = field(default=None, metadata={"help": "label in the report (default: the method, with tau)"})
    tau: float = field(default=2.5, metadata={"help": "perplexity threshold (stm) or the count to match (random-mask, inverse-mask)"})
    fraction: float | None = field(default=None, metadata={"help": "target masked fraction (auto-tau; or the count for random/inverse)"})
    seed: int = field(default=0, metadata={"help": "seed of the random mask"})
    data: str | None = field(default=None, metadata={"help": "other training data for this method (e.g. self-output from `forgetless generate`)"})
    train: dict[str, Any] = field(default_factory=dict, metadata={"help": "TrainConfig overrides for this method (e.g. kl_coef, weight_decay)"})

    def __post_init__(self):
        if self.method not in METHOD_POLICIES:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHOD_POLICIES)}")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.method in ("stm", "random-mask", "inverse-mask") and self.fraction is None:
            return f"{self.method}-tau{self.tau:g}"
        if self.fraction is not None:
            return f"{self.method}-q{self.fraction:g}"
        return self.method

    def mask_config(self, scores: Path, out: Path) -> MaskConfig:
        policy = METHOD_POLICIES[self.method][0]
        tau = self.tau if policy in ("threshold", "random", "inverse") else math.inf  # others use no tau
        return MaskConfig(scores=str(scores), policy=policy, tau=tau, fraction=self.fraction, seed=self.seed, out_dir=str(out))


@dataclass(frozen=True)
class RunConfig:
    """A comparison of fine-tuning recipes on one model and one target data set."""

    out_dir: str = field(default="runs/demo", metadata={"help": "where every stage writes"})
    model: str = field(default=EMBEDDED, metadata={"help": "base model"})
    data: str = field(default="mbpp-train", metadata={"help": "target-task training data"})
    limit: int | None = field(default=None, metadata={"help": "first N training examples"})
    max_length: int = field(default=1024, metadata={"help": "tokens per training example"})
    methods: tuple[MethodSpec, ...] = field(default=(MethodSpec("sft"), MethodSpec("stm")), metadata={"help": "the recipes"})
    learning_rates: tuple[float, ...] = field(default=(), metadata={"help": "learning-rate axis: every method at each (empty: train.learning_rate)"})
    score: dict[str, Any] = field(default_factory=dict, metadata={"help": "ScoreConfig overrides (batch_tokens, device, ...)"})
    train: dict[str, Any] = field(default_factory=dict, metadata={"help": "TrainConfig overrides shared by every method"})
    eval: dict[str, Any] | None = field(default_factory=dict, metadata={"help": "EvalConfig overrides (tasks, limit, ...); null skips generative evaluation"})
    retention: dict[str, Any] | None = field(default=None, metadata={"help": "RetentionConfig overrides (mc_tasks, drift_sources, ...); null skips them"})
    target: str = field(default="mbpp", metadata={"help": "the target task's name in the report; every other task is non-target"})
    probe: dict[str, Any] | None = field(default=None, metadata={"help": "ProbeConfig settings: evaluate a probe every N steps of each run (null: none)"})
    frontier: dict[str, Any] = field(default_factory=dict, metadata={"help": "frontier report: gain (gain_all, gain_kept...), retention (mc_retention, top1_agreement...)"})

    def __post_init__(self):
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two methods share a label: {labels}; give them distinct `name`s")
        if any(lr <= 0 for lr in self.learning_rates):
            raise ValueError("learning rates must be positive")


def stage_done(out: Path, settings: dict) -> bool:
    """True when ``out`` holds a finished stage made with ``settings`` (compared as JSON: tuples read back as lists)."""
    stamp = out / STAMP
    if not stamp.is_file():
        return False
    changed = artifacts.stale_fields(artifacts.read_json(stamp), settings)
    if changed:
        logger.info("%s: re-running, %s changed", out, ", ".join(changed))
    return not changed


def run_once(out: Path, settings: dict, fn: Callable[[], Any], what: str) -> Path:
    """Run ``fn`` unless ``out`` already holds its result for the same ``settings``."""
    if stage_done(out, settings):
        logger.info("%s: done already (%s)", what, out)
        return out
    logger.info("%s -> %s", what, out)
    fn()
    artifacts.write_json(out / STAMP, settings)
    return out


def make(cls: type, values: dict[str, Any], where: str) -> Any:
    """A stage config from merged settings; unknown keys name the section they came from."""
    try:
        return build(cls, values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def train_runs(config: RunConfig) -> list[tuple[str, MethodSpec, float | None]]:
    """(label, method, learning rate) for each point of the grid."""
    if not config.learning_rates:
        return [(m.label, m, None) for m in config.methods]
    return [(f"{m.label}@lr{lr:g}", m, lr) for m in config.methods for lr in config.learning_rates]


def train_config(config: RunConfig, label: str, method: MethodSpec, lr: float | None, data: str):
    from forgetless.train.stage import TrainConfig

    implied = METHOD_POLICIES[method.method][1]
    values = {"model": config.model, **config.train, "method": method.method, **implied, **method.train,
              "data": data, "output_dir": str(Path(config.out_dir) / "train" / label)}
    if lr is not None:
        values["learning_rate"] = lr
    return make(TrainConfig, values, f"train ({label})")


def measure_stages(config: RunConfig, label: str, model: str, adapter: str | None) -> list[tuple[Any, Callable, str]]:
    """(config, stage function, name) of each measurement of one model."""
    from forgetless.eval.stage import EvalConfig, run_eval
    from forgetless.retention.stage import RetentionConfig, run_retention

    out, common, stages = Path(config.out_dir), {"model": model, "adapter": adapter}, []
    # A fully fine-tuned model needs its base named for drift; an adapter's base is the adapter disabled.
    tuned_full = model != config.model
    retention_common = {**common, "base_model": config.model if tuned_full else None}
    if config.eval is not None:
        cfg = make(EvalConfig, {**config.eval, **common, "output_dir": str(out / "eval" / label)}, "eval")
        stages.append((cfg, run_eval, f"eval {label}"))
    if config.retention is not None:
        cfg = make(RetentionConfig, {**config.retention, **retention_common, "output_dir": str(out / "retention" / label)}, "retention")
        stages.append((cfg, run_retention, f"retention {label}"))
    return stages


def check_settings(config: RunConfig) -> None:
    """Build every stage's config before any work starts, so a typo fails in seconds, not hours."""
    make(ScoreConfig, score_settings(config, config.data, "-"), "score")
    pushed = []
    for label, method, lr in train_runs(config):
        method.mask_config(Path("-"), Path("-"))
        pushed.append(train_config(config, label, method, lr, "-").hub_model_id)
    repeated = sorted({h for h in pushed if h and pushed.count(h) > 1})
    if repeated:
        raise ConfigError(f"train runs would overwrite each other on the hub ({', '.join(repeated)}): give each "
                          f"method its own hub_model_id (methods: - train: {{hub_model_id: ...}})")
    measure_stages(config, "base", config.model, None)


def score_settings(config: RunConfig, data: str, out_dir: str) -> dict:
    return {"model": config.model, "limit": config.limit, "max_length": config.max_length, **config.score, "data": data, "out_dir": out_dir}


def run_experiment(config: RunConfig) -> Path:
    """Run every stage of the comparison; return the report directory."""
    from forgetless.report.stage import ReportConfig, run_report
    from forgetless.train.stage import run_train

    check_settings(config)
    out = Path(config.out_dir)
    artifacts.write_json(out / "run_config.json", dataclasses.asdict(config))
    layout, scored = run_layout(config, out), set()
    for label, method, lr in train_runs(config):
        data = method.data or config.data
        scores = layout["scores"][data]
        if data not in scored:  # the score stage itself reuses an output made from the same inputs
            run_score(make(ScoreConfig, score_settings(config, data, str(scores)), "score"))
            scored.add(data)
        masks = run_mask(method.mask_config(scores, layout["masks"][label]))
        cfg = train_config(config, label, method, lr, str(masks / MASKED_FILE))
        settings = {**dataclasses.asdict(cfg), **({"probe": config.probe} if config.probe else {})}
        run_once(Path(cfg.output_dir), settings, lambda c=cfg: run_train(c, callbacks=probe_callbacks(config, c, out)),
                 f"train {label}")
    for label, (model, adapter) in models_of(config, layout["train"]).items():
        for cfg, fn, what in measure_stages(config, label, model, adapter):
            run_once(Path(cfg.output_dir), dataclasses.asdict(cfg), lambda c=cfg, f=fn: f(c), what)
    return run_report(ReportConfig(run_dir=str(out)))


def models_of(config: RunConfig, train_dirs: dict[str, Path]) -> dict[str, tuple[str, str | None]]:
    """label -> (model, adapter) of the base and every tuned model."""
    return {"base": (config.model, None), **{label: tuned_model(config.model, d) for label, d in train_dirs.items()}}


def tuned_model(base: str, train_dir: Path) -> tuple[str, str | None]:
    """(model, adapter) of a training run: base + adapter, or the fully fine-tuned model."""
    if (train_dir / "adapter").is_dir():
        return base, str(train_dir / "adapter")
    return str(train_dir / "model"), None


def report_inputs(run_dir: str | Path, output_dir: str | None = None):
    """(ReportConfig, frontier inputs or None) of a finished ``forgetless run`` directory: what
    ``forgetless run`` and ``forgetless report RUN_DIR`` both report."""
    from forgetless.report.stage import ReportConfig

    out = Path(run_dir)
    if not (out / "run_config.json").is_file():
        raise FileNotFoundError(f"{out} is not a `forgetless run` directory (no run_config.json)")
    config = make(RunConfig, artifacts.read_json(out / "run_config.json"), "run_config.json")
    layout = run_layout(config, out)
    runs = [f"{label}={cfg.output_dir}" for label, (model, adapter) in models_of(config, layout["train"]).items()
            for cfg, _, _ in measure_stages(config, label, model, adapter)]
    cfg = ReportConfig(runs=tuple(runs), train_dirs=tuple(f"{label}={d}" for label, d in layout["train"].items()),
                       output_dir=output_dir or str(out / "report"), base="base", target=config.target,
                       tasks=report_tasks(config), tokenizer=config.model,
                       scores=tuple(f"{label}={d / SCORES_FILE}" for label, d in layout["ppl_sources"].items()),
                       token_view=str(layout["token_view"] / MASKED_FILE))
    grid = None
    if config.retention is not None and (config.probe or len(config.learning_rates) > 1):
        grid = {"grid": [{"label": label, "method": m.label, "lr": lr or config.train.get("learning_rate"),
                          "retention_dir": out / "retention" / label, "train_dir": layout["train"][label]}
                         for label, m, lr in train_runs(config)],
                "base_dir": out / "retention" / "base", **config.frontier}
    return cfg, grid


def run_layout(config: RunConfig, out: Path) -> dict:
    """Where each stage of ``config`` writes under ``out`` (the one place the layout is decided)."""
    scores, masks, train, first_mask = {}, {}, {}, {}
    for label, method, lr in train_runs(config):
        data = method.data or config.data
        scores[data] = out / "scores" / ("target" if data == config.data else Path(data).stem)
        masks[label] = out / "masks" / f"{scores[data].name}-{method.label}"
        first_mask.setdefault(method.method, masks[label])
        train[label] = out / "train" / label
    # The token view shows what STM drops; without an STM method, the first method's mask.
    view = first_mask.get("stm") or first_mask.get("auto-tau") or next(iter(first_mask.values()))
    ppl_sources = {("ground truth" if data == config.data else Path(data).stem): d for data, d in scores.items()}
    return {"scores": scores, "masks": masks, "train": train, "token_view": view, "ppl_sources": ppl_sources}


def report_tasks(config: RunConfig) -> tuple[str, ...]:
    """The report's columns: each task once, by its primary metric (olmo-eval's for multiple choice)."""
    from forgetless.retention.behaviour import table_tasks
    from forgetless.retention.olmo_tasks import primary_metric

    tasks: list[str] = []
    for cfg, _, _ in measure_stages(config, "base", config.model, None):
        if hasattr(cfg, "tasks"):
            tasks += [t for t in cfg.tasks]
        else:
            tasks += [t if primary_metric(t) == "acc" else f"{t}:{primary_metric(t)}" for t in cfg.mc_tasks]
            tasks += [f"drift:{src}" for src in cfg.drift_sources]
            for src in cfg.behaviour_sources:
                tasks += table_tasks(src)
            if cfg.heldout_source:
                tasks += [f"heldout:{cfg.heldout_source}:{kind}" for kind in ("kept", "masked")]
    return tuple(sorted(tasks, key=lambda t: t != config.target))


def probe_callbacks(config: RunConfig, train_cfg, out: Path) -> list:
    """The checkpoint probe of ``config.probe`` for one training run (none when it is null)."""
    if not config.probe:
        return []
    import shutil

    from forgetless.lm.modeling import load_tokenizer, model_fingerprint
    from forgetless.train.probe import PROBES_FILE, ProbeCallback, ProbeConfig, retention_probe

    cfg = make(ProbeConfig, config.probe, "probe")
    train_dir = Path(train_cfg.output_dir)
    if not train_cfg.resume:  # a fresh run: earlier probes belong to other settings
        (train_dir / PROBES_FILE).unlink(missing_ok=True)
        shutil.rmtree(train_dir / "probes", ignore_errors=True)
    probe = retention_probe(cfg, load_tokenizer(config.model), train_dir / "probes", out / "probe_cache",
                            model_fingerprint(config.model))
    return [ProbeCallback(train_dir / PROBES_FILE, probe, cfg.every, cfg.guard_metric, cfg.guard_min,
                          guard_restore=cfg.guard_restore)]
