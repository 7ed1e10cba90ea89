"""The settings and paths of a ``forgetless run``, built from its :class:`RunConfig` without running anything.

:class:`RunConfig` itself; each stage's config (train, generate, replay, score, eval and retention) as the run sets
it; which data each training run reads (its own, generated, a replay mix, a seed's draw, the held-out-less target
data); and where every stage writes (:func:`run_layout`). :mod:`forgetless.run` runs the stages in order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple

from forgetless.config import ConfigError, Overrides, build, check_overrides
from forgetless.eval.stage import EvalConfig
from forgetless.generate.config import GenerateConfig
from forgetless.core.recipes import GENERATED, RECIPES
from forgetless.grid import MethodSpec, TrainPoint, train_points
from forgetless.report.frontier import FrontierSettings
from forgetless.retention.stage import RetentionConfig
from forgetless.train.config import TrainConfig
from forgetless.train.probe import ProbeConfig
from forgetless.lm.modeling import EMBEDDED
from forgetless.target import default_target, draw_path, holdout_paths, own_data
from forgetless.score.stage import ScoreConfig


@dataclass(frozen=True)
class RunConfig:
    """A comparison of fine-tuning recipes on one model and one target data set."""

    out_dir: str = field(default="runs/demo", metadata={"help": "where every stage writes"})
    model: str = field(default=EMBEDDED, metadata={"help": "base model"})
    score_model: str | None = field(default=None, metadata={"help": "model whose token perplexities decide the masks "
                                                                    "(default: `model`), e.g. a larger one of the same "
                                                                    "family; it must have the same tokenizer"})
    data: str = field(default="mbpp-train", metadata={"help": "target-task training data"})
    limit: int | None = field(default=None, metadata={"help": "first N training examples"})
    max_length: int = field(default=1024, metadata={"help": "tokens per training example"})
    methods: tuple[MethodSpec, ...] = field(default=(MethodSpec("sft"), MethodSpec("stm")), metadata={
        "help": f"the recipes, each {{method: {'|'.join(RECIPES)}, tau, "
                "learning_rates: [its own axis], interpolate: [WiSE-FT alphas], replay_fraction, replay_source, name, "
                "train: {...}} (forgetless.grid.MethodSpec)"})
    learning_rates: tuple[float, ...] = field(default=(), metadata={"help": "learning-rate axis: every method at each "
                                                                            "(empty: train.learning_rate)"})
    seeds: tuple[int, ...] = field(default=(), metadata={"help": "training-seed axis: every run at each seed, pooled "
                                                                 "item by item in the report (empty: train.seed)"})
    draw_size: int | None = field(default=None, metadata={"help": "training draws: with `seeds`, the run at seed s "
                                                                  "trains on its own seeded draw of this many of the "
                                                                  "training examples (the same draw for every recipe "
                                                                  "at that seed), so the examples drawn vary and not "
                                                                  "only the seed (default: every run "
                                                                  "trains on all of them)"})
    # The stage sections: each sets some fields of its stage's config (the run decides the rest), checked on load.
    score: Overrides[ScoreConfig] = field(default_factory=lambda: Overrides(ScoreConfig),
                                          metadata={"help": "ScoreConfig overrides (batch_tokens, device, ...)"})
    train: Overrides[TrainConfig] = field(default_factory=lambda: Overrides(TrainConfig),
                                          metadata={"help": "TrainConfig overrides shared by every method"})
    generate: Overrides[GenerateConfig] = field(default_factory=lambda: Overrides(GenerateConfig), metadata={
        "help": "GenerateConfig overrides for self-output/rephrase without data (samples, batch_size, device, ...)"})
    eval: Overrides[EvalConfig] | None = field(default_factory=lambda: Overrides(EvalConfig), metadata={
        "help": "EvalConfig overrides (tasks, limit, ...); null skips generative evaluation"})
    retention: Overrides[RetentionConfig] | None = field(default=None, metadata={
        "help": "RetentionConfig overrides (mc_tasks, drift_sources, ...); null skips them"})
    target: str | None = field(default=None, metadata={"help": "the target task in the report (a task name, or your "
                                                               "task file: forgetless.eval.tasks.custom); every other "
                                                               "task is non-target. Default: with your own data, a "
                                                               "held-out share of it (see holdout); with a "
                                                               "bundled split, its task"})
    holdout: float = field(default=0.1, metadata={"help": "your own data without a target: the seeded share held out "
                                                          "as the target set (at least 4 examples), scored by chrF of "
                                                          "greedy answers against the references"})
    holdout_seed: int = field(default=0, metadata={"help": "seed of the held-out split"})
    other_target: bool = field(default=False,
                               metadata={"help": "allow a target on another data set than data (refused otherwise)"})
    probe: Overrides[ProbeConfig] | None = field(default=None, metadata={
        "help": "ProbeConfig settings: evaluate a probe every N steps of each run (null: none)"})
    frontier: Overrides[FrontierSettings] = field(default_factory=lambda: Overrides(FrontierSettings), metadata={
        "help": "frontier report: gain (gain_all, gain_kept...), retention (mc_retention, top1_agreement...), "
                "verdicts"})

    def __post_init__(self):
        check_overrides(self)  # sections given as plain mappings (a RunConfig built in Python) are checked too
        # one recipe may come twice on different learning rates (e.g. WiSE-FT at one of them only), not twice on one
        labels = [p.label for p in train_points(self.methods, self.learning_rates, self.seeds)]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two methods share a label: {sorted({x for x in labels if labels.count(x) > 1})}; "
                             f"give them distinct `name`s or learning rates")
        if any(lr <= 0 for lr in self.learning_rates):
            raise ValueError("learning rates must be positive")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {list(self.seeds)}")
        if "model" in self.score:
            raise ValueError("set the scoring model with score_model, not score.model")
        if self.draw_size is not None and (self.draw_size < 1 or not self.seeds):
            raise ValueError(f"draw_size {self.draw_size}: a draw size is >= 1 and needs `seeds` (one draw per seed)")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout is a share in (0, 1), got {self.holdout}")


def make(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """A stage config from merged settings; unknown keys name the section they came from."""
    try:
        return build(cls, values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def train_runs(config: RunConfig) -> list[TrainPoint]:
    """Each training run of the grid (:class:`forgetless.grid.TrainPoint`): methods x learning rates x seeds."""
    return train_points(config.methods, config.learning_rates, config.seeds)


def train_config(config: RunConfig, label: str, method: MethodSpec, lr: float | None, data: str,
                 seed: int | None = None):
    implied = method.recipe.train
    values = {"model": config.model, **config.train, "method": method.method, **implied, **method.train,
              "data": data, "output_dir": str(Path(config.out_dir) / "train" / label)}
    if lr is not None:
        values["learning_rate"] = lr
    if seed is not None:
        values["seed"] = seed
    return make(TrainConfig, values, f"train ({label})")


class MeasureStage(NamedTuple):
    """One measurement of one model: the stage's config, the function that runs it, and its name in the log."""

    config: EvalConfig | RetentionConfig
    run: Callable[[Any], Path]
    name: str


