"""Padding-free batches: a batch's sequences laid end to end in one row, ``position_ids`` restarting at 0.

This is the layout of TRL's ``padding_free`` and transformers' ``DataCollatorWithFlattening``: no padding token is
computed, and the model keeps the sequences apart only through ``position_ids``. transformers 5 turns restarting
positions into a block-diagonal causal mask for ``eager``, ``sdpa`` and ``flex_attention`` (when no 2-D attention mask
and no KV cache are passed: hence ``use_cache=False`` everywhere here) and into varlen boundaries for
``flash_attention_2/3``. A model whose attention ignores them would let each sequence see the one before it:
:func:`packing_isolates` runs that check on the model itself.

Alignment at the seams (the convention of :mod:`forgetless.core.logits`): row ``i - 1`` predicts token ``i``, so the
first token of every sequence (``position_ids == 0``) is never predicted; its row would read the previous sequence.

>>> flatten([[5, 6], [7, 8, 9]])[0].tolist(), restart_positions([2, 3]).tolist()
([[5, 6, 7, 8, 9]], [[0, 1, 0, 1, 2]])
"""

from __future__ import annotations

import torch

# Tokens of the packing check: two short sequences of small ids (valid in any vocabulary).
_PROBE = ([3, 4, 5], [6, 7, 3, 4])
_PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}  # half precision: 2e-2


def flatten(sequences: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """The sequences (lists or 1-D tensors) concatenated into one row: ``(1, sum of lengths)``."""
    return torch.cat([torch.as_tensor(list(s), dtype=dtype) for s in sequences])[None]


def restart_positions(lengths: list[int]) -> torch.Tensor:
    """``position_ids`` of sequences of these lengths laid end to end: 0 at each sequence's first token, ``(1, N)``."""
    return torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])[None]


def split_row(row: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Inverse of :func:`flatten` for a ``(1, N, ...)`` row: one tensor per sequence."""
    return list(row[0].split(lengths))


@torch.no_grad()
def packing_isolates(model) -> bool:
    """Whether ``model`` keeps sequences packed in one row apart: the hidden states of the second probe sequence
    are the same packed behind the first as alone. Two forwards of the decoder on 7 tokens."""
    from forgetless.core.logits import split_causal_lm

    decoder = split_causal_lm(model)[0]
    param, training = next(decoder.parameters()), decoder.training
    decoder.eval()  # dropout would make the two forwards differ
    first, second = _PROBE
    ids = flatten([first, second]).to(param.device)
    positions = restart_positions([len(first), len(second)]).to(param.device)
    packed = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0, len(first):]
    alone = decoder(input_ids=ids[:, len(first):], use_cache=False).last_hidden_state[0]
    decoder.train(training)
    error = ((packed - alone).float().norm(dim=-1) / alone.float().norm(dim=-1).clamp(min=1e-12)).max()
    return bool(error <= _PROBE_RTOL.get(param.dtype, 2e-2))
