"""The ``eval`` stage: generate answers for each task's items, extract, score, write results.

Writes, inside ``output_dir``: ``<task>.json`` (score record), ``<task>.items.jsonl`` (one record
per item), ``scores.json`` (task -> score record), ``config.json`` and ``manifest.json``. Each item says whether
its answer stopped on its own (``finished``; False: cut at the budget) and each score record gives the share that
did (``finish_rate``, ``n_finished`` of ``n``) beside the budget (``settings.max_new_tokens``); both are None for
predictions, which carry no stop information.

Three ways in:

* :func:`run_eval` (``forgetless eval``): load ``model`` (+ PEFT ``adapter``) and evaluate;
* ``predictions=file.jsonl`` (lines ``{"task", "id", "output"}``): score another engine's outputs
  without loading a model;
* :func:`evaluate_model`: an in-memory model and tokenizer (e.g. a probe during training).

Results of a model without adapter are cached under ``$FORGETLESS_CACHE/eval``, keyed by the
model fingerprint, task definition hash, decoding settings and the exact item subset, so a sweep
of fine-tuned models evaluates the base once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from forgetless.core.errors import ConfigError, DataError
from forgetless.lm import distributed
from forgetless.lm.artifacts import write_json, write_manifest, write_text
from forgetless.lm.data import iter_jsonl
from forgetless.lm.decode import DecodingSettings, Sampled, generate_answers
from forgetless.lm.model_args import EngineArgs
from forgetless.lm.vllm_backend import check_backend_settings, resolve_backend
from forgetless.core.intervals import score_interval
from forgetless.eval.cache import (_cache_key, _cache_parts, _check_cache_entry, _default_cache, _finished,
                                   _resume_key, _reuse_cached, _store_cache)
from forgetless.eval.sandbox import SandboxLimits
from forgetless.eval.tasks import Item, Task, get_task, items_fingerprint, select_items

logger = logging.getLogger(__name__)

# One answer per prompt: a Sampled (text and whether it stopped on its own), or plain text (finish not known).
GenerateFn = Callable[[list[list[dict[str, str]]], DecodingSettings], list[Sampled] | list[str]]


@dataclass(frozen=True)
class EvalConfig(EngineArgs):
    """Settings of the eval stage; the model (a base or merged model, with ``adapter`` loaded on it) and engine
    are :class:`EngineArgs`."""

    output_dir: str = field(default="runs/eval", metadata={"help": "directory for results (created)"})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter dir to load on top of model"})
    tasks: tuple[str, ...] = field(default=("mbpp", "gsm8k", "math", "arc_challenge"),
                                   metadata={"help": "built-in task names or .yaml/.json task definition files"})
    limit: int | None = field(default=None, metadata={"help": "evaluate at most this many items per task"})
    seed: int | None = field(default=0,
                             metadata={"help": "seed of the random subset when limit is set (None: first items)"})
    batch_size: int | None = field(default=None, metadata={"help": "live rows of continuous-batching generation "
                                                                   "(default: forgetless.lm.decode.DEFAULT_ROWS, "
                                                                   "from a measured sweep)"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "override every task's own max new tokens"})
    greedy: bool = field(default=True, metadata={"help": "greedy decoding (deterministic); false samples"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (greedy=false only)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (greedy=false only)"})
    predictions: str | None = field(default=None,
                                    metadata={"help": "JSONL of {task, id, output}: score these, load no model"})
    cache: bool = field(default=True, metadata={"help": "reuse/store results of models without adapter"})
    cache_dir: str | None = field(default=None, metadata={"help": "result cache (default $FORGETLESS_CACHE/eval)"})
    sandbox_timeout_s: float = field(default=10.0, metadata={"help": "wall-time limit per MBPP program"})
    sandbox_memory_mb: int = field(default=1024, metadata={"help": "address-space limit per MBPP program"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        if isinstance(self.tasks, str) or isinstance(self.tasks, list):
            object.__setattr__(self, "tasks", tuple([self.tasks] if isinstance(self.tasks, str) else self.tasks))
        if not self.tasks:
            raise ValueError("tasks: name at least one task")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1 (or None for all items)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        check_backend_settings(self.backend, self.tensor_parallel_size, self.gpu_memory_utilization, self.max_model_len)
        if self.predictions is not None and not Path(self.predictions).is_file():
            raise ValueError(f"predictions file {self.predictions} does not exist")
        DecodingSettings(max_new_tokens=self.max_new_tokens or 1, greedy=self.greedy, temperature=self.temperature,
                         top_p=self.top_p)


def check_tasks(cfg: EvalConfig) -> None:
    """Refuse an unknown task name before anything is written or loaded (``tasks`` may also name Task objects
    passed to :func:`evaluate_tasks` by hand, so the config itself does not check)."""
    for spec in cfg.tasks:
        resolve_task(spec, cfg)


def resolve_task(spec: str | Task, cfg: EvalConfig) -> Task:
    """``spec`` itself when it is a Task, else :func:`forgetless.eval.tasks.get_task` with cfg's sandbox limits."""
    if isinstance(spec, Task):
        return spec
    return get_task(spec, SandboxLimits(timeout_s=cfg.sandbox_timeout_s, memory_mb=cfg.sandbox_memory_mb))


