"""The report side of a ``forgetless run``: what its report reads from the run directory.

:func:`report_inputs` turns a finished run's layout into the report's config and frontier inputs (the report
columns, the verdicts' reference recipe, the recipes that train on another source's prompts); :func:`pool_seeds`
pools a group's seeds item by item first. ``forgetless report RUN_DIR`` is :func:`report_run`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from forgetless.lm import artifacts
from forgetless.eval.stage import EvalConfig
from forgetless.core.verdicts import VerdictConfig
from forgetless.grid import frontier_grid, groups, measured_models
from forgetless.mask.stage import MASKED_FILE
from forgetless.report.stage import ReportConfig, run_report
from forgetless.runplan import (RunConfig, generates, holds_out, make, measure_stages, run_layout, run_target,
                                train_runs)
from forgetless.target import HOLDOUT, holdout_paths
from forgetless.score.stage import SCORES_FILE


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
