"""``forgetless run CONFIG.yaml``: a whole comparison, from data to a forgetting report.

Stages, each skipped when its output exists and was made from the same settings, so an
interrupted grid resumes where it stopped:

    score the training data -> mask per method -> train per method (x learning rate)
    -> evaluate base and every tuned model -> retention measures -> report

Everything lands in ``out_dir``: ``scores/``, ``masks/<policy>/``, ``train/<label>/``,
``eval/<label>/``, ``retention/<label>/`` and ``report/``. A ``self-output`` or ``rephrase``
method without ``data`` first generates its training set from the target data with the base
model (``generate/<method>/``, the authors' settings unless ``generate`` overrides them).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple

from forgetless.lm import artifacts, distributed
from forgetless.config import ConfigError, Overrides, build, check_overrides
from forgetless.eval.stage import EvalConfig
from forgetless.generate.config import GenerateConfig
from forgetless.core.recipes import GENERATED, RECIPES
from forgetless.core.verdicts import VerdictConfig
from forgetless.grid import (MethodSpec, TrainPoint, frontier_grid, groups, measured_models,  # noqa: F401
                             train_points, tuned_model)
from forgetless.mask.stage import MASKED_FILE, run_mask
from forgetless.report.frontier import FrontierSettings
from forgetless.report.stage import ReportConfig, run_report
from forgetless.retention.stage import RetentionConfig
from forgetless.train.config import CHECKPOINTING, TrainConfig
from forgetless.train.probe import ProbeConfig, probe_callbacks
from forgetless.lm.modeling import EMBEDDED
from forgetless.lm.stamps import STAMP, record_start, run_once, started_with
from forgetless.verdict import fill_model_cards
from forgetless.target import (HOLDOUT, check_draw_size, check_target, default_target, draw_path, holdout_paths,
                               own_data, split_holdout, tau_share_note, write_draw)
from forgetless.score.stage import SCORES_FILE, ScoreConfig, run_score

logger = logging.getLogger(__name__)


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


def write_draws(config: RunConfig) -> None:
    """Each seed's training draw, from the (held-out-less) training data as ``limit`` takes it."""
    if config.draw_size is None:
        return
    source = training_data(config)
    for seed in config.seeds:
        write_draw(source, config.draw_size, seed, config.out_dir, config.limit)
    logger.info("training draws: %d of %s per seed (%s) in %s", config.draw_size, source,
                ", ".join(map(str, config.seeds)), Path(config.out_dir) / "draws")


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


def check_settings(config: RunConfig) -> None:
    """Build every stage's config before any work starts, so a typo fails in seconds, not hours."""
    check_target(config.target, config.data, config.other_target)
    make(ScoreConfig, score_settings(config, training_data(config), "-"), "score")
    check_score_model(config)
    if config.draw_size is not None:
        from forgetless.lm.data import load_examples

        check_draw_size(config.draw_size, len(load_examples(training_data(config), config.limit)), config.data)
    pushed = []
    for point in train_runs(config):
        method = point.method
        method.mask_config(Path("-"), Path("-"))
        cfg = train_config(config, point.label, method, point.lr, "-", point.seed)
        pushed.append(cfg.hub_model_id)
        if generates(method):
            generate_config(config, method, Path("-"), point.seed)
        if method.recipe.data == "replay":
            replay_config(config, method, Path("-"), point.seed)
        if method.interpolate and cfg.adapter == "dora":
            raise ConfigError(f"{method.label}: interpolate: a DoRA adapter does not interpolate "
                              "linearly; use lora, or full")
    repeated = sorted({h for h in pushed if h and pushed.count(h) > 1})
    if repeated:
        raise ConfigError(f"train runs would overwrite each other on the hub ({', '.join(repeated)}): give each "
                          f"method its own hub_model_id (methods: - train: {{hub_model_id: ...}})")
    written = {str(holdout_paths(Path(config.out_dir))["task"])} if holds_out(config) else set()
    for cfg in (s.config for s in measure_stages(config, "base", config.model, None)):
        if isinstance(cfg, EvalConfig):  # every task name must resolve (but the one this run writes)
            from forgetless.eval.stage import resolve_task

            for task in (t for t in cfg.tasks if str(t) not in written):
                resolve_task(task, cfg)