def measure_stages(config: RunConfig, label: str, model: str, adapter: str | None,
                   alpha: float = 1.0) -> list[MeasureStage]:
    """Each measurement of one model; a WiSE-FT interpolation (``alpha`` < 1) is measured by retention only (the
    eval stage loads no interpolated model)."""
    from forgetless.eval.stage import run_eval
    from forgetless.retention.stage import run_retention

    out, common, stages = Path(config.out_dir), {"model": model, "adapter": adapter}, []
    # A fully fine-tuned model needs its base named for drift; an adapter's base is the adapter disabled.
    tuned_full = model != config.model
    retention_common = {**common, "base_model": config.model if tuned_full else None}
    if alpha != 1.0:
        retention_common["adapter_scale"] = alpha
    eval_settings, retention = config.eval, config.retention
    if holds_out(config):  # the held-out share is the target: its task joins the eval, its NLL the retention
        task = str(holdout_paths(out)["task"])
        eval_settings = {**(eval_settings or {}), "tasks": [*(eval_settings or {}).get("tasks", []), task]}
        retention = None if retention is None else {**retention, "heldout_source": str(holdout_paths(out)["target"])}
    if eval_settings is not None and alpha == 1.0:
        cfg = make(EvalConfig, {**eval_settings, **common, "output_dir": str(out / "eval" / label)}, "eval")
        stages.append(MeasureStage(cfg, run_eval, f"eval {label}"))
    if retention is not None:
        # No behaviour source reads a task the recipes train on (the target data, as far as `limit` takes it).
        # Nor one that a recipe's best-epoch selection reads.
        trained = {"behaviour_exclude": (f"{config.data}:{config.limit}" if config.limit else config.data,
                                         *selection_data(config))}
        cfg = make(RetentionConfig, {**trained, **retention, **retention_common,
                                     "output_dir": str(out / "retention" / label)}, "retention")
        stages.append(MeasureStage(cfg, run_retention, f"retention {label}"))
    return stages


