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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forgetless.lm import artifacts, distributed
from forgetless.lm.data import DataError, Example, fingerprint_examples, load_examples
from forgetless.generate.mechanism import compare_sets, format_table
from forgetless.lm.modeling import EMBEDDED, load_tokenizer, model_fingerprint
from forgetless.generate.assemble import ON_FAILURE, apply_on_failure, assemble, generation_statistics, paper_statistics
from forgetless.generate.paper import CHOICES, load_paper_generations
from forgetless.generate.samples import (SAMPLES_FILE, check_samples_key, generate_samples, generation_prompt,  # noqa: F401
                                         read_done, response_nlls)
from forgetless.lm.engines import open_engine
from forgetless.lm.templates import template_hash
from forgetless.generate.verify import TASKS, make_verifier
from forgetless.lm.vllm_backend import check_backend_settings, resolve_backend

logger = logging.getLogger(__name__)

METHODS = ("self_output", "rephrase", "paper_self_output", "paper_rephrase")
DATA_FILE = "data.jsonl"
# A record's own prompt/response fields would contradict its new messages: left out of data.jsonl.
_REPLACED_FIELDS = ("prompt", "response", "completion")
# The authors' rephrase prompt (PROMPT_TEMPLATE of generate_self-output_training_data.py in
# appier-research/robust-llm-finetunes), word for word; their {original_response} is {reference} here.
DEFAULT_REPHRASE_TEMPLATE = (
    "Below are an instruction that describes a task along with a reference answer. Using the reference answer "
    "as a guide, write your own response.\n### Instruction:\n{instruction}\n### Reference Answer:\n{reference}\n"
    "### Response:"
)
# The authors' samples per prompt: 32 for Self-Output, one rewrite for Rephrase.
DEFAULT_SAMPLES = {"self_output": 32, "rephrase": 1}


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of the generation stage."""

    method: str = field(default="self_output", metadata={"help": f"one of {', '.join(METHODS)}"})
    model: str = field(default=EMBEDDED, metadata={"help": "base model: 'embedded', a local directory or a hub name"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (commit, tag or branch)"})
    data: str = field(default="mbpp-train", metadata={"help": "ground-truth training set (paper_* methods: mbpp-train or mbpp-validation)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    task: str = field(default="auto", metadata={"help": f"verifier: {', '.join(TASKS)} (auto: from the data set)"})
    samples: int | None = field(default=None, metadata={"help": "answers sampled per prompt (default: the authors' 32 for self_output, 1 for rephrase)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (the authors': 0.7)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass (the authors': 0.95)"})
    max_new_tokens: int = field(default=512, metadata={"help": "tokens per sampled answer (the authors': 512); longer ones are cut (and usually fail)"})
    choose: str = field(default="lowest-ppl", metadata={"help": f"which correct answer to keep: {', '.join(CHOICES)}"})
    on_failure: str = field(default="drop", metadata={"help": "a prompt without a passing answer: drop (the authors') or ground_truth (keep its reference)"})
    rephrase_template: str = field(default=DEFAULT_REPHRASE_TEMPLATE, metadata={"help": "rephrase prompt; {instruction} and {reference} are filled in"})
    batch_size: int = field(default=4, metadata={"help": "prompts per generation batch (each gives 'samples' sequences)"})
    seed: int = field(default=0, metadata={"help": "seed of sampling (per batch) and of choose=random"})
    sandbox_timeout_s: float = field(default=10.0, metadata={"help": "seconds per MBPP test run"})
    max_length: int = field(default=2048, metadata={"help": "tokens per example when scoring answers"})
    batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per scoring batch"})
    compare: tuple[str, ...] = field(default=(), metadata={"help": "other generate output dirs whose answers join the ppl comparison"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, else fp32), float32, bfloat16, float16"})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})
    backend: str = field(default="auto", metadata={"help": "hf | vllm (k samples in one request) | auto (vllm when installed and CUDA present)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs one model is split across"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: share of GPU memory it may take (weights + KV cache)"})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM: longest sequence in tokens (null: the model's own)"})
    out_dir: str = field(default="runs/default/generate", metadata={"help": "output directory"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.samples is None:
            object.__setattr__(self, "samples", DEFAULT_SAMPLES.get(self.method, 1))
        if self.on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}, got {self.on_failure!r}")
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
        check_backend_settings(self.backend, self.tensor_parallel_size, self.gpu_memory_utilization, self.max_model_len)




def load_compared(path: str) -> tuple[str, dict[str, Example]]:
    """(name, examples by id) of another generate output (its directory or its data.jsonl)."""
    p = Path(path)
    name = p.name
    if p.is_dir():
        manifest = p / artifacts.MANIFEST
        name = artifacts.read_json(manifest)["config"]["method"] if manifest.is_file() else p.name
        p = p / DATA_FILE
    return name, {ex.id: ex for ex in load_examples(str(p))}


def mechanism(engine, examples: list[Example], final: list[Example], done: dict[str, dict], config: GenerateConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """Ground truth vs this run's answers (and any ``compare`` sets) under the base model; also each final answer's NLLs."""
    def score(exs: list[Example]) -> dict[str, np.ndarray]:
        return dict(zip([e.id for e in exs], response_nlls(engine, [e.prompt_messages for e in exs], [e.response for e in exs], config)))

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
    if resolve_backend(config.backend) == "vllm":  # absent for hf, so that outputs made before vLLM existed stay fresh
        sampling["backend"] = "vllm"
    key = {"stage": "generate", "format": 1, **sampling, "data": fingerprint_examples(examples), "choose": config.choose,
           "on_failure": config.on_failure, "compare": [fingerprint_examples(load_compared(p)[1].values()) for p in config.compare]}
    if artifacts.is_fresh(out, key, DATA_FILE):
        logger.info("reusing generated data in %s (inputs unchanged)", out)
        return out
    engine = open_engine(config)
    try:
        start, done = time.monotonic(), {}
        if config.method.startswith("paper_"):
            split = config.data.removeprefix("mbpp-")
            assembled = load_paper_generations(config.method.removeprefix("paper_"), split, config.choose, config.seed)[: len(examples)]
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
            raise DataError(f"{config.method} on {config.data}: no prompt of {len(assembled)} has an answer that passed, so "
                            "there is nothing to train on (on_failure=ground_truth keeps their reference answers)")
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