def note_tau_share(config: RunConfig, scores: Path) -> None:
    """Before training: one line per τ of the grid that masks an unusual share of the training responses."""
    import pyarrow.parquet as pq

    from forgetless.mask.stage import flatten_response_nll

    taus = sorted({m.tau for m in config.methods if m.recipe.uses_tau and m.fraction is None})
    if not taus:
        return
    nll = flatten_response_nll(pq.read_table(scores / SCORES_FILE))[0]
    for tau in taus:
        note = tau_share_note(nll, tau, config.data)
        if note:
            logger.warning(note)


def check_score_model(config: RunConfig) -> None:
    """Refuse a scoring model whose tokenizer differs from the trained model's: its scores would be of other tokens."""
    if config.score_model is None or config.score_model == config.model:
        return
    from forgetless.lm.modeling import load_tokenizer
    from forgetless.lm.templates import tokenizer_differences

    differ = tokenizer_differences(load_tokenizer(config.score_model), load_tokenizer(config.model))
    if differ:
        raise ConfigError(f"score_model {config.score_model} and model {config.model} have different tokenizers "
                          f"({', '.join(differ)} differ): one model's scores cannot mask the other's tokens")


def score_settings(config: RunConfig, data: str, out_dir: str, whole: bool = False) -> dict:
    """A replay mix or a training draw (``whole``) is scored whole: ``limit`` already chose its target rows."""
    return {"model": config.score_model or config.model, "limit": None if whole else config.limit,
            "max_length": config.max_length, **config.score, "data": data, "out_dir": out_dir}


def run_experiment(config: RunConfig) -> Path:
    """Run every stage of the comparison; return the report directory.

    The base is measured first, then draw by draw (seed by seed) every run of the draw is trained and measured, so
    an interrupted run keeps whole draws. Under a launcher (``torchrun`` / ``accelerate launch``) every process runs
    the same stages in the same order:
    score, generate, train, eval and retention share their work; mask and report run on the first process alone.
    """
    check_settings(config)
    distributed.start()
    out = Path(config.out_dir)
    if distributed.is_main():
        artifacts.write_json(out / "run_config.json", dataclasses.asdict(config))  # sections: the keys set
        if holds_out(config):
            paths = split_holdout(config.data, config.holdout, config.holdout_seed, out)
            logger.info("target: the held-out share of %s in %s, scored by chrF of greedy answers", config.data,
                        paths["target"])
        write_draws(config)
    distributed.barrier()
    layout, scored, points = run_layout(config, out), set(), train_runs(config)
    measure_models(config, layout, ["base"])
    for seed in dict.fromkeys(p.seed for p in points):  # draw by draw: a draw's models are measured once it is trained
        ours = {p.label: p for p in points if p.seed == seed}
        for point in ours.values():
            train_point(config, layout, point, scored)
        measure_models(config, layout, [lab for lab, m in models_of(config, layout.train).items() if m.run in ours])
    measured = models_of(config, layout.train)
    if distributed.is_main():
        pool_seeds(config, out, measured)
    distributed.barrier()
    report_dir = distributed.on_main(report_run, ReportConfig(run_dir=str(out)))
    if distributed.is_main():
        fill_model_cards(report_dir, layout.train)
    return report_dir


