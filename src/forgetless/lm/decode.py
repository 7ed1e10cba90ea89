"""Generation from chat prompts with a Hugging Face causal LM: the one decode loop of eval, retention, Self-Output,
Rephrase and replay.

Prompts are rendered with the chat template (``add_generation_prompt=True``) and decoded greedily by default, by
continuous batching (:mod:`forgetless.lm.continuous`: a fixed number of live rows, each refilled with the next
prompt as soon as its answer stops, the prompts' shared prefix computed once). Generation stops at the end of the
turn: the tokenizer's eos and, when the vocabulary has them, ``<|im_end|>``/``<|eot_id|>``/``<end_of_turn>``.
:func:`sample_batch` draws ``k`` samples per prompt (Self-Output) with the same loop and stop rule.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from forgetless.lm import distributed
from forgetless.lm.batching import left_pad, right_pad  # noqa: F401  (right_pad: also imported from here)
from forgetless.lm.continuous import SlotDecoder, supports_slots
from forgetless.lm.modeling import merged_lora
from forgetless.lm.progress import counter
from forgetless.lm.templates import encode_prompt

logger = logging.getLogger(__name__)

DEFAULT_ROWS = 64  # live rows of continuous batching, from the sweep in benchmarks/bench_generation.py (README)
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


def batch_seed(seed: int, index: int) -> int:
    """Seed of one sampled prompt (or sample): depends only on the seed and the prompt's position in the call, so
    a resumed run, another batching, or another process of a launch samples the same."""
    return seed * 1_000_003 + index


def pick_tokens(settings: DecodingSettings):
    """``pick(logits, rows) -> (n,)`` for :class:`~forgetless.lm.continuous.SlotDecoder`: argmax, or a sample from
    the temperature / top-p distribution drawn with each row's own generator."""
    if settings.greedy:
        return lambda logits, rows: logits.argmax(-1)
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(settings.temperature)]
    if settings.top_p < 1:
        warpers.append(TopPLogitsWarper(settings.top_p))

    def pick(logits, rows):
        for warp in warpers:
            logits = warp(None, logits)
        probs = torch.softmax(logits, dim=-1)  # (n, V)
        return torch.cat([torch.multinomial(probs[r], 1, generator=row.generator) for r, row in enumerate(rows)])

    return pick


def _generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def decode_ids(model, tokenizer, prompts: list[list[int]], settings: DecodingSettings = DecodingSettings(),
               batch_size: int | None = None, show_progress: bool = True, description: str = "generating",
               samples: int = 1, shared: bool = True) -> list[tuple[list[int], int | None]]:
    """The one decode loop: for each prompt (token ids), ``(new token ids, stop id)`` in input order (``samples``
    answers a prompt: ``samples`` entries per prompt, adjacent).

    New ids are cut before the first stop token (eos or an end-of-turn marker); ``stop id`` is that token, or None
    when the answer was cut at ``max_new_tokens``. ``batch_size`` rows are decoded at once (default
    :data:`DEFAULT_ROWS`) by continuous batching (:mod:`forgetless.lm.continuous`): a row that stops is replaced by
    the next prompt, so no step is spent on a finished answer. Models it cannot run (sliding windows, flash kernels)
    decode in left-padded ``model.generate`` batches of ``batch_size``. A sampled answer draws from its own
    generator, seeded by its position in the call (:func:`batch_seed`). Under a multi-process launch the prompts
    are shared among the processes, which must all call this with the same prompts (:mod:`forgetless.lm.distributed`);
    ``shared=False`` decodes every prompt here (a process's own share of a stage's work).
    """
    if not prompts:
        return []
    rows = batch_size or DEFAULT_ROWS
    entries = [(p, s) for p in range(len(prompts)) for s in range(samples)]  # entry e = p * samples + s
    lengths = [len(prompts[p]) for p, _ in entries]
    order = sorted(range(len(entries)), key=lambda e: -lengths[e])
    mine = [e for [e] in distributed.share([[e] for e in order], lengths)] if shared else order
    results: dict[int, tuple[list[int], int | None]] = {}
    start = time.monotonic()
    with counter(description, len(mine), enabled=show_progress) as bar:
        def done(entry: int, new: list[int], stop: int | None) -> None:
            results[entry] = (list(new), stop)
            bar.update(1)

        why = supports_slots(model)
        with merged_lora(model):
            _decode(model, tokenizer, prompts, entries, mine, settings, rows, why, description, done)
    elapsed = time.monotonic() - start
    new_tokens = sum(len(new) + (stop is not None) for new, stop in results.values())
    logger.info("%s: %d answers, %d new tokens in %.1f s (%.1f tokens/s)", description, len(results), new_tokens,
                elapsed, new_tokens / max(elapsed, 1e-9))
    return distributed.gather(results, len(entries)) if shared else [results[e] for e in range(len(entries))]


