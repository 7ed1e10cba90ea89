"""Batched generation from chat prompts with a Hugging Face causal LM.

Prompts are rendered with the chat template (``add_generation_prompt=True``), sorted by length
so a batch holds prompts of similar length (less padding), left-padded (new tokens line up at
the right edge), and decoded greedily by default. Generation stops at the end of the turn: the
tokenizer's eos and, when the vocabulary has them, ``<|im_end|>``/``<|eot_id|>``/``<end_of_turn>``.
:func:`sample_batch` draws ``k`` samples per prompt (Self-Output) with the same config and stop rule.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from forgetless.lm import distributed
from forgetless.lm.batching import left_pad, right_pad  # noqa: F401  (right_pad: also imported from here)
from forgetless.lm.progress import progress
from forgetless.lm.templates import encode_prompt

logger = logging.getLogger(__name__)

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end|>")


@dataclass(frozen=True)
class DecodingSettings:
    """How to decode; part of the cache key of results."""

    max_new_tokens: int = 256
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not self.greedy and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError("sampling needs temperature > 0 and 0 < top_p <= 1")


def stop_token_ids(tokenizer) -> list[int]:
    """eos plus the end-of-turn markers this vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def _generation_config(tokenizer, settings: DecodingSettings, num_return_sequences: int = 1):
    """The GenerationConfig of every decode: stops at eos and end of turn, pads with pad (else the first stop)."""
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = {} if settings.greedy else {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    return GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy,
                            num_return_sequences=num_return_sequences, eos_token_id=stops, pad_token_id=pad, **sampling)


@torch.no_grad()
def _generate_batch(model, tokenizer, prompts: list[list[int]], config) -> list[tuple[list[int], int | None]]:
    """One left-padded ``generate`` call: ``(new ids cut at the first stop, that stop or None)`` per
    returned sequence, ``B * num_return_sequences`` of them, a prompt's sequences adjacent."""
    stops = set(stop_token_ids(tokenizer))
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, config.pad_token_id)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    decoded = []
    for new in out[:, ids.shape[1]:].tolist():  # (B * k, new)
        kept, finished = cut_at_stop(new, stops)
        decoded.append((kept, new[len(kept)] if finished else None))
    return decoded


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of one sampled batch: depends only on the seed and the batch's position, so a resumed run, or a batch
    decoded by another process of a launch, samples the same."""
    return seed * 1_000_003 + batch_index


@torch.no_grad()
def decode_ids(model, tokenizer, prompts: list[list[int]], settings: DecodingSettings = DecodingSettings(),
               batch_size: int = 8, show_progress: bool = True, description: str = "generating") -> list[tuple[list[int], int | None]]:
    """The one decode loop: for each prompt (token ids), ``(new token ids, stop id)`` in input order.

    New ids are cut before the first stop token (eos or an end-of-turn marker); ``stop id`` is
    that token, or None when the answer was cut at ``max_new_tokens``. Prompts are sorted longest
    first so a batch holds similar lengths, and left-padded so new tokens start in one column.
    Sampling seeds each batch by its position (:func:`batch_seed`). Under a multi-process launch the
    batches are shared among the processes, which must all call this with the same prompts
    (:mod:`forgetless.lm.distributed`).
    """
    if not prompts:
        return []
    lengths = [len(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    config = _generation_config(tokenizer, settings)
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    number = {tuple(rows): n for n, rows in enumerate(batches)}
    mine = distributed.share(batches, lengths)
    results: dict[int, tuple[list[int], int | None]] = {}
    start = time.monotonic()
    bar = progress(mine, description, sum(map(len, mine)), count=len) if show_progress else mine
    for rows in bar:
        if not settings.greedy:
            torch.manual_seed(batch_seed(settings.seed, number[tuple(rows)]))
        results.update(zip(rows, _generate_batch(model, tokenizer, [prompts[i] for i in rows], config)))
    elapsed = time.monotonic() - start
    logger.info("%s: %d items in %.1f s (%.2f items/s)", description, len(results), elapsed, len(results) / max(elapsed, 1e-9))
    return distributed.gather(results, len(prompts))


def cut_at_stop(new_ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """Tokens before the first stop token, and whether one was found.

    >>> cut_at_stop([4, 5, 2, 9], {2})
    ([4, 5], True)
    """
    for i, token in enumerate(new_ids):
        if token in stops:
            return new_ids[:i], True
    return new_ids, False


@dataclass(frozen=True)
class Sampled:
    """One sampled answer: its text and whether it stopped on its own (False: cut at max_new_tokens)."""

    text: str
    finished: bool
    new_tokens: int


def sample_batch(model, tokenizer, prompts: list[list[int]], k: int, settings: DecodingSettings) -> list[list[Sampled]]:
    """``k`` sampled answers for each prompt (token ids) of one batch, in input order: ``[prompt][sample]``.

    The same config and stop rule as :func:`decode_ids`, with ``num_return_sequences=k``; the
    batch keeps the caller's order, and the caller seeds it (``torch.manual_seed``) so that its
    samples do not depend on what ran before (``settings.seed`` is not used here).
    """
    if settings.greedy:
        raise ValueError("sample_batch samples: give settings with greedy=False")
    new = _generate_batch(model, tokenizer, prompts, _generation_config(tokenizer, settings, k))
    texts = [Sampled(tokenizer.decode(ids, skip_special_tokens=True), stop is not None, len(ids)) for ids, stop in new]
    return [texts[p * k:(p + 1) * k] for p in range(len(prompts))]


def generate(model, tokenizer, prompts: list[list[dict[str, str]]], settings: DecodingSettings = DecodingSettings(),
             batch_size: int = 8, show_progress: bool = True, description: str = "generating") -> list[str]:
    """One completion per prompt (a list of chat messages), in input order. The bar counts items (items/s)."""
    encoded = [encode_prompt(tokenizer, messages) for messages in prompts]
    decoded = decode_ids(model, tokenizer, encoded, settings, batch_size, show_progress, description)
    return [tokenizer.decode(new, skip_special_tokens=True) for new, _ in decoded]