def code_key(cfg: EvalConfig) -> dict[str, str]:
    """task -> the hash of the code that loads, reads and scores it (:meth:`Task.definition_hash`)."""
    return {str(spec): resolve_task(spec, cfg).definition_hash() for spec in cfg.tasks}


def decoding_for(task: Task, cfg: EvalConfig) -> DecodingSettings:
    return DecodingSettings(max_new_tokens=cfg.max_new_tokens or task.max_new_tokens, greedy=cfg.greedy,
                            temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed or 0)


def score_task(task: Task, items: list[Item], outputs: list[str], settings: dict[str, Any],
               finished: list[bool | None] | None = None) -> tuple[dict, list[dict]]:
    """The task's score record and per-item records from the model's outputs. ``finished``: whether each answer
    stopped on its own (None: not known, e.g. predictions); the record's ``finish_rate`` is their share, None
    unless every item's is known."""
    scored = task.evaluate(outputs, items)
    finished = list(finished) if finished is not None else [None] * len(outputs)
    records = []
    for item, output, s, done in zip(items, outputs, scored, finished):
        record = {"id": item.id, "score": s.score, "prompt": item.messages, "output": output,
                  "extracted": s.extracted, "gold": item.gold, "finished": done}
        if s.detail is not None:
            record["detail"] = s.detail
        records.append(record)
    scores = [s.score for s in scored]
    lo, hi = score_interval(scores) if scores else (None, None)
    known = bool(finished) and all(f is not None for f in finished)
    summary = {"task": task.name, "metric": task.metric, "score": sum(scores) / len(scores) if scores else None,
               "n": len(scores), "ci95": [lo, hi], "higher_is_better": task.higher_is_better,
               "chance": task.chance, "finish_rate": sum(finished) / len(finished) if known else None,
               "n_finished": sum(finished) if known else None, "settings": settings}
    if task.metrics is not None and scored:
        summary["metrics"] = task.metrics(scored)
    return summary, records


def split_answers(answers: list[Sampled] | list[str]) -> tuple[list[str], list[bool | None]]:
    """(texts, finished) of a GenerateFn's answers; plain text has no finish information (None)."""
    return ([a if isinstance(a, str) else a.text for a in answers],
            [None if isinstance(a, str) else a.finished for a in answers])


def finish_text(summary: dict) -> str:
    """``finished 75% within 256 new tokens``, or why the finish rate is not known."""
    budget = summary.get("settings", {}).get("max_new_tokens")
    if summary.get("finish_rate") is None:
        why = "predictions carry no stop information" if summary.get("settings", {}).get("source") == "predictions" \
            else "not recorded"
        return f"finish rate unknown ({why})"
    return f"finished {summary['finish_rate']:.0%} within {budget} new tokens"