def train_point(config: RunConfig, layout: RunLayout, point: TrainPoint, scored: set) -> None:
    """One training run of the grid, after the stages its data needs (generate or replay, score once per data set,
    mask); each stage skipped when its output exists and was made from the same settings."""
    from forgetless.generate.stage import run_generate
    from forgetless.replay.stage import run_replay
    from forgetless.train.stage import run_train

    label, method, seed = point.label, point.method, point.seed
    out = Path(config.out_dir)
    data = method_data(config, method, out, seed)
    scores = layout.scores[data]
    if data not in scored and generates(method):
        cfg = generate_config(config, method, out, seed)
        run_once(Path(cfg.out_dir), dataclasses.asdict(cfg), lambda c=cfg: run_generate(c), f"generate {method.method}")
    if data not in scored and method.recipe.data == "replay":
        cfg = replay_config(config, method, out, seed)
        run_once(Path(cfg.out_dir), dataclasses.asdict(cfg), lambda c=cfg: distributed.on_main(run_replay, c),
                 f"replay {method.label}")
    if data not in scored:  # the score stage itself reuses an output made from the same inputs
        whole = method.recipe.data == "replay" or drawn(config, seed)
        run_score(make(ScoreConfig, score_settings(config, data, str(scores), whole), "score"))
        scored.add(data)
        if data == training_data(config, seed) and distributed.is_main():
            note_tau_share(config, scores)
    masks = distributed.on_main(run_mask, method.mask_config(scores, layout.masks[label]))
    cfg = train_config(config, label, method, point.lr, str(masks / MASKED_FILE), seed)
    settings = {**dataclasses.asdict(cfg), **({"probe": config.probe} if config.probe else {}),
                "data_digest": artifacts.file_digest(masks / MASKED_FILE)}
    def train(c):  # the checkpoint probe is set up (and earlier probes cleared) only when the run trains
        c = continue_or_restart(c, settings)
        return run_train(c, callbacks=probe_callbacks(config.probe, config.model, c, out / "probe_cache"))

    run_once(Path(cfg.output_dir), settings, lambda c=cfg: train(c), f"train {label}", ignore=CHECKPOINTING)


def continue_or_restart(cfg: TrainConfig, settings: dict) -> TrainConfig:
    """``cfg`` to continue from the last checkpoint of an interrupted training of the same settings (``resume``),
    or, after a change of settings, to start over with that run's checkpoints removed."""
    from forgetless.train.stage import last_checkpoint

    out = Path(cfg.output_dir)
    kept = last_checkpoint(out)
    resume = kept is not None and started_with(out, settings, ignore=CHECKPOINTING)
    distributed.barrier()  # every process has decided before the first changes anything
    if distributed.is_main():
        if kept and not resume:
            logger.info("%s: its checkpoints are of other settings; starting over", out)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        record_start(out, settings)
    if resume:
        logger.info("%s: continuing the interrupted training from %s", out, Path(kept).name)
    distributed.barrier()
    return dataclasses.replace(cfg, resume=resume)


def measure_models(config: RunConfig, layout: RunLayout, labels: list[str]) -> None:
    """Every measure stage of the trained models ``labels`` (of :func:`models_of`), each skipped when done."""
    measured = models_of(config, layout.train)  # after training: a run's adapter directory decides its model
    for label in labels:
        m = measured[label]
        trained = artifacts.file_digest(layout.train[m.run] / STAMP) if m.run else None
        for stage in measure_stages(config, label, m.model, m.adapter, m.alpha):
            cfg = stage.config
            run_once(Path(cfg.output_dir),
                     {**dataclasses.asdict(cfg), "trained_digest": trained, "code": stage_code(cfg)},
                     lambda c=cfg, f=stage.run: f(c), stage.name)


def report_run(cfg) -> Path:
    """``forgetless report``: a run directory's report (its inputs read from the run's layout), or the runs named."""
    if not cfg.run_dir:
        return run_report(cfg)
    report_cfg, grid = report_inputs(cfg.run_dir, cfg.output_dir)
    return run_report(report_cfg, grid)


def models_of(config: RunConfig, train_dirs: dict[str, Path]):
    """label -> :class:`forgetless.grid.Measured` of the base, every tuned model and every interpolation."""
    return measured_models(config.model, train_runs(config), train_dirs)


def pool_seeds(config: RunConfig, out: Path, measured) -> None:
    """Each group of several seeds: its measure directories pooled item by item into ``retention/<group>`` (and
    ``eval/<group>``). Always redone: it reads the seeds' finished records and takes seconds."""
    import shutil

    from forgetless.retention.records import pool_records

    for group, labels in groups(measured).items():
        if labels == [group]:
            continue
        for stage in ("retention", "eval"):
            dirs = [out / stage / label for label in labels]
            if all(d.is_dir() for d in dirs):
                shutil.rmtree(out / stage / group, ignore_errors=True)
                pool_records(dirs, out / stage / group)