def selection_data(config: RunConfig) -> tuple[str, ...]:
    """The data that some recipe's ``keep=best-epoch`` selection reads (``source`` or ``source:N``), in order.

    ``select_on`` ``gen:<source>[:<metric>]`` reads ``source``; an eval task of the MBPP family (``mbpp``) reads the
    MBPP validation split (:data:`forgetless.retention.answers.SELECTION_SPLIT`); other eval tasks read no MBPP task.
    """
    from forgetless.retention.answers import SELECTION_SPLIT

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in ("keep", "select_on",
                                                                                          "select_limit")}
    found: list[str] = []
    for method in config.methods:
        values = {**defaults, **config.train, **method.recipe.train, **method.train}
        if values["keep"] != "best-epoch":
            continue
        select_on = str(values["select_on"])
        source = select_on[4:].split(":")[0] if select_on.startswith("gen:") else (
            SELECTION_SPLIT if select_on.startswith("mbpp") else None)
        spec = source and (f"{source}:{values['select_limit']}" if values["select_limit"] else source)
        if spec and spec not in found:
            found.append(spec)
    return tuple(found)


def stage_code(cfg) -> Any:
    """What computes a measure stage's results (task hashes, or the retention code digest): a change re-runs it."""
    if isinstance(cfg, EvalConfig):
        from forgetless.eval.stage import code_key

        return code_key(cfg)
    from forgetless.retention.measures import code_key

    return code_key()


def generates(method: MethodSpec) -> bool:
    """True when ``method`` trains on data the generate stage makes (self-output, rephrase without ``data``)."""
    return method.data is None and method.method in GENERATED


def method_data(config: RunConfig, method: MethodSpec, out: Path, seed: int | None = None) -> str:
    """The training data of ``method`` at ``seed``: its own ``data``, the generated set, the replay mix, or the
    target data (a run with ``draw_size``: the seed's draw of it, and the generated set or mix made from that)."""
    draw = f"-s{seed}" if drawn(config, seed) else ""
    if method.recipe.data == "replay":
        from forgetless.replay.stage import DATA_FILE

        return str(out / "replay" / f"{method.replay_source}-f{method.replay_fraction:g}{draw}" / DATA_FILE)
    if generates(method):
        from forgetless.generate.stage import DATA_FILE

        return str(out / "generate" / f"{method.method}{draw}" / DATA_FILE)
    return method.data or training_data(config, seed)


def holds_out(config: RunConfig) -> bool:
    """True when the run's target is a held-out share of the user's own data."""
    return config.target is None and own_data(config.data)


def training_data(config: RunConfig, seed: int | None = None) -> str:
    """The target-task training data: ``data``, less its held-out share when that is the target; with
    ``draw_size``, the draw of the run at ``seed`` (:func:`forgetless.target.write_draw`)."""
    if drawn(config, seed):
        return str(draw_path(config.out_dir, seed))
    return str(holdout_paths(config.out_dir)["train"]) if holds_out(config) else config.data


def drawn(config: RunConfig, seed: int | None) -> bool:
    """True when the run at ``seed`` trains on a draw of the training data (``draw_size`` set)."""
    return config.draw_size is not None and seed is not None


def run_target(config: RunConfig) -> str:
    """The report's target task: ``target``, or the default of :func:`forgetless.target.default_target`."""
    if config.target is not None:
        return config.target
    sources = tuple((config.retention or {}).get("behaviour_sources", ()))
    return default_target(config.data, sources)


def generate_config(config: RunConfig, method: MethodSpec, out: Path, seed: int | None = None):
    """The generate stage of a self-output/rephrase method: the base model answers the target data's prompts."""
    values = {"model": config.model, "data": training_data(config, seed), "limit": data_limit(config, seed),
              "max_length": config.max_length, **config.generate, "method": GENERATED[method.method],
              "out_dir": str(Path(method_data(config, method, out, seed)).parent)}
    return make(GenerateConfig, values, f"generate ({method.method})")


