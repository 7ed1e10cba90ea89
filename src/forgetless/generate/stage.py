"""Stage: build Self-Output or Rephrase training data from a ground-truth training set.

``run_generate(config)`` writes into ``out_dir``:

* ``samples.jsonl``: one line per prompt as soon as its batch is done (every sampled answer,
  whether it passed the task's verifier, its per-token NLL under the base model). A re-run with
  the same settings skips the prompts already there, so an interrupted run continues
  (:mod:`forgetless.generate.samples`, also across processes);
* ``data.jsonl``: the training set, ``messages`` format (what ``score`` and ``train`` read),
  one record per prompt with ``id``, the original record's fields and ``provenance``
  (source, sample_index, verified, base_ppl, fallback);
* ``generation_stats.json`` (prompts, samples, verified counts, fallbacks, speed),
  ``mechanism_stats.json`` (ppl of ground truth vs generated answers, see
  :mod:`forgetless.generate.mechanism`) and ``manifest.json``.

Methods: ``self_output`` samples ``samples`` answers per prompt from the base model, keeps those
the verifier accepts and picks one by ``choose``; ``rephrase`` asks the base model to rewrite
the reference answer (``rephrase_template``) and verifies the rewrite the same way; where no
answer passes, both fall back to the ground truth and count it. ``paper_self_output`` /
``paper_rephrase`` take the authors' Llama-3-8B generations instead of sampling.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forgetless.lm import artifacts, distributed
from forgetless.lm.data import Example, fingerprint_examples, load_examples
from forgetless.generate.mechanism import compare_sets, format_table
from forgetless.lm.modeling import EMBEDDED, load_model_and_tokenizer, load_tokenizer, model_fingerprint
from forgetless.generate.paper import CHOICES, choose_answer, load_paper_generations
from forgetless.generate.samples import (SAMPLES_FILE, check_samples_key, generate_samples, generation_prompt,  # noqa: F401
                                         read_done, response_nlls)
from forgetless.lm.templates import template_hash
from forgetless.generate.verify import TASKS, make_verifier

logger = logging.getLogger(__name__)

METHODS = ("self_output", "rephrase", "paper_self_output", "paper_rephrase")
DATA_FILE = "data.jsonl"
# A record's own prompt/response fields would contradict its new messages: left out of data.jsonl.
_REPLACED_FIELDS = ("prompt", "response", "completion")
DEFAULT_REPHRASE_TEMPLATE = (
    "Below is a task and a reference answer. Rewrite the reference answer in your own words. "
    "Keep everything that makes it correct and the format the task asks for (for code: the same "
    "function names and signatures, in one ```python block). Reply with the rewritten answer only.\n\n"
    "### Task\n{instruction}\n\n### Reference answer\n{reference}"
)


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of the generation stage."""

    method: str = field(default="self_output", metadata={"help": f"one of {', '.join(METHODS)}"})
    model: str = field(default=EMBEDDED, metadata={"help": "base model: 'embedded', a local directory or a hub name"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (commit, tag or branch)"})
    data: str = field(default="mbpp-train", metadata={"help": "ground-truth training set (paper_* methods: mbpp-train or mbpp-validation)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    task: str = field(default="auto", metadata={"help": f"verifier: {', '.join(TASKS)} (auto: from the data set)"})
    samples: int = field(default=4, metadata={"help": "answers sampled per prompt (k)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (paper: 0.7)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=512, metadata={"help": "tokens per sampled answer; longer ones are cut (and usually fail)"})
    choose: str = field(default="lowest-ppl", metadata={"help": f"which correct answer to keep: {', '.join(CHOICES)}"})
    rephrase_template: str = field(default=DEFAULT_REPHRASE_TEMPLATE, metadata={"help": "rephrase prompt; {instruction} and {reference} are filled in"})
    batch_size: int = field(default=4, metadata={"help": "prompts per generation batch (each gives 'samples' sequences)"})
    seed: int = field(default=0, metadata={"help": "seed of sampling (per batch) and of choose=random"})
    sandbox_timeout_s: float = field(default=10.0, metadata={"help": "seconds per MBPP test run"})
    max_length: int = field(default=2048, metadata={"help": "tokens per example when scoring answers"})
    batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per scoring batch"})
    compare: tuple[str, ...] = field(default=(), metadata={"help": "other generate output dirs whose answers join the ppl comparison"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, else fp32), float32, bfloat16, float16"})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})
    out_dir: str = field(default="runs/default/generate", metadata={"help": "output directory"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.choose not in CHOICES:
            raise ValueError(f"choose must be one of {', '.join(CHOICES)}, got {self.choose!r}")
        if self.samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("samples, batch_size and max_new_tokens must be positive")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be positive, got {self.limit}")
        if self.method == "rephrase" and "{reference}" not in self.rephrase_template:
            raise ValueError("rephrase_template must contain {reference} (and usually {instruction})")
        if self.method.startswith("paper_") and self.data not in ("mbpp-train", "mbpp-validation"):
            raise ValueError(f"the paper's generations cover mbpp-train and mbpp-validation, not {self.data!r}")


def select_answer(record: dict, choose: str, seed: int) -> dict | None:
    """The kept sample of one prompt: among the verified ones (all non-empty ones when nothing is checked), by ``choose``."""
    rows = [r for r in record["samples"] if r["mean_nll"] is not None]
    candidates = [r for r in rows if r["verified"] is True] or [r for r in rows if r["verified"] is None]
    if not candidates:
        return None
    ranked = [{"ppl": math.exp(r["mean_nll"])} for r in candidates]
    return candidates[choose_answer(ranked, choose, random.Random(f"{seed}:{record['id']}"))]


def assemble(examples: list[Example], done: dict[str, dict], config: GenerateConfig) -> list[Example]:
    """The training set: each prompt with its chosen sample, or the ground truth where none passed."""
    out = []
    for ex in examples:
        record = done[ex.id]
        pick = select_answer(record, config.choose, config.seed)
        n_ok = sum(r["verified"] is True for r in record["samples"])
        if pick is None:
            answer = ex.response
            provenance = {"source": "ground_truth", "sample_index": None, "verified": record["ground_truth_verified"], "fallback": True}
        else:
            answer = pick["text"]
            provenance = {"source": config.method, "sample_index": pick["index"], "verified": pick["verified"], "fallback": False}
        provenance.update(samples=len(record["samples"]), verified_samples=n_ok)
        out.append(Example(ex.id, [*ex.prompt_messages, {"role": "assistant", "content": answer}], {**ex.meta, "provenance": provenance}))
    return out


def generation_statistics(examples: list[Example], done: dict[str, dict], final: list[Example], seconds: float) -> dict:
    records = [done[ex.id] for ex in examples]
    samples = [s for r in records for s in r["samples"]]
    fallbacks = sum(ex.meta["provenance"]["fallback"] for ex in final)
    new_tokens = sum(s["new_tokens"] for s in samples)
    return {
        "prompts": len(records),
        "samples": len(samples),
        "empty_samples": sum(s["mean_nll"] is None for s in samples),
        "unfinished_samples": sum(not s["finished"] for s in samples),
        "verified_samples": sum(s["verified"] is True for s in samples),
        "prompts_with_verified_sample": sum(any(s["verified"] is True for s in r["samples"]) for r in records),
        "fallbacks": fallbacks,
        "fallback_rate": fallbacks / max(len(records), 1),
        "ground_truth_verified": sum(r["ground_truth_verified"] is True for r in records),
        "new_tokens": new_tokens,
        "seconds_this_run": round(seconds, 1),
    }


def paper_statistics(final: list[Example]) -> dict:
    prov = [ex.meta["provenance"] for ex in final]
    fallbacks = sum(p["fallback"] for p in prov)
    return {
        "prompts": len(prov),
        "accepted_answers": sum(p["accepted"] for p in prov),
        "rejected_answers": sum(p["rejected"] for p in prov),
        "prompts_with_verified_sample": len(prov) - fallbacks,
        "fallbacks": fallbacks,
        "fallback_rate": fallbacks / max(len(prov), 1),
    }


def load_compared(path: str) -> tuple[str, dict[str, Example]]:
    """(name, examples by id) of another generate output (its directory or its data.jsonl)."""
    p = Path(path)
    name = p.name
    if p.is_dir():
        manifest = p / artifacts.MANIFEST
        name = artifacts.read_json(manifest)["config"]["method"] if manifest.is_file() else p.name
        p = p / DATA_FILE
    return name, {ex.id: ex for ex in load_examples(str(p))}


def mechanism(model, tokenizer, examples: list[Example], final: list[Example], done: dict[str, dict], config: GenerateConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """Ground truth vs this run's answers (and any ``compare`` sets) under the base model; also each final answer's NLLs."""
    def score(exs: list[Example]) -> dict[str, np.ndarray]:
        return dict(zip([e.id for e in exs], response_nlls(model, tokenizer, [e.prompt_messages for e in exs], [e.response for e in exs], config)))

    gt = score(examples)
    final_nll = {}
    to_score = []
    for ex in final:
        prov = ex.meta["provenance"]
        if prov["fallback"]:
            final_nll[ex.id] = gt[ex.id]
        elif ex.id in done:  # scored when sampled
            final_nll[ex.id] = np.asarray(done[ex.id]["samples"][prov["sample_index"]]["token_nll"])
        else:
            to_score.append(ex)
    final_nll.update(score(to_score))
    sets = {"ground_truth": gt, config.method: final_nll}
    generated = {config.method: {ex.id for ex in final if not ex.meta["provenance"]["fallback"]}}
    ids = set(gt)
    compared_samples: dict[str, list[np.ndarray]] = {}
    for path in config.compare:
        name, others = load_compared(path)
        shared = [others[i] for i in sorted(ids & set(others))]
        if not shared:
            logger.warning("%s shares no prompt with this run; left out of the comparison", path)
            continue
        name = name if name not in sets else f"{name}:{path}"
        sets[name] = score(shared)
        generated[name] = {e.id for e in shared if not e.meta.get("provenance", {}).get("fallback", False)}
        # Their every-sample NLLs too (same base model assumed, as for the whole comparison).
        other_done = read_done(Path(path) / SAMPLES_FILE) if Path(path).is_dir() else {}
        if other_done:
            compared_samples[f"{name} (every sample)"] = every_sample_nll(other_done, [e.id for e in shared])
    samples = {"ground_truth": [gt[ex.id] for ex in examples]}
    if done:
        samples[f"{config.method} (every sample)"] = every_sample_nll(done, [ex.id for ex in examples])
    samples.update(compared_samples)
    return compare_sets(sets, generated, samples if len(samples) > 1 else None), final_nll


def every_sample_nll(done: dict[str, dict], ids: list[str]) -> list[np.ndarray]:
    """Response-token NLLs of every non-empty sample of the prompts ``ids``."""
    return [np.asarray(s["token_nll"]) for i in ids if i in done for s in done[i]["samples"] if s["token_nll"]]


def write_data(path: Path, final: list[Example], final_nll: dict[str, np.ndarray]) -> None:
    """data.jsonl (atomically), with each answer's perplexity under the base model in its provenance."""
    lines = []
    for ex in final:
        nll = final_nll.get(ex.id)
        ok = nll is not None and len(nll) > 0
        provenance = {**ex.meta["provenance"], "base_mean_nll": float(np.mean(nll)) if ok else None,
                      "base_ppl": float(np.exp(np.mean(nll))) if ok else None}
        meta = {k: v for k, v in ex.meta.items() if k not in ("id", "provenance", *_REPLACED_FIELDS)}
        lines.append(json.dumps({"id": ex.id, "messages": ex.messages, **meta, "provenance": provenance}, ensure_ascii=False))
    artifacts.write_text(path, "\n".join(lines) + "\n")


def run_generate(config: GenerateConfig) -> Path:
    """Build ``config.method`` training data from ``config.data``; return the output directory. Under a launcher
    the processes share the batches (:mod:`forgetless.generate.samples`) and the first one writes."""
    distributed.start()
    out = Path(config.out_dir)
    examples = load_examples(config.data, config.limit)
    sampling = {k: getattr(config, k) for k in ("method", "task", "samples", "temperature", "top_p", "max_new_tokens",
                                                 "rephrase_template", "batch_size", "seed", "max_length", "dtype")}
    sampling.update(model=model_fingerprint(config.model, config.revision), template=template_hash(load_tokenizer(config.model, config.revision)))
    key = {"stage": "generate", "format": 1, **sampling, "data": fingerprint_examples(examples), "choose": config.choose,
           "compare": [fingerprint_examples(load_compared(p)[1].values()) for p in config.compare]}
    if artifacts.is_fresh(out, key, DATA_FILE):
        logger.info("reusing generated data in %s (inputs unchanged)", out)
        return out
    model, tokenizer = load_model_and_tokenizer(config.model, config.revision, config.dtype, config.device)
    start = time.monotonic()
    done: dict[str, dict] = {}
    if config.method.startswith("paper_"):
        split = config.data.removeprefix("mbpp-")
        final = load_paper_generations(config.method.removeprefix("paper_"), split, config.choose, config.seed)[: len(examples)]
        stats = paper_statistics(final)
    else:
        check_samples_key(out, sampling)
        verifier = make_verifier(config.task, config.data, examples[0], config.sandbox_timeout_s)
        done = generate_samples(model, tokenizer, examples, config, verifier, out)
        final = assemble(examples, done, config)
        stats = generation_statistics(examples, done, final, time.monotonic() - start)
    mech, final_nll = mechanism(model, tokenizer, examples, final, done, config)
    if distributed.is_main():
        logger.info("generation: %s", json.dumps(stats))
        logger.info("base-model perplexity of the answers:\n%s", format_table(mech))
        write_data(out / DATA_FILE, final, final_nll)
        artifacts.write_json(out / "generation_stats.json", stats)
        artifacts.write_json(out / "mechanism_stats.json", mech)
        artifacts.write_manifest(out, key, config)
    distributed.barrier()
    return out


def print_generate_summary(out: Path) -> None:
    """Print the verification counts and the perplexity table of a generate output."""
    stats = artifacts.read_json(Path(out) / "generation_stats.json")
    print(f"generated data: {Path(out) / DATA_FILE}")
    print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    print(format_table(artifacts.read_json(Path(out) / "mechanism_stats.json")))
