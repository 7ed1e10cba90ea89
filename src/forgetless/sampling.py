"""Sample k answers per prompt with a Hugging Face causal LM, one batch at a time.

Prompts are token ids as :func:`forgetless.templates.encode_prompt` builds them; a batch is
left-padded so every sequence's new tokens start at the same column, and ``generate`` samples
``k`` continuations of each (``num_return_sequences``). Generation stops at the tokenizer's eos
and at the end-of-turn markers the vocabulary has. The caller seeds each batch
(``torch.manual_seed``) so a batch's samples do not depend on what ran before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end|>")


@dataclass(frozen=True)
class Sampled:
    """One sampled answer: its text and whether it stopped on its own (False: cut at max_new_tokens)."""

    text: str
    finished: bool
    new_tokens: int


def stop_token_ids(tokenizer) -> list[int]:
    """eos plus the end-of-turn markers this vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(B, T_max)``, padded on the left.

    >>> left_pad([[5, 6], [7]], 0)[0].tolist()
    [[5, 6], [0, 7]]
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def cut_at_stop(new_ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """Tokens before the first stop token, and whether one was found.

    >>> cut_at_stop([4, 5, 2, 9], {2})
    ([4, 5], True)
    """
    for i, token in enumerate(new_ids):
        if token in stops:
            return new_ids[:i], True
    return new_ids, False


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
