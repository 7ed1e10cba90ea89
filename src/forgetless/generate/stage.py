"""Stage: build Self-Output or Rephrase training data from a ground-truth training set.

``run_generate(config)`` writes into ``out_dir``:

* ``samples.jsonl``: one line per prompt as soon as its batch is done (every sampled answer,
  whether it passed the task's verifier, its per-token NLL under the base model). A re-run with
  the same settings skips the prompts already there, so an interrupted run continues
  (:mod:`forgetless.generate.samples`, also across processes);
* ``data.jsonl``: the training set, ``messages`` format (what ``score`` and ``train`` read),
  one record per kept prompt with ``id``, the original record's fields and ``provenance``
  (source, sample_index, verified, base_ppl, fallback);
* ``generation_stats.json`` (prompts, samples, verified counts, dropped prompts, fallbacks, speed),
  ``mechanism_stats.json`` (ppl of ground truth vs generated answers, see
  :mod:`forgetless.generate.mechanism`) and ``manifest.json``.

Methods: ``self_output`` samples ``samples`` answers per prompt from the base model (the
authors': 32 at temperature 0.7, top-p 0.95, 512 new tokens), keeps those the verifier accepts and
picks one by ``choose`` (lowest perplexity); ``rephrase`` asks the base model, with the authors'
template, for one rewrite of the reference answer and verifies it the same way. A prompt where no
answer passes is dropped, as the authors did, and counted (``on_failure=ground_truth`` keeps it
with its reference instead; see :mod:`forgetless.generate.assemble`). ``paper_self_output`` /
``paper_rephrase`` take the authors' Llama-3-8B generations instead of sampling.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from forgetless.lm import artifacts, distributed
from forgetless.lm.data import DataError, Example, fingerprint_examples, load_examples
from forgetless.generate.mechanism import compare_sets, format_table
from forgetless.lm.modeling import load_tokenizer, model_fingerprint
from forgetless.generate.assemble import apply_on_failure, assemble, generation_statistics, paper_statistics
from forgetless.generate.config import DATA_FILE, METHODS, GenerateConfig  # noqa: F401  (re-exported)
from forgetless.generate.paper import load_paper_generations
from forgetless.generate.samples import (SAMPLES_FILE, check_samples_key, generate_samples, generation_prompt,  # noqa: F401
                                         read_done, response_nlls)
from forgetless.lm.engines import open_engine
from forgetless.lm.templates import template_hash
from forgetless.generate.verify import make_verifier
from forgetless.lm.vllm_backend import resolve_backend

logger = logging.getLogger(__name__)

# A record's own prompt/response fields would contradict its new messages: left out of data.jsonl.
_REPLACED_FIELDS = ("prompt", "response", "completion")


def load_compared(path: str) -> tuple[str, dict[str, Example]]:
    """(name, examples by id) of another generate output (its directory or its data.jsonl)."""
    p = Path(path)
    name = p.name
    if p.is_dir():
        manifest = p / artifacts.MANIFEST
        name = artifacts.read_json(manifest)["config"]["method"] if manifest.is_file() else p.name
        p = p / DATA_FILE
    return name, {ex.id: ex for ex in load_examples(str(p))}


def mechanism(engine, examples: list[Example], final: list[Example], done: dict[str, dict],
              config: GenerateConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """Ground truth vs this run's answers (and any ``compare`` sets) under the base model; also
    each final answer's NLLs."""
    def score(exs: list[Example]) -> dict[str, np.ndarray]:
        return dict(zip([e.id for e in exs],
                        response_nlls(engine, [e.prompt_messages for e in exs], [e.response for e in exs], config)))

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
        lines.append(json.dumps({"id": ex.id, "messages": ex.messages, **meta, "provenance": provenance},
                                ensure_ascii=False))
    artifacts.write_text(path, "\n".join(lines) + "\n")


def run_generate(config: GenerateConfig) -> Path:
    """Build ``config.method`` training data from ``config.data``; return the output directory. Under a launcher
    the processes share the batches (:mod:`forgetless.generate.samples`) and the first one writes."""
    distributed.start()
    out = Path(config.out_dir)
    examples = load_examples(config.data, config.limit)
    sampling = {k: getattr(config, k) for k in ("method", "task", "samples", "temperature", "top_p", "max_new_tokens",
                                                 "rephrase_template", "batch_size", "seed", "max_length", "dtype")}
    sampling.update(model=model_fingerprint(config.model, config.revision),
                    template=template_hash(load_tokenizer(config.model, config.revision)))
    if resolve_backend(config.backend) == "vllm":  # absent for hf, so that outputs made before vLLM existed stay fresh
        sampling["backend"] = "vllm"
    else:  # HF samples draw from a generator per sample since continuous batching: older samples do not mix in
        sampling["sampler"] = "per-sample"
    key = {"stage": "generate", "format": 1, **sampling, "data": fingerprint_examples(examples),
           "choose": config.choose, "on_failure": config.on_failure,
           "compare": [fingerprint_examples(load_compared(p)[1].values()) for p in config.compare]}
    if artifacts.is_fresh(out, key, DATA_FILE):
        logger.info("reusing generated data in %s (inputs unchanged)", out)
        return out
    engine = open_engine(config)
    try:
        start, done = time.monotonic(), {}
        if config.method.startswith("paper_"):
            split = config.data.removeprefix("mbpp-")
            assembled = load_paper_generations(config.method.removeprefix("paper_"), split, config.choose,
                                               config.seed)[: len(examples)]
            final = apply_on_failure(assembled, config.on_failure)
            stats = paper_statistics(assembled, final)
        else:
            check_samples_key(out, sampling)
            verifier = make_verifier(config.task, config.data, examples[0], config.sandbox_timeout_s)
            done = generate_samples(engine, examples, config, verifier, out)
            assembled = assemble(examples, done, config.method, config.choose, config.seed)
            final = apply_on_failure(assembled, config.on_failure)
            stats = generation_statistics(examples, done, assembled, final, time.monotonic() - start)
        if distributed.is_main():
            logger.info("generation: %s", json.dumps(stats))
            artifacts.write_json(out / "generation_stats.json", stats)
        if not final:
            raise DataError(f"{config.method} on {config.data}: no prompt of {len(assembled)} has an answer that "
                            "passed, so there is nothing to train on (on_failure=ground_truth keeps "
                            "their reference answers)")
        mech, final_nll = mechanism(engine, examples, final, done, config)
    finally:
        engine.close()
    if distributed.is_main():
        logger.info("base-model perplexity of the answers:\n%s", format_table(mech))
        write_data(out / DATA_FILE, final, final_nll)
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
