"""``forgetless run CONFIG.yaml``: a whole comparison, from data to a forgetting report.

Stages, each skipped when its output exists and was made from the same settings, so an
interrupted grid resumes where it stopped:

    score the training data -> mask per method -> train per method (x learning rate)
    -> evaluate base and every tuned model -> retention measures -> report

Everything lands in ``out_dir``: ``scores/``, ``masks/<policy>/``, ``train/<label>/``,
``eval/<label>/``, ``retention/<label>/`` and ``report/``. A ``self-output`` or ``rephrase``
method without ``data`` first generates its training set from the target data with the base
model (``generate/<method>/``, the authors' settings unless ``generate`` overrides them).

The settings and paths of every stage are built in :mod:`forgetless.runplan`, the report's inputs in
:mod:`forgetless.runreport`; both are re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from forgetless.lm import artifacts, distributed
from forgetless.config import ConfigError
from forgetless.eval.stage import EvalConfig
from forgetless.core.recipes import GENERATED  # noqa: F401  (re-exported)
from forgetless.grid import (MethodSpec, TrainPoint, frontier_grid, groups, measured_models,  # noqa: F401
                             train_points, tuned_model)
from forgetless.mask.stage import MASKED_FILE, run_mask
from forgetless.report.stage import ReportConfig
from forgetless.runplan import (MeasureStage, RunConfig, RunLayout, data_limit, data_name, drawn,  # noqa: F401
                                generate_config, generates, holds_out, make, measure_stages, measured_prompts,
                                method_data, replay_config, run_layout, run_target, score_settings, selection_data,
                                stage_code, train_config, train_runs, training_data)
from forgetless.runreport import (models_of, pool_seeds, recipe_sources, report_inputs, report_run,  # noqa: F401
                                  report_tasks, with_reference)
from forgetless.train.config import CHECKPOINTING, TrainConfig
from forgetless.train.probe import probe_callbacks
from forgetless.lm.stamps import STAMP, record_start, run_once, started_with
from forgetless.verdict import fill_model_cards
from forgetless.target import check_draw_size, check_target, holdout_paths, split_holdout, tau_share_note, write_draw
from forgetless.score.stage import SCORES_FILE, ScoreConfig, run_score

logger = logging.getLogger(__name__)


def write_draws(config: RunConfig) -> None:
    """Each seed's training draw, from the (held-out-less) training data as ``limit`` takes it."""
    if config.draw_size is None:
        return
    source = training_data(config)
    for seed in config.seeds:
        write_draw(source, config.draw_size, seed, config.out_dir, config.limit)
    logger.info("training draws: %d of %s per seed (%s) in %s", config.draw_size, source,
                ", ".join(map(str, config.seeds)), Path(config.out_dir) / "draws")


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