def write_task_results(out: Path, summary: dict, records: list[dict]) -> None:
    name = summary["task"]
    write_text(out / f"{name}.items.jsonl",
               "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
    write_json(out / f"{name}.json", summary)


def read_predictions(path: str) -> dict[tuple[str | None, str], str]:
    """(task or None, id) -> output, from lines {"task"?, "id", "output"}."""
    preds = {}
    for n, r in iter_jsonl(path):
        if "id" not in r or "output" not in r:
            raise DataError(f"{path}:{n}: a prediction needs 'id' and 'output'")
        preds[(r.get("task"), str(r["id"]))] = r["output"]
    return preds


def evaluate_tasks(tasks: Sequence[str | Task], cfg: EvalConfig, generate_fn: GenerateFn | None,
                   out: Path | None = None, fingerprint: str | None = None,
                   predictions: dict | None = None, resume: bool = False) -> dict[str, dict]:
    """Evaluate each task; write its files into ``out`` when given. Returns task -> score record.

    ``resume``: keep a task whose results ``out`` already holds from the same settings (after a crash
    mid-evaluation only the unfinished tasks run again)."""
    results = {}
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else _default_cache()
    for spec in tasks:
        task = resolve_task(spec, cfg)
        summary = evaluate_task(task, cfg, generate_fn, out, fingerprint, predictions, resume, cache_root)
        if summary is not None:
            results[task.name] = summary
    return results


def evaluate_task(task: Task, cfg: EvalConfig, generate_fn: GenerateFn | None, out: Path | None,
                  fingerprint: str | None, predictions: dict | None, resume: bool, cache_root: Path) -> dict | None:
    """One task's score record: kept from ``out`` (resume), copied from the cache, or from answers (predicted or
    generated) scored and written. None on the processes other than the first, which only help generate."""
    items = select_items(task.load(), cfg.limit, cfg.seed)
    decoding = decoding_for(task, cfg)
    settings = task_settings(task, items, decoding, cfg, fingerprint)
    resume_key = _resume_key(settings, cfg) if resume else None
    done = _finished(out, task.name, resume_key)
    if done is not None:
        logger.info("%s: already evaluated in %s (same settings); kept", task.name, out)
        return done
    settings["resume_key"] = resume_key
    parts = (_cache_parts(fingerprint, task, items, decoding, cfg.backend)
             if fingerprint and cfg.cache and predictions is None else None)
    cached = cache_root / _cache_key(parts) if parts else None
    if cached is not None:
        _check_cache_entry(cache_root, cached, task.name, parts)
        if (cached / f"{task.name}.json").is_file() and out is not None:
            return _reuse_cached(cached, out, task.name, resume_key)
    if predictions is not None:
        items, outputs, finished = _predicted_answers(task, items, predictions, settings, cfg.predictions)
    else:
        outputs, finished = _generated_answers(items, decoding, generate_fn, settings)
    if not distributed.is_main():  # the first process scores (MBPP runs code) and writes
        return None
    return _score_and_write(task, items, outputs, finished, settings, out, cached, parts)


def task_settings(task: Task, items: list[Item], decoding: DecodingSettings, cfg: EvalConfig,
                  fingerprint: str | None) -> dict[str, Any]:
    """What the score record's ``settings`` says it was made from (the resume key is computed from these)."""
    return {"model": cfg.model, "adapter": cfg.adapter, "fingerprint": fingerprint,
            "decoding": dataclasses.asdict(decoding), "max_new_tokens": decoding.max_new_tokens,
            "limit": cfg.limit, "seed": cfg.seed,
            "items_fingerprint": items_fingerprint(items), "task_hash": task.definition_hash(),
            "backend": cfg.backend, "source": "generated"}



def _predicted_answers(task: Task, items: list[Item], predictions: dict, settings: dict, path: str | None):
    """(items, outputs, finished) of the items the predictions answer; ``settings`` is updated to say so."""
    found = [(it, predictions.get((task.name, it.id), predictions.get((None, it.id)))) for it in items]
    items = [it for it, o in found if o is not None]
    outputs = [o for _, o in found if o is not None]
    if not items:
        raise DataError(f"{task.name}: the predictions file has no output for any of its items")
    finished = [None] * len(outputs)  # another engine's outputs: whether they stopped is not known
    settings.update(source="predictions", predictions=path, items_fingerprint=items_fingerprint(items),
                    max_new_tokens=None)
    return items, outputs, finished


def _generated_answers(items: list[Item], decoding: DecodingSettings, generate_fn: GenerateFn, settings: dict):
    """(outputs, finished) of ``generate_fn``; ``settings`` records the generation time."""
    start = time.monotonic()
    outputs, finished = split_answers(generate_fn([it.messages for it in items], decoding))
    settings["generation_s"] = round(time.monotonic() - start, 2)
    return outputs, finished


def _score_and_write(task: Task, items: list[Item], outputs: list[str], finished: list[bool | None],
                     settings: dict, out: Path | None, cached: Path | None, parts: dict | None) -> dict:
    """Score, log, and write the task's files into ``out`` (and the cache entry, when there is one)."""
    summary, records = score_task(task, items, outputs, settings, finished)
    logger.info("%s: %s = %.4f (n=%d, 95%% CI %.3f-%.3f), %s", task.name, task.metric, summary["score"],
                summary["n"], *summary["ci95"], finish_text(summary))
    if out is not None:
        write_task_results(out, summary, records)
        if cached is not None:
            _store_cache(cached, out, task.name, parts)
    return summary



def hf_generate_fn(model, tokenizer, cfg: EvalConfig) -> GenerateFn:
    return lambda prompts, decoding: generate_answers(model, tokenizer, prompts, decoding, cfg.batch_size,
                                                      cfg.progress)


def evaluate_model(model, tokenizer, cfg: EvalConfig, output_dir: str | Path | None = None,
                   tasks: Sequence[str | Task] | None = None) -> dict[str, dict]:
    """Evaluate an in-memory model on ``tasks`` (default cfg.tasks; names or Task objects).
    No caching: in-memory weights have no fingerprint."""
    out = None
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        cfg = dataclasses.replace(cfg, backend="hf")  # the in-memory model generates
        return evaluate_tasks(tasks or cfg.tasks, cfg, hf_generate_fn(model, tokenizer, cfg), out)
    finally:
        model.train(was_training)


def load_for_eval(cfg: EvalConfig):
    """(model, tokenizer) of cfg.model, with cfg.adapter applied when given."""
    from forgetless.lm.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.revision, cfg.dtype, cfg.device)
    if cfg.adapter:
        from forgetless.lm.modeling import load_adapter

        model = load_adapter(model, cfg.adapter, cfg.model)
    return model, tokenizer