def _decode(model, tokenizer, prompts, entries, mine, settings: DecodingSettings, rows: int, why: str | None,
            description: str, done) -> None:
    """Decode the entries ``mine`` by continuous batching, or by padded ``generate`` batches where ``why`` says the
    slot decoder cannot run the model."""
    if why is None:
        device = next(model.parameters()).device
        decoder = SlotDecoder(model, rows, set(stop_token_ids(tokenizer)), settings.max_new_tokens,
                              pick_tokens(settings), done)
        decoder.run([prompts[entries[e][0]] for e in mine], mine,
                    [None if settings.greedy else _generator(batch_seed(settings.seed, e), device) for e in mine])
    else:
        logger.info("%s: decoding in padded generate() batches (%s)", description, why)
        _decode_padded(model, tokenizer, [prompts[entries[e][0]] for e in mine], mine, settings, rows, done)


def _decode_padded(model, tokenizer, prompts: list[list[int]], items: list[int], settings: DecodingSettings,
                   batch_size: int, done) -> None:
    """The fallback: left-padded ``model.generate`` batches (in the given order); a sampled batch is seeded by its
    first item."""
    config = _generation_config(tokenizer, settings)
    for b in range(0, len(prompts), batch_size):
        if not settings.greedy:
            torch.manual_seed(batch_seed(settings.seed, items[b]))
        for item, (new, stop) in zip(items[b:b + batch_size],
                                     _generate_batch(model, tokenizer, prompts[b:b + batch_size], config)):
            done(item, new, stop)


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
    """One answer (a sample, or an eval completion): its text, whether it stopped on its own (False: cut at
    max_new_tokens) and its new tokens (the stop token not counted)."""

    text: str
    finished: bool
    new_tokens: int


def sample_batch(model, tokenizer, prompts: list[list[int]], k: int, settings: DecodingSettings,
                 seed: int = 0, batch_size: int | None = None) -> list[list[Sampled]]:
    """``k`` sampled answers for each prompt (token ids), in input order: ``[prompt][sample]``.

    The same decode loop and stop rule as :func:`decode_ids`, on this process's prompts alone (a stage shares its
    batches among the processes of a launch itself); sample ``s`` of prompt ``p`` draws from its own
    generator seeded by ``seed`` and ``p * k + s`` (``settings.seed`` is not used here: the caller's ``seed``
    names the call, e.g. a batch of a resumable stage).
    """
    if settings.greedy:
        raise ValueError("sample_batch samples: give settings with greedy=False")
    decoded = decode_ids(model, tokenizer, prompts, dataclasses.replace(settings, seed=seed), batch_size,
                         show_progress=False, description="sampling", samples=k, shared=False)
    texts = [Sampled(tokenizer.decode(ids, skip_special_tokens=True), stop is not None, len(ids))
             for ids, stop in decoded]
    return [texts[p * k:(p + 1) * k] for p in range(len(prompts))]


def generate_answers(model, tokenizer, prompts: list[list[dict[str, str]]],
                     settings: DecodingSettings = DecodingSettings(), batch_size: int | None = None,
                     show_progress: bool = True, description: str = "generating") -> list[Sampled]:
    """One answer per prompt (a list of chat messages), in input order, with whether it stopped on its own within
    ``settings.max_new_tokens`` (eval's finish rate). The bar counts items (items/s)."""
    encoded = [encode_prompt(tokenizer, messages) for messages in prompts]
    decoded = decode_ids(model, tokenizer, encoded, settings, batch_size, show_progress, description)
    return [Sampled(tokenizer.decode(new, skip_special_tokens=True), stop is not None, len(new))
            for new, stop in decoded]


def generate(model, tokenizer, prompts: list[list[dict[str, str]]], settings: DecodingSettings = DecodingSettings(),
             batch_size: int | None = None, show_progress: bool = True, description: str = "generating") -> list[str]:
    """One completion per prompt (a list of chat messages), in input order: the texts of :func:`generate_answers`."""
    return [a.text for a in generate_answers(model, tokenizer, prompts, settings, batch_size, show_progress,
                                             description)]

