"""Best-epoch selection: the authors kept the epoch with the best validation accuracy.

With ``keep="best-epoch"`` a training run saves the adapter at the end of every epoch
(``epochs/epoch-<k>/``), measures the in-memory model on ``select_on`` and appends one line to
``epochs.jsonl``: ``{"epoch", "step", "select_on", "metric", "score", "n", "ci95", "higher_is_better"}``.
When training ends the best epoch's weights are loaded back into the model (ties: the earlier
epoch), so the run's adapter, its diagnostics and its merge are that epoch's.

``select_on`` is an eval task (``mbpp``: pass@1 on the 90 MBPP validation problems, as in
``forgetless eval``) or a behaviour record ``gen:<source>[:<metric>]`` (``gen:mbpp-validation``:
the share of each problem's asserts passed; ``gen:mbpp-validation:pass@1``). The measure is taken
on ``select_limit`` items; the report's target column on the same items is then no longer held out.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable

from forgetless.core.errors import ConfigError, DataError
from forgetless.lm import artifacts

logger = logging.getLogger(__name__)

KEEP = ("last", "best-epoch")
EPOCHS_FILE = "epochs.jsonl"
EPOCHS_DIR = "epochs"
SELECT_MAX_NEW_TOKENS = 512  # the MBPP eval task's own limit; behaviour records use it too

Measure = Callable[[object], dict]  # in-memory model -> a record with "score", "higher_is_better", ...


def check_selection(config) -> None:
    """Refuse best-epoch settings that cannot work, when the config is built (not after an epoch of training)."""
    if config.keep not in KEEP:
        raise ConfigError(f"keep must be one of {KEEP}, got {config.keep!r}")
    if config.keep == "last":
        return
    if config.adapter == "full":
        raise ConfigError("keep=best-epoch keeps an adapter per epoch; with adapter=full use keep=last")
    if config.max_steps > 0 or not float(config.epochs).is_integer():
        raise ConfigError("keep=best-epoch chooses among whole epochs: set a whole number of epochs and max_steps=-1")
    if config.select_limit is not None and config.select_limit < 1:
        raise ConfigError(f"select_limit must be >= 1 or none, got {config.select_limit}")
    if config.select_on.startswith("gen:"):
        from forgetless.retention.behaviour import metric_names, profile_for

        source = config.select_on[4:].split(":")[0]
        primary, metrics = metric_names(profile_for(source))
        records = [f"gen:{source}"] + [f"gen:{source}:{m}" for m in metrics if m != primary]
        if config.select_on not in records:
            raise ConfigError(f"select_on {config.select_on!r}: source {source!r} records {', '.join(records)}")
    else:
        from forgetless.eval.tasks import get_task

        get_task(config.select_on)  # an unknown task raises, naming the known ones


def selection_measure(config, tokenizer) -> Measure:
    """The measure ``config.select_on`` of an in-memory PEFT model (its base: the adapter disabled)."""
    if config.select_on.startswith("gen:"):
        from forgetless.lm.modeling import cache_dir, model_fingerprint
        from forgetless.retention.behaviour import evaluate_behaviour

        source = config.select_on[4:].split(":")[0]
        base_id = model_fingerprint(config.model, config.revision)

        def measure(model) -> dict:
            records = evaluate_behaviour(model, tokenizer, None, source, config.select_limit, cache_dir() / "retention",
                                         None, SELECT_MAX_NEW_TOKENS, base_id)
            return records[config.select_on]
        return measure
    from forgetless.eval.stage import EvalConfig, evaluate_model

    cfg = EvalConfig(tasks=(config.select_on,), limit=config.select_limit, cache=False, progress=False)
    return lambda model: next(iter(evaluate_model(model, tokenizer, cfg).values()))


def best_epoch(rows: list[dict]) -> int:
    """The epoch with the best score (highest, or lowest where lower is better); ties go to the earlier epoch.

    >>> best_epoch([{"epoch": 1, "score": 0.4, "higher_is_better": True},
    ...             {"epoch": 2, "score": 0.6, "higher_is_better": True},
    ...             {"epoch": 3, "score": 0.6, "higher_is_better": True}])
    2
    """
    scored = [r for r in rows if r["score"] is not None and not math.isnan(r["score"])]
    if not scored:
        raise DataError(f"no epoch has a score to select on ({len(rows)} measured)")
    sign = 1.0 if scored[0]["higher_is_better"] else -1.0
    return max(scored, key=lambda r: (sign * r["score"], -r["epoch"]))["epoch"]


def read_epochs(out: Path) -> list[dict]:
    path = Path(out) / EPOCHS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def load_best_epoch(model, out: Path) -> dict:
    """Put the best epoch's adapter weights into ``model``; return what ``train_summary.json`` records of it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    rows = read_epochs(out)
    if not rows:  # training stopped before its first epoch ended (e.g. by the forgetting guard)
        logger.warning("keep=best-epoch: no epoch ended, so none was measured; keeping the last weights")
        return {"keep": "best-epoch", "kept_epoch": None, "epochs": []}
    kept = best_epoch(rows)
    weights = load_file(Path(out) / EPOCHS_DIR / f"epoch-{kept}" / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ValueError(f"epoch {kept}'s adapter does not fit the model: {result.unexpected_keys[:3]}")
    logger.info("best epoch on %s: %d of %d (%s)", rows[0]["select_on"], kept, len(rows),
                ", ".join(f"{r['epoch']}: {r['score']:.4f}" for r in rows))
    return {"keep": "best-epoch", "kept_epoch": kept, "epochs": rows}


def best_epoch_callback(out: Path, measure: Measure, select_on: str, fresh: bool):
    """A Trainer callback that saves and measures the adapter at the end of every epoch (see the module docstring)."""
    from transformers import TrainerCallback

    from forgetless.train.outputs import save_atomic
    from forgetless.train.probe import preserved_state

    out = Path(out)
    if fresh:  # earlier epochs belong to another run
        (out / EPOCHS_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / EPOCHS_DIR, ignore_errors=True)

    class BestEpoch(TrainerCallback):
        trimmed = False

        def on_train_begin(self, args, state, control, **kwargs):
            if args.world_size > 1:
                raise ConfigError(f"keep=best-epoch measures each epoch in one process, not across {args.world_size}: "
                                 "use keep=last for a multi-process launch")

        def on_step_begin(self, args, state, control, **kwargs):
            # After a resume, forget the epochs the checkpoint had not reached (the state is restored after
            # on_train_begin, so this happens before the first step instead).
            if self.trimmed:
                return
            self.trimmed = True
            rows = [r for r in read_epochs(out) if r["step"] <= state.global_step]
            artifacts.write_text(out / EPOCHS_FILE, "".join(json.dumps(r) + "\n" for r in rows))

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            epoch = int(round(state.epoch))
            save_atomic(model.save_pretrained, out / EPOCHS_DIR / f"epoch-{epoch}")
            with preserved_state(model):  # no gradients; train/eval flags put back afterwards
                record = measure(model.eval())
            row = {"epoch": epoch, "step": state.global_step, "select_on": select_on, "metric": record.get("metric"),
                   "score": record["score"], "n": record.get("n"), "ci95": record.get("ci95"),
                   "higher_is_better": record["higher_is_better"]}
            logger.info("epoch %d: %s = %s", epoch, select_on, row["score"])
            with (out / EPOCHS_FILE).open("a") as f:
                f.write(json.dumps(row) + "\n")

    return BestEpoch()
