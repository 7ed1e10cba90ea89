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
import torch

from forgetless.lm import artifacts
from forgetless.lm.data import Example, fingerprint_examples, load_examples
from forgetless.core.logits import token_nll
from forgetless.lm.modeling import EMBEDDED, load_tokenizer, model_fingerprint
from forgetless.lm.engines import open_engine
from forgetless.lm.batching import length_buckets, right_pad
from forgetless.lm.progress import progress
from forgetless.core.tokenstats import score_statistics
from forgetless.lm.templates import Encoded, encode_conversation, template_hash
from forgetless.lm.vllm_backend import check_backend_settings, resolve_backend

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of the scoring stage."""

    model: str = field(default=EMBEDDED, metadata={"help": "base model: 'embedded', a local directory or a hub name"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (commit, tag or branch)"})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter dir applied on `model`: score under the tuned model (DPF's second scoring)"})
    data: str = field(default="mbpp-train", metadata={"help": "bundled split name, JSONL file, saved dataset dir, or hf:<name>[:split]"})
    limit: int | None = field(default=None, metadata={"help": "score only the first N examples"})
    max_length: int = field(default=1024, metadata={"help": "tokens per example; longer ones are handled by 'overlong'"})
    overlong: str = field(default="truncate", metadata={"help": "'truncate' (cut from the right) or 'skip' examples over max_length; both are counted"})
    batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per forward batch (length-bucketed)"})
    part_size: int = field(default=256, metadata={"help": "examples per saved part: a crash loses at most one part's work"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, else fp32), float32, bfloat16, float16"})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})
    backend: str = field(default="auto", metadata={"help": "hf | vllm (prompt_logprobs) | auto (vllm when installed and CUDA present, else hf)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs one model is split across"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: share of GPU memory it may take (weights + KV cache)"})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM: longest sequence in tokens, > max_length (null: the model's own)"})
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
            raise ValueError(f"max_model_len ({self.max_model_len}) must exceed max_length ({self.max_length}): vLLM scores a prompt while generating one token")


def pad_batch(encoded: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, response_mask)``, each ``(B, T)``."""
    ids, attention = right_pad([e.input_ids for e in encoded], pad_id)
    response = right_pad([e.response_mask for e in encoded], 0)[0]
    return ids, attention, response


@torch.no_grad()
def score_encoded(model, encoded: list[Encoded], pad_id: int, batch_tokens: int = 8192,
                  description: str = "scoring") -> list[np.ndarray]:
    """Per-token NLL (float32, NaN where not a response token) for each encoded example."""
    device = next(model.parameters()).device
    results: list[np.ndarray | None] = [None] * len(encoded)
    batches = length_buckets([len(e) for e in encoded], batch_tokens)
    for batch in progress(batches, description, total_items=len(encoded), count=len):
        ids, attention, response = (t.to(device) for t in pad_batch([encoded[i] for i in batch], pad_id))
        nll = token_nll(model, ids, attention, response).cpu().numpy()
        for row, i in enumerate(batch):
            results[i] = nll[row, : len(encoded[i])]
    return results  # type: ignore[return-value]


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
    """Score ``config.data`` under ``config.model``; return the output directory."""
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
        raise ValueError(f"no example of {config.data} has a response token within max_length={config.max_length}")
    encoded = [enc for _, enc in kept]
    engine = open_engine(config)
    try:
        nlls = score_in_parts(engine.score, encoded, out / "parts", key, config.part_size)
    finally:
        engine.close()
    n_inf = int(sum(np.sum(np.isinf(n)) for n in nlls))
    n_nan = int(sum(np.sum(np.isnan(n[1:][np.asarray(e.response_mask[1:], bool)])) for n, e in zip(nlls, encoded)))
    if n_inf or n_nan:
        logger.warning("non-finite scores: %d response tokens with NLL inf (probability 0), %d NaN (masking will refuse them)", n_inf, n_nan)
    table = pa.table({
        "id": [ex.id for ex, _ in kept],
        "input_ids": [e.input_ids for e in encoded],
        "response_mask": [e.response_mask for e in encoded],
        "nll": [n.tolist() for n in nlls],
        "truncated": [e.truncated for e in encoded],
    })
    stats = score_statistics(nlls, [np.asarray(e.response_mask, dtype=bool) for e in encoded])
    stats.update(counts, examples=len(examples), scored_examples=len(kept), inf_nll_tokens=n_inf, nan_nll_tokens=n_nan)
    artifacts.write_parquet(out / SCORES_FILE, table)
    artifacts.write_json(out / "stats.json", stats)
    artifacts.write_manifest(out, key, config)
    shutil.rmtree(out / "parts", ignore_errors=True)
    return out


def score_in_parts(score_fn: Callable[[list[Encoded]], list[np.ndarray]], encoded: list[Encoded], parts_dir: Path,
                   key: dict, part_size: int) -> list[np.ndarray]:
    """Score in parts of ``part_size`` examples, each saved as it finishes, so a crash loses one part at most.

    Parts made under another key (model, data, ...) are discarded; matching ones are reused.
    """
    key_file = parts_dir / "key.json"
    if parts_dir.exists() and (not key_file.is_file() or artifacts.read_json(key_file) != key):
        shutil.rmtree(parts_dir)
    if not key_file.is_file():
        artifacts.write_json(key_file, key)
    nlls: list[np.ndarray] = []
    starts = range(0, len(encoded), part_size)
    done = sum((parts_dir / f"part-{i:05d}.npz").is_file() for i in range(len(starts)))
    if done:
        logger.info("resuming: %d of %d parts already scored in %s", done, len(starts), parts_dir)
    for part, start in enumerate(starts):
        path = parts_dir / f"part-{part:05d}.npz"
        if path.is_file():
            with np.load(path) as saved:
                nlls.extend(saved[f"a{i}"] for i in range(len(saved.files)))
            continue
        scored = score_fn(encoded[start : start + part_size])
        artifacts.write_npz(path, {f"a{i}": a for i, a in enumerate(scored)})
        nlls.extend(scored)
    return nlls

