"""Sample k answers per prompt with a Hugging Face causal LM, one batch at a time.

Prompts are token ids as :func:`forgetless.lm.templates.encode_prompt` builds them; a batch is
left-padded so every sequence's new tokens start at the same column, and ``generate`` samples
``k`` continuations of each (``num_return_sequences``). Generation stops at the tokenizer's eos
and at the end-of-turn markers the vocabulary has. The caller seeds each batch
(``torch.manual_seed``) so a batch's samples do not depend on what ran before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forgetless.lm.decode import cut_at_stop, left_pad, stop_token_ids



@dataclass(frozen=True)
class Sampled:
    """One sampled answer: its text and whether it stopped on its own (False: cut at max_new_tokens)."""

    text: str
    finished: bool
    new_tokens: int


@torch.no_grad()
def sample_batch(model, tokenizer, prompts: list[list[int]], k: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> list[list[Sampled]]:
    """``k`` sampled answers for each prompt (token ids), in input order: ``[prompt][sample]``."""
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                              top_k=0, num_return_sequences=k, eos_token_id=stops, pad_token_id=pad)
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    new = out[:, ids.shape[1]:].tolist()  # (B * k, new); rows of one prompt are adjacent
    results: list[list[Sampled]] = []
    for p in range(len(prompts)):
        row = []
        for s in range(k):
            tokens, finished = cut_at_stop(new[p * k + s], set(stops))
            row.append(Sampled(tokenizer.decode(tokens, skip_special_tokens=True), finished, len(tokens)))
        results.append(row)
    return results
