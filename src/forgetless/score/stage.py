"""Stage 1: score every response token by its NLL under the base model (or a tuned one: ``adapter``).

``run_score(config)`` writes ``<out_dir>/scores.parquet`` (one row per example: ``id``,
``input_ids``, ``response_mask``, ``nll``, ``truncated``), ``stats.json`` and ``manifest.json``.
A re-run whose manifest key matches reuses the file; any change of model, tokenizer, chat
template, data or max length invalidates it, and the log says which.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from forgetless.core.errors import DataError
from forgetless.lm import artifacts, distributed
from forgetless.lm.data import Example, fingerprint_examples, load_examples
from forgetless.lm.model_args import EngineArgs
from forgetless.lm.modeling import load_tokenizer, model_fingerprint
from forgetless.lm.engines import open_engine
from forgetless.lm.progress import progress
from forgetless.lm.scoring import score_buckets, score_encoded  # noqa: F401  (re-exported: the stage's Python entry point)
from forgetless.core.tokenstats import score_statistics
from forgetless.lm.templates import Encoded, encode_conversation, template_hash
from forgetless.lm.vllm_backend import check_backend_settings, resolve_backend

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"


@dataclass(frozen=True)
class ScoreConfig(EngineArgs):
    """Settings of the scoring stage; the model and engine are :class:`EngineArgs`."""

    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter dir applied on `model`: score under the "
                                                                "tuned model (DPF's second scoring)"})
    data: str = field(default="mbpp-train",
                      metadata={"help": "bundled split name, JSONL file, saved dataset dir, or hf:<name>[:split]"})
    limit: int | None = field(default=None, metadata={"help": "score only the first N examples"})
    max_length: int = field(default=1024,
                            metadata={"help": "tokens per example; longer ones are handled by 'overlong'"})
    overlong: str = field(default="truncate", metadata={"help": "'truncate' (cut from the right) or 'skip' examples "
                                                                "over max_length; both are counted"})
    batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per forward batch (length-bucketed)"})
    part_size: int = field(default=256,
                           metadata={"help": "examples per saved part: a crash loses at most one part's work"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "transformers attention: sdpa, eager, flash_attention_2, ... (default: transformers' choice)"})
    padding_free: bool = field(default=False, metadata={
        "help": "score each batch as one row without padding (position_ids restart per example), under a varlen "
                "attention kernel (flash_attention_2/3) that keeps the examples apart (checked). With sdpa or eager "
                "a packed row attends over its whole length through a dense mask, slower than padded batches "
                "(benchmarks/bench_score.py): those score padded, with a warning"})
    out_dir: str = field(default="runs/default/scores", metadata={"help": "output directory"})

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.overlong not in ("truncate", "skip"):
            raise ValueError(f"overlong must be 'truncate' or 'skip', got {self.overlong!r}")
        if self.part_size < 1:
            raise ValueError(f"part_size must be positive, got {self.part_size}")
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {self.batch_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be positive, got {self.limit}")
        check_backend_settings(self.backend, self.tensor_parallel_size, self.gpu_memory_utilization, self.max_model_len)
        if self.max_model_len is not None and self.max_model_len <= self.max_length:
            raise ValueError(f"max_model_len ({self.max_model_len}) must exceed max_length ({self.max_length}): vLLM "
                             "scores a prompt while generating one token")


def encode_examples(tokenizer, examples: list[Example], max_length: int, overlong: str):
    """Encode examples; return the kept (example, encoded) pairs and the counts of what was cut or dropped."""
    kept, counts = [], {"truncated": 0, "skipped_overlong": 0, "no_response_tokens": 0}
    for ex in examples:
        enc = encode_conversation(tokenizer, ex.messages, max_length=max_length)
        if enc.truncated and overlong == "skip":
            counts["skipped_overlong"] += 1
            continue
        counts["truncated"] += enc.truncated
        # A response token at position 0 has no context and can never be scored.
        if sum(enc.response_mask[1:]) == 0:
            counts["no_response_tokens"] += 1
            continue
        kept.append((ex, enc))
    if counts["truncated"] or counts["skipped_overlong"] or counts["no_response_tokens"]:
        logger.warning("over max_length=%d or empty after it: %s", max_length, counts)
    return kept, counts


def run_score(config: ScoreConfig) -> Path:
    """Score ``config.data`` under ``config.model``; return the output directory. Under a launcher the processes
    share the batches and the first one writes (:mod:`forgetless.lm.distributed`)."""
    distributed.start()
    out = Path(config.out_dir)
    examples = load_examples(config.data, config.limit)
    tokenizer_only = load_tokenizer(config.model, config.revision)
    key = {
        "stage": "score",
        "format": 1,
        "model": model_fingerprint(config.model, config.revision),
        "adapter": model_fingerprint(config.adapter) if config.adapter else None,
        "template": template_hash(tokenizer_only),
        "data": fingerprint_examples(examples),
        "max_length": config.max_length,
        "overlong": config.overlong,
        "dtype": config.dtype,
    }
    backend = resolve_backend(config.backend)
    if backend == "vllm":  # absent for hf, so that scores made before vLLM existed stay fresh
        key["backend"] = backend
    if artifacts.is_fresh(out, key, SCORES_FILE):
        logger.info("reusing scores in %s (inputs unchanged)", out)
        return out
    kept, counts = encode_examples(tokenizer_only, examples, config.max_length, config.overlong)
    if not kept:
        raise DataError(f"no example of {config.data} has a response token within max_length={config.max_length}")
    encoded = [enc for _, enc in kept]
    engine = open_engine(config)
    try:
        nlls = score_in_parts(engine.score, encoded, config.batch_tokens, out / "parts", key, config.part_size)
    finally:
        engine.close()
    if distributed.is_main():
        write_scores(out, kept, nlls, counts, len(examples), key, config)
    distributed.barrier()
    return out


def write_scores(out: Path, kept: list, nlls: list[np.ndarray], counts: dict, n_examples: int, key: dict,
                 config: ScoreConfig) -> None:
    """``scores.parquet``, ``stats.json`` and the manifest (last); the parts are removed."""
    encoded = [enc for _, enc in kept]
    n_inf = int(sum(np.sum(np.isinf(n)) for n in nlls))
    n_nan = int(sum(np.sum(np.isnan(n[1:][np.asarray(e.response_mask[1:], bool)])) for n, e in zip(nlls, encoded)))
    if n_inf or n_nan:
        logger.warning("non-finite scores: %d response tokens with NLL inf (probability 0), %d NaN "
                       "(masking will refuse them)", n_inf, n_nan)
    table = pa.table({
        "id": [ex.id for ex, _ in kept],
        "input_ids": [e.input_ids for e in encoded],
        "response_mask": [e.response_mask for e in encoded],
        "nll": [n.tolist() for n in nlls],
        "truncated": [e.truncated for e in encoded],
    })
    stats = score_statistics(nlls, [np.asarray(e.response_mask, dtype=bool) for e in encoded])
    stats.update(counts, examples=n_examples, scored_examples=len(kept), inf_nll_tokens=n_inf, nan_nll_tokens=n_nan)
    artifacts.write_parquet(out / SCORES_FILE, table)
    artifacts.write_json(out / "stats.json", stats)
    artifacts.write_manifest(out, key, config)
    shutil.rmtree(out / "parts", ignore_errors=True)


def score_in_parts(score_fn: Callable[[list[Encoded]], list[np.ndarray]], encoded: list[Encoded], batch_tokens: int,
                   parts_dir: Path, key: dict, part_size: int) -> list[np.ndarray]:
    """Score in parts of whole batches (about ``part_size`` examples each), each saved as it finishes, so a crash
    loses one part at most (per process under a launcher). ``score_fn`` scores one batch in this process (an
    engine's ``score``: Hugging Face or vLLM).

    The batches are those of one process (length buckets of every example); the unfinished ones are shared among
    the processes, and each process saves its parts as ``part-<first batch>.npz`` with the examples they hold, so a
    re-run resumes with any number of processes. Parts made under another key (model, data, ...) are discarded.
    """
    key = {**key, "parts": "batches"}  # parts of the older layout (example ranges) are discarded
    key_file = parts_dir / "key.json"
    if distributed.is_main():
        if parts_dir.exists() and (not key_file.is_file() or artifacts.read_json(key_file) != artifacts.as_json(key)):
            shutil.rmtree(parts_dir)
        if not key_file.is_file():
            artifacts.write_json(key_file, key)
    distributed.barrier()
    done = read_parts(parts_dir)
    # Every process reads the same parts before any writes a new one: a process that read after another had written
    # its first part would share out other batches and leave items unscored (seen under CPU contention).
    distributed.barrier()
    lengths = [len(e) for e in encoded]
    batches = score_buckets(lengths, batch_tokens)
    numbered = [b for b in range(len(batches)) if any(i not in done for i in batches[b])]
    if done:
        logger.info("resuming: %d of %d examples already scored in %s", len(done), len(encoded), parts_dir)
    mine = distributed.share([batches[b] for b in numbered], lengths)
    first_of = {tuple(batches[b]): b for b in numbered}
    results: dict[int, np.ndarray] = {}
    for part in group_batches(mine, part_size):
        scored: dict[int, np.ndarray] = {}
        for batch in progress(part, "scoring", total_items=sum(map(len, part)), count=len):
            scored.update(zip(batch, score_fn([encoded[i] for i in batch])))
        order = sorted(scored)
        artifacts.write_npz(parts_dir / f"part-{first_of[tuple(part[0])]:05d}.npz",
                            {"index": np.asarray(order), **{f"a{n}": scored[i] for n, i in enumerate(order)}})
        results.update(scored)
    return distributed.gather({**done, **results} if distributed.is_main() else results, len(encoded))


def group_batches(batches: list[list[int]], part_size: int) -> list[list[list[int]]]:
    """Consecutive batches in parts of at least ``part_size`` examples (the last may hold fewer).

    >>> group_batches([[0, 1], [2], [3, 4], [5]], 3)
    [[[0, 1], [2]], [[3, 4], [5]]]
    """
    parts: list[list[list[int]]] = []
    for batch in batches:
        if not parts or sum(map(len, parts[-1])) >= part_size:
            parts.append([])
        parts[-1].append(batch)
    return parts


def read_parts(parts_dir: Path) -> dict[int, np.ndarray]:
    """``{example: nll}`` of every saved part."""
    done: dict[int, np.ndarray] = {}
    for path in sorted(parts_dir.glob("part-*.npz")):
        with np.load(path) as saved:
            done.update((int(i), saved[f"a{n}"]) for n, i in enumerate(saved["index"]))
    return done
