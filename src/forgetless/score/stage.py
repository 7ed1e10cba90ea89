"""Stage 1: score every response token by its NLL under the base model.

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

import numpy as np
import pyarrow as pa
import torch

from forgetless.lm import artifacts
from forgetless.lm.data import Example, fingerprint_examples, load_examples
from forgetless.core.logits import token_nll
from forgetless.core.packing import flatten, packing_isolates, restart_positions, split_row
from forgetless.lm.modeling import EMBEDDED, load_model_and_tokenizer, load_tokenizer, model_fingerprint
from forgetless.lm.batching import length_buckets, right_pad
from forgetless.lm.progress import progress
from forgetless.core.tokenstats import score_statistics
from forgetless.lm.templates import Encoded, encode_conversation, template_hash

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.parquet"


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of the scoring stage."""

    model: str = field(default=EMBEDDED, metadata={"help": "base model: 'embedded', a local directory or a hub name"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (commit, tag or branch)"})
    data: str = field(default="mbpp-train", metadata={"help": "bundled split name, JSONL file, saved dataset dir, or hf:<name>[:split]"})
    limit: int | None = field(default=None, metadata={"help": "score only the first N examples"})
    max_length: int = field(default=1024, metadata={"help": "tokens per example; longer ones are handled by 'overlong'"})
    overlong: str = field(default="truncate", metadata={"help": "'truncate' (cut from the right) or 'skip' examples over max_length; both are counted"})
    batch_tokens: int = field(default=8192, metadata={"help": "padded tokens per forward batch (length-bucketed)"})
    part_size: int = field(default=256, metadata={"help": "examples per saved part: a crash loses at most one part's work"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, else fp32), float32, bfloat16, float16"})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "transformers attention: sdpa, eager, flash_attention_2, ... (default: transformers' choice)"})
    padding_free: bool = field(default=False, metadata={
        "help": "score each batch as one row without padding (position_ids restart per example), when the model's "
                "attention keeps the examples apart (checked; else padded batches, with a warning)"})
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


def pad_batch(encoded: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, response_mask)``, each ``(B, T)``."""
    ids, attention = right_pad([e.input_ids for e in encoded], pad_id)
    response = right_pad([e.response_mask for e in encoded], 0)[0]
    return ids, attention, response


def flat_batch(encoded: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padding-free ``(input_ids, position_ids, response_mask)``, each ``(1, sum of lengths)``."""
    return (flatten([e.input_ids for e in encoded]), restart_positions([len(e) for e in encoded]),
            flatten([e.response_mask for e in encoded]))


def use_padding_free(model, wanted: bool) -> bool:
    """``wanted``, unless the model's attention lets packed sequences see each other (then a warning, and padding)."""
    if wanted and not packing_isolates(model):
        logger.warning("padding_free: %s attention does not keep packed sequences apart; scoring padded batches",
                       getattr(model.config, "_attn_implementation", "this model's"))
        return False
    return wanted


@torch.no_grad()
def score_encoded(model, encoded: list[Encoded], pad_id: int, batch_tokens: int = 8192,
                  description: str = "scoring", padding_free: bool = False) -> list[np.ndarray]:
    """Per-token NLL (float32, NaN where not a response token) for each encoded example.

    Length-bucketed batches, right-padded, or with ``padding_free`` laid end to end in one row (no padding computed;
    :mod:`forgetless.core.packing`) when the model's attention keeps them apart. Both give the same NLLs.
    """
    device = next(model.parameters()).device
    padding_free = use_padding_free(model, padding_free)
    results: list[np.ndarray | None] = [None] * len(encoded)
    batches = length_buckets([len(e) for e in encoded], batch_tokens)
    for batch in progress(batches, description, total_items=len(encoded), count=len):
        chosen = [encoded[i] for i in batch]
        if padding_free:
            ids, positions, response = (t.to(device) for t in flat_batch(chosen))
            nll = split_row(token_nll(model, ids, None, response, positions).cpu(), [len(e) for e in chosen])
        else:
            ids, attention, response = (t.to(device) for t in pad_batch(chosen, pad_id))
            nll = token_nll(model, ids, attention, response).cpu()
        for row, i in enumerate(batch):
            results[i] = nll[row][: len(encoded[i])].numpy()
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
        "template": template_hash(tokenizer_only),
        "data": fingerprint_examples(examples),
        "max_length": config.max_length,
        "overlong": config.overlong,
        "dtype": config.dtype,
    }
    if artifacts.is_fresh(out, key, SCORES_FILE):
        logger.info("reusing scores in %s (inputs unchanged)", out)
        return out
    model, tokenizer = load_model_and_tokenizer(config.model, config.revision, config.dtype, config.device,
                                                config.attn_implementation)
    kept, counts = encode_examples(tokenizer, examples, config.max_length, config.overlong)
    if not kept:
        raise ValueError(f"no example of {config.data} has a response token within max_length={config.max_length}")
    encoded = [enc for _, enc in kept]
    nlls = score_in_parts(model, encoded, tokenizer.pad_token_id, config.batch_tokens, out / "parts", key,
                          config.part_size, config.padding_free)
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


def score_in_parts(model, encoded: list[Encoded], pad_id: int, batch_tokens: int, parts_dir: Path, key: dict,
                   part_size: int, padding_free: bool = False) -> list[np.ndarray]:
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
        scored = score_encoded(model, encoded[start : start + part_size], pad_id, batch_tokens,
                               padding_free=padding_free)
        artifacts.write_npz(path, {f"a{i}": a for i, a in enumerate(scored)})
        nlls.extend(scored)
    return nlls