def report_inputs(run_dir: str | Path, output_dir: str | None = None):
    """(ReportConfig, frontier inputs or None) of a finished ``forgetless run`` directory: what
    ``forgetless run`` and ``forgetless report RUN_DIR`` both report."""
    out = Path(run_dir)
    if not (out / "run_config.json").is_file():
        raise FileNotFoundError(f"{out} is not a `forgetless run` directory (no run_config.json)")
    config = make(RunConfig, artifacts.read_json(out / "run_config.json"), "run_config.json")
    layout = run_layout(config, out)
    points = train_runs(config)
    measured = models_of(config, layout.train)
    # One report row per group (the seeds pooled); its training diagnostics are its first seed's.
    runs, first_train = [], {}
    for group, labels in groups(measured).items():
        m = measured[labels[0]]
        for stage in measure_stages(config, group, m.model, m.adapter, m.alpha):
            runs.append(f"{group}={Path(stage.config.output_dir).parent / group}")
        if m.run is not None and m.alpha == 1.0:
            first_train.setdefault(group, layout.train[m.run])
    cfg = ReportConfig(runs=tuple(runs), train_dirs=tuple(f"{label}={d}" for label, d in first_train.items()),
                       output_dir=output_dir or str(out / "report"), base="base", target=run_target(config),
                       tasks=report_tasks(config), tokenizer=config.model,
                       scores=tuple(f"{label}={d / SCORES_FILE}" for label, d in layout.ppl_sources.items()),
                       token_view=str(layout.token_view / MASKED_FILE), recipe_sources=recipe_sources(config))
    grid = None
    # The verdicts compare recipes at the same dose, so two recipes are enough; curves (several learning rates, WiSE-FT
    # or probe points) add the matched-gain reading.
    if config.retention is not None and len(groups(measured)) > 2:
        grid = {"grid": frontier_grid(points, measured, lambda group: out / "retention" / group, layout.train,
                                      config.train.get("learning_rate")),
                "base_dir": out / "retention" / "base", "base_eval_dir": out / "eval" / "base", **config.frontier}
        grid["verdicts"] = with_reference(grid.get("verdicts"), config.methods)
        for point in grid["grid"]:  # the target may be an eval task (the held-out share of the user's data)
            point["eval_dir"] = out / "eval" / Path(point["retention_dir"]).name
    return cfg, grid


def with_reference(verdicts, methods) -> VerdictConfig | dict | None:
    """The verdict settings with STM (the first method that trains as stm: stm or auto-tau) as the reference
    every other recipe is compared with, unless the config names one; as given when no method is STM."""
    stm = next((m.label for m in methods if (m.recipe.trains_as or m.recipe.name) == "stm"), None)
    if isinstance(verdicts, VerdictConfig):
        return verdicts if verdicts.reference or stm is None else dataclasses.replace(verdicts, reference=stm)
    verdicts = dict(verdicts or {})
    if stm is not None:
        verdicts.setdefault("reference", stm)
    return verdicts or None


def recipe_sources(config: RunConfig) -> tuple[str, ...]:
    """``label=source`` of each recipe that trains on prompts of a source other recipes do not: replay (its
    replay_source) and the generated sets of self-output / rephrase (the target data's prompts, the base's answers)."""
    out = []
    for method in config.methods:
        if method.recipe.data == "replay":
            out.append(f"{method.label}={method.replay_source}")
        elif generates(method):
            out.append(f"{method.label}={config.data}")
    return tuple(dict.fromkeys(out))


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


def report_tasks(config: RunConfig) -> tuple[str, ...]:
    """The report's columns: each task once, by its primary metric (olmo-eval's for multiple choice)."""
    from forgetless.retention.behaviour import table_tasks
    from forgetless.retention.olmo_tasks import primary_metric

    tasks: list[str] = []
    for cfg in (s.config for s in measure_stages(config, "base", config.model, None)):
        if isinstance(cfg, EvalConfig):
            tasks += [HOLDOUT if t == str(holdout_paths(config.out_dir)["task"]) else t for t in cfg.tasks]
        else:
            tasks += [t if primary_metric(t) == "acc" else f"{t}:{primary_metric(t)}" for t in cfg.mc_tasks]
            tasks += [f"drift:{src}" for src in cfg.drift_sources]
            for src in cfg.behaviour_sources:
                tasks += table_tasks(src)
            if cfg.heldout_source:
                kinds = ("all", "kept", "masked") if holds_out(config) else ("kept", "masked")
                tasks += [f"heldout:{cfg.heldout_source}:{kind}" for kind in kinds]
    return tuple(sorted(tasks, key=lambda t: t != run_target(config)))

