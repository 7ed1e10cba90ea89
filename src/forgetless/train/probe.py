"""Checkpoint probes along one training run, and the forgetting guard.

:class:`ProbeCallback` evaluates a probe on the in-memory model every ``every`` optimizer steps
(and at step 0, where a LoRA adapter is still the base) and appends one JSON line per
evaluation to ``probes.jsonl``: ``{"step", "measures": {...}}``. One run then gives a curve of
retention against target gain for the cost of the evaluations. On resume, steps already in
the file are not evaluated again. With ``guard_metric`` / ``guard_min`` it stops training when
the probe's retention falls below the limit (the forgetting guard).

:func:`retention_probe` builds the probe from the retention measures
(:func:`forgetless.retention.measures.measure_retention`: by default MC accuracy on a few items,
drift on a few prompts, held-out kept/masked NLL) and ‖ΔW‖ of the adapter; base-side
quantities are cached so the base is computed once. Each evaluation's records are written to
``probes/step-<N>/`` in the retention record format, so the report can pair items across
steps and methods; measures against the step-0 records come from ``summarize_run``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import TrainerCallback

from forgetless.config import ConfigError, build
from forgetless.lm.modeling import load_tokenizer, model_fingerprint
from forgetless.retention.measures import MeasureSettings, default, measure_retention

logger = logging.getLogger(__name__)

PROBES_FILE = "probes.jsonl"


@dataclass(frozen=True)
class ProbeConfig(MeasureSettings):
    """What the probe measures (the retention measures, fewer items), how often, and the forgetting guard."""

    mc_tasks: tuple[str, ...] = default("mc_tasks", ("arc_easy", "sciq"))
    mc_limit: int | None = default("mc_limit", 40)
    drift_sources: tuple[str, ...] = default("drift_sources", ("gsm8k", "arc_challenge-test"))
    drift_limit: int | None = default("drift_limit", 4)
    behaviour_sources: tuple[str, ...] = default("behaviour_sources", ())
    max_new_tokens: int = default("max_new_tokens", 32)
    heldout_limit: int | None = default("heldout_limit", 12)
    every: int = field(default=4,
                       metadata={"help": "evaluate every N optimizer steps (and at step 0 and the last step)"})
    guard_metric: str | None = field(default=None, metadata={"help": "measure watched by the guard (e.g. mc_retention, "
                                                                     "top1_agreement); none: no guard"})
    guard_min: float | None = field(default=None, metadata={"help": "stop training when guard_metric falls below this"})
    guard_restore: bool = field(default=True, metadata={"help": "on a stop, put back the weights of the last probe "
                                                                "that passed, so the saved model is within the limit "
                                                                "(keeps a CPU copy of the trainable weights: small for "
                                                                "LoRA, the whole model for full)"})

    def __post_init__(self):
        super().__post_init__()
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if (self.guard_metric is None) != (self.guard_min is None):
            raise ValueError("set both guard_metric and guard_min, or neither")


def read_probes(path: str | Path) -> list[dict]:
    """Evaluations in ``probes.jsonl`` (a torn last line, from a crash, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: skipping a torn line", path)
    return rows


@contextlib.contextmanager
def preserved_state(model):
    """Restore every module's train/eval flag after the probe; no gradients inside.

    Training turns the KV cache off (``config.use_cache = False``); the probe's greedy
    generation needs it on, or each new token re-runs the whole sequence.
    """
    modes = {name: m.training for name, m in model.named_modules()}
    cfg = getattr(model, "config", None)
    use_cache = getattr(cfg, "use_cache", None)
    if cfg is not None:
        cfg.use_cache = True
    try:
        with torch.no_grad():
            yield model
    finally:
        for name, m in model.named_modules():
            if name in modes:
                m.training = modes[name]
        if cfg is not None:
            cfg.use_cache = use_cache


class ProbeCallback(TrainerCallback):
    """Evaluate ``probe(model, step) -> {measure: float}`` along training (see the module docstring)."""

    def __init__(self, path: str | Path, probe: Callable[[torch.nn.Module, int], dict], every: int,
                 guard_metric: str | None = None, guard_min: float | None = None, at_start: bool = True,
                 guard_restore: bool = True):
        self.path, self.probe, self.every = Path(path), probe, every
        self.guard_metric, self.guard_min, self.at_start = guard_metric, guard_min, at_start
        self.guard_restore = guard_restore
        self.done = {row["step"] for row in read_probes(self.path)}
        self.stopped_at: int | None = None
        self.restored_to: int | None = None  # the step whose weights the guard put back
        self._passed: tuple[int, dict[str, torch.Tensor]] | None = None  # last passing step, its trainable weights

    def evaluate(self, model, step: int) -> dict | None:
        if step in self.done:
            return None
        with preserved_state(model):
            measures = self.probe(model, step)
        row = {"step": step, "measures": measures}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(step)
        return row

    def _guard(self, row: dict | None, model, state, control) -> None:
        if row is None or self.guard_metric is None:
            return
        value = row["measures"].get(self.guard_metric)
        if value is None or math.isnan(value) or value >= self.guard_min:
            if self.guard_restore:
                self._passed = (row["step"], {n: p.detach().to("cpu", copy=True)
                                              for n, p in model.named_parameters() if p.requires_grad})
            return
        logger.warning("forgetting guard: %s = %.4f < %.4f at step %d; stopping", self.guard_metric,
                       value, self.guard_min, state.global_step)
        self.stopped_at = state.global_step
        control.should_training_stop = True
        if not self.guard_restore:
            return
        if self._passed is None:
            logger.warning("forgetting guard: no probe passed in this process; keeping the step-%d weights",
                           state.global_step)
            return
        step, weights = self._passed
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in weights:
                    p.copy_(weights[name])
        self.restored_to = step
        logger.warning("forgetting guard: weights of step %d (the last probe within the limit) put back", step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.world_size > 1:
            # Every process would evaluate (FSDP / ZeRO-3 shards would deadlock) and append to one probes.jsonl.
            raise ConfigError(f"training probes run in one process, not across {args.world_size}: drop `probe:` "
                             "for a multi-process launch, or probe on one process")
        if self.at_start and state.global_step == 0 and model is not None:
            self._guard(self.evaluate(model, 0), model, state, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if model is not None and (step % self.every == 0 or step == state.max_steps):
            self._guard(self.evaluate(model, step), model, state, control)
        return control


def _flat(summary: dict, step_dir: Path) -> dict:
    """The frontier's measures from a ``summarize_run`` summary (and the step's raw accuracies)."""
    from forgetless.retention.records import list_tasks, read_task
    from forgetless.retention.summary import accuracy_tasks

    out = {}
    cells = {"bwt": summary["bwt"], "mc_retention": summary["mc_retention"], **summary["drift"], **summary["target"]}
    for name, cell in cells.items():
        out[name], out[f"{name}_ci95"] = cell["score"], cell["ci95"]
    for task in accuracy_tasks(list_tasks(step_dir)):
        out[f"acc:{task}"] = read_task(step_dir, task)[0]["score"]
    return out


def retention_probe(config: ProbeConfig, tokenizer, root: str | Path, cache_dir: str | Path,
                    base_id: str | None = None) -> Callable[[torch.nn.Module, int], dict]:
    """A probe for :class:`ProbeCallback` built on the retention functions.

    Step ``s`` writes records to ``root/step-<s>``; measures are against ``root/step-0``
    (the adapter at initialisation, i.e. the base: LoRA's B starts at zero).
    """
    from forgetless.core.diagnostics import adapter_updates
    from forgetless.retention.summary import summarize_run

    root = Path(root)

    def probe(model, step: int) -> dict:
        out = root / f"step-{step}"
        if out.exists():
            shutil.rmtree(out)  # a step half-written before a crash is evaluated again
        tmp = root / f".step-{step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        measure_retention(model, tokenizer, None, config, tmp, cache_dir, base_id)
        tmp.rename(out)
        measures = _flat(summarize_run(root / "step-0", out), out) if (root / "step-0").is_dir() else {}
        measures["dw_frobenius"] = adapter_updates(model)["total_frobenius"] if hasattr(model, "peft_config") else None
        logger.info("probe step %d: %s", step, {k: round(v, 4) for k, v in measures.items() if isinstance(v, float)})
        return measures

    return probe


def probe_callbacks(settings: dict | None, model: str, train_cfg, cache_dir: Path) -> list:
    """The checkpoint probe of a run's ``probe`` settings (:class:`ProbeConfig` fields) for one training run of base
    ``model`` (none when the settings are null); the base's answers are cached in ``cache_dir``."""
    if not settings:
        return []
    try:
        cfg = build(ProbeConfig, settings)
    except ConfigError as e:
        raise ConfigError(f"probe: {e}") from None
    train_dir = Path(train_cfg.output_dir)
    if not train_cfg.resume:  # a fresh run: earlier probes belong to other settings
        (train_dir / PROBES_FILE).unlink(missing_ok=True)
        shutil.rmtree(train_dir / "probes", ignore_errors=True)
    probe = retention_probe(cfg, load_tokenizer(model), train_dir / "probes", cache_dir, model_fingerprint(model))
    return [ProbeCallback(train_dir / PROBES_FILE, probe, cfg.every, cfg.guard_metric, cfg.guard_min,
                          guard_restore=cfg.guard_restore)]