def _pick_generate_fn(cfg: EvalConfig) -> tuple[GenerateFn, Callable[[], None]]:
    """The generate function of cfg's backend, and what frees its engine afterwards."""
    if resolve_backend(cfg.backend) == "vllm":
        from forgetless.lm.vllm_backend import VllmEngine

        engine = VllmEngine.from_config(cfg)
        return engine.generate_answers, engine.close
    model, tokenizer = load_for_eval(cfg)
    return hf_generate_fn(model, tokenizer, cfg), lambda: None


def run_eval(cfg: EvalConfig) -> Path:
    """Evaluate cfg.model (+ adapter) or cfg.predictions on cfg.tasks; returns the output dir. Under a launcher
    the processes share the generation and the first one scores and writes (:mod:`forgetless.lm.distributed`)."""
    check_tasks(cfg)
    distributed.start()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        write_json(out / "config.json", dataclasses.asdict(cfg))
    started = time.time()
    if cfg.predictions is not None:
        results = evaluate_tasks(cfg.tasks, cfg, None, out, predictions=read_predictions(cfg.predictions), resume=True)
        fingerprint = None
    else:
        from forgetless.lm.modeling import model_fingerprint

        fingerprint = model_fingerprint(cfg.model, cfg.revision) if not cfg.adapter else None
        if cfg.backend == "vllm" and distributed.launched():
            raise ConfigError("backend=vllm runs in one process (vLLM spreads a model over GPUs itself): "
                             "drop the launcher, or use backend=hf to share the prompts among the processes")
        # results record hf or vllm; under a launcher auto is hf (the processes share the prompts)
        cfg = dataclasses.replace(cfg, backend="hf" if distributed.launched() else resolve_backend(cfg.backend))
        generate_fn = _LazyGenerate(cfg)
        try:
            results = evaluate_tasks(cfg.tasks, cfg, generate_fn, out, fingerprint=fingerprint, resume=True)
        finally:
            generate_fn.close()
    if distributed.is_main():
        write_eval_outputs(out, cfg, results, fingerprint, started)
    distributed.barrier()
    return out


def write_eval_outputs(out: Path, cfg: EvalConfig, results: dict[str, dict], fingerprint: str | None,
                       started: float) -> None:
    """``scores.json``, then the manifest (last: it marks the stage complete)."""
    write_json(out / "scores.json", results)
    key = {"stage": "eval", "model": cfg.model, "revision": cfg.revision, "adapter": cfg.adapter,
           "fingerprint": fingerprint, "tasks": {t: r["settings"].get("task_hash") for t, r in results.items()},
           "predictions": cfg.predictions}
    logger.info("eval finished in %.1f s: %s", time.time() - started, out)
    write_manifest(out, key, cfg)


def print_eval_summary(out: Path) -> None:
    """One line per task: score, 95% interval, items, and the share of answers that stopped within the budget."""
    scores = json.loads((Path(out) / "scores.json").read_text())
    for name, r in scores.items():
        lo, hi = r["ci95"]
        print(f"{name:>16}  {r['metric']:<18} {r['score']:.3f}  [{lo:.3f}, {hi:.3f}]  n={r['n']}  {finish_text(r)}")
        for metric, m in r.get("metrics", {}).items():
            if metric != r["metric"]:
                print(f"{'':>16}  {metric:<18} {m['score']:.3f}  [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]  n={m['n']}")
    print(f"results in {out}")


class _LazyGenerate:
    """Loads the model on the first call, so a run served entirely from the cache loads none."""

    def __init__(self, cfg: EvalConfig):
        self.cfg, self.fn, self.close = cfg, None, lambda: None

    def __call__(self, prompts, decoding):
        if self.fn is None:
            self.fn, self.close = _pick_generate_fn(self.cfg)
        return self.fn(prompts, decoding)
