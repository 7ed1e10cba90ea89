"""Per-token NLL of encoded examples under a model in memory: the scoring the score stage, the engines and the
held-out measure share. Length-bucketed batches, right-padded or padding-free (one row per batch, position ids
restarting per example) where the model's attention keeps packed examples apart; the same NLLs either way.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from forgetless.core.logits import token_nll
from forgetless.core.packing import flatten, packing_isolates, restart_positions, split_row
from forgetless.lm import distributed
from forgetless.lm.batching import length_buckets, right_pad
from forgetless.lm.progress import progress
from forgetless.lm.templates import Encoded

logger = logging.getLogger(__name__)


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
def score_batch(model, encoded: list[Encoded], batch: list[int], pad_id: int, padding_free: bool = False) -> dict[int, np.ndarray]:
    """Per-token NLL (float32, NaN where not a response token) of the examples ``batch`` names, in one forward:
    right-padded, or with ``padding_free`` laid end to end in one row (:mod:`forgetless.core.packing`)."""
    device = next(model.parameters()).device
    chosen = [encoded[i] for i in batch]
    if padding_free:
        ids, positions, response = (t.to(device) for t in flat_batch(chosen))
        nll = split_row(token_nll(model, ids, None, response, positions).cpu(), [len(e) for e in chosen])
    else:
        ids, attention, response = (t.to(device) for t in pad_batch(chosen, pad_id))
        nll = token_nll(model, ids, attention, response).cpu()
    return {i: nll[row][: len(encoded[i])].numpy() for row, i in enumerate(batch)}


def score_encoded(model, encoded: list[Encoded], pad_id: int, batch_tokens: int = 8192,
                  description: str = "scoring", shared: bool = True, padding_free: bool = False) -> list[np.ndarray]:
    """Per-token NLL (float32, NaN where not a response token) for each encoded example, in length-bucketed batches
    (padded, or padding-free when asked and the model's attention keeps packed examples apart: same NLLs).

    ``shared``: under a multi-process launch the batches are shared among the processes, which must all call this
    with the same examples (:mod:`forgetless.lm.distributed`); False scores everything here (one process's own work).
    """
    padding_free = use_padding_free(model, padding_free)
    lengths = [len(e) for e in encoded]
    batches = length_buckets(lengths, batch_tokens)
    mine = distributed.share(batches, lengths) if shared else batches
    results: dict[int, np.ndarray] = {}
    for batch in progress(mine, description, total_items=sum(map(len, mine)), count=len):
        results.update(score_batch(model, encoded, batch, pad_id, padding_free))
    return distributed.gather(results, len(encoded)) if shared else [results[i] for i in range(len(encoded))]