def measured_prompts(config: RunConfig, source: str) -> tuple[int, tuple[str, ...]]:
    """(how many of ``source``'s first items a measure reads, their prompt texts): what replay must not train on."""
    from forgetless.replay.stage import prompt_text
    from forgetless.retention.answers import prompt_set

    reads = []
    for cfg in (s.config for s in measure_stages(config, "base", config.model, None)):
        if isinstance(cfg, EvalConfig):  # a task named like the source reads its items
            reads += [cfg.limit] if source in cfg.tasks else []
            continue
        reads += [cfg.limit(source)] if source in cfg.behaviour_sources else []
        reads += [cfg.drift_limit] if source in cfg.drift_sources else []
        reads += [cfg.heldout_limit] if source == cfg.heldout_source else []
    if not reads:
        return 0, ()
    limit = None if None in reads else max(reads)
    ids, messages, _ = prompt_set(source, limit)
    return len(ids), tuple(prompt_text(m) for m in messages)


def data_limit(config: RunConfig, seed: int | None) -> int | None:
    """``limit`` of the stages that read the training data: none on a draw (``limit`` already made it)."""
    return None if drawn(config, seed) else config.limit


def replay_config(config: RunConfig, method: MethodSpec, out: Path, seed: int | None = None):
    """The replay stage of a replay method: the target data plus the base's answers to unmeasured prompts."""
    from forgetless.replay.stage import ReplayConfig, candidates

    count, texts = measured_prompts(config, method.replay_source)
    skip = count if method.replay_skip is None else method.replay_skip
    candidates(method.replay_source, skip, set(texts))  # refuses an overlap before any work
    return make(ReplayConfig, {"model": config.model, "data": training_data(config, seed),
                               "limit": data_limit(config, seed), "source": method.replay_source,
                               "fraction": method.replay_fraction, "skip": skip, "measured": texts,
                               "out_dir": str(Path(method_data(config, method, out, seed)).parent)},
                f"replay ({method.label})")


def score_settings(config: RunConfig, data: str, out_dir: str, whole: bool = False) -> dict:
    """A replay mix or a training draw (``whole``) is scored whole: ``limit`` already chose its target rows."""
    return {"model": config.score_model or config.model, "limit": None if whole else config.limit,
            "max_length": config.max_length, **config.score, "data": data, "out_dir": out_dir}


@dataclass(frozen=True)
class RunLayout:
    """Where each stage of a run writes (:func:`run_layout`)."""

    scores: dict[str, Path]  # training data -> its score directory (one per data set, shared by the runs on it)
    masks: dict[str, Path]  # training run label -> its mask directory
    train: dict[str, Path]  # training run label -> its train directory
    token_view: Path  # the mask directory the report's token view shows
    ppl_sources: dict[str, Path]  # report name of each scored data set ('ground truth': the target data) -> scores


def run_layout(config: RunConfig, out: Path) -> RunLayout:
    """Where each stage of ``config`` writes under ``out`` (the one place the layout is decided)."""
    scores: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    train: dict[str, Path] = {}
    first_mask: dict[str, Path] = {}
    points = train_runs(config)
    targets = {training_data(config, p.seed) for p in points} | {training_data(config)}
    for p in points:
        data = method_data(config, p.method, out, p.seed)
        scores[data] = out / "scores" / data_name(config, data)
        masks[p.label] = out / "masks" / f"{scores[data].name}-{p.method.label}"
        first_mask.setdefault(p.method.method, masks[p.label])
        train[p.label] = out / "train" / p.label
    # The token view shows what STM drops; without an STM method, the first method's mask.
    view = first_mask.get("stm") or first_mask.get("auto-tau") or next(iter(first_mask.values()))
    ppl_sources = {("ground truth" if data in targets else data_name(config, data)): d for data, d in scores.items()}
    return RunLayout(scores=scores, masks=masks, train=train, token_view=view, ppl_sources=ppl_sources)


def data_name(config: RunConfig, data: str) -> str:
    """A training set's name in the layout: 'target', a generate output's directory (its file is
    always data.jsonl), or the file's stem."""
    from forgetless.generate.stage import DATA_FILE

    if data == training_data(config):
        return "target"
    return Path(data).parent.name if Path(data).name == DATA_FILE else Path(data).stem
