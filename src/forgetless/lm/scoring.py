"""Per-token NLL of encoded examples under a model in memory: the scoring the score stage, the engines and the
held-out measure share; the same NLLs whichever way a batch is laid out.

* Length-bucketed, right-padded batches with at most :data:`MAX_PADDING` of their tokens padding: on a CPU a
  padded token costs a real one and a bigger batch buys little, so the bucket stops where padding would grow.
* A shared prefix (:class:`SharedPrefix`): the prompt tokens every example starts with (the chat template's system
  prompt, a task's instruction: 64 of MBPP's ~260 tokens per example) run through the decoder once; each batch
  continues their KV cache. Exact under causal attention, as a prefix's states do not depend on what follows.
* Padding-free rows (one row per batch, position ids restarting per example) only under a varlen attention kernel
  (``flash_attention_2/3``): with ``sdpa`` or ``eager`` a packed row attends over its whole length through a dense
  block mask, slower than the padded batches (``benchmarks/bench_score.py``), so those score padded, with a warning.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from forgetless.core.logits import split_causal_lm, token_nll
from forgetless.core.packing import flatten, packing_isolates, restart_positions, split_row
from forgetless.lm import distributed
from forgetless.lm.batching import length_buckets, right_pad
from forgetless.lm.progress import progress
from forgetless.lm.templates import Encoded

logger = logging.getLogger(__name__)

MAX_PADDING = 0.05  # share of a scoring batch's tokens that may be padding
MIN_PREFIX = 8  # shorter shared prefixes are not worth a cache copy per batch


def common_prefix(sequences: list[list[int]], limits: list[int]) -> int:
    """Length of the longest prefix every sequence starts with, and at most each one's ``limit``.

    >>> common_prefix([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]], [4, 4, 3])
    2
    >>> common_prefix([[1, 2, 3, 4], [1, 2, 3, 9]], [4, 1])
    1
    """
    n = min(limits)
    first = sequences[0]
    for seq in sequences[1:]:
        n = next((i for i in range(min(n, len(seq))) if seq[i] != first[i]), min(n, len(seq)))
    return n


def prefix_limit(e: Encoded) -> int:
    """Most prompt tokens of ``e`` a shared prefix may hold: up to the token before its first response token, so
    that every scored token is predicted from a row after the prefix (token ``i`` from row ``i - 1``)."""
    return max(0, e.response_mask.index(1) - 1) if 1 in e.response_mask else len(e)


class SharedPrefix:
    """The KV cache of the tokens a batch's examples all start with, computed once and continued by every batch
    that starts with them too (cropped when a batch shares fewer): those tokens' forward is not repeated per example.

    Holds one prefix, for one model whose weights do not change while it is in use (an engine keeps one for its
    model; :func:`score_encoded` makes one per call otherwise). A model whose cache cannot be cropped or repeated
    (some hybrid / recurrent caches) is scored without, after one log line.
    """

    def __init__(self):
        self.tokens: list[int] = []
        self.states = None
        self.model = None
        self.unsupported = False

    def cache_for(self, model, chosen: list[Encoded]):
        """``(P, cache)``: the ``P`` tokens the examples' rows may skip and their KV cache repeated per example,
        or ``(0, None)`` when they share fewer than :data:`MIN_PREFIX`."""
        if self.unsupported:
            return 0, None
        limits = [prefix_limit(e) for e in chosen]
        sequences = [e.input_ids for e in chosen]
        try:
            if self.model is model and self.tokens:
                n = common_prefix([self.tokens, *sequences], [len(self.tokens), *limits])
                if n >= MIN_PREFIX:
                    return n, self._repeat(n, len(chosen))
            n = common_prefix(sequences, limits)
            if n < MIN_PREFIX:
                return 0, None
            decoder = split_causal_lm(model)[0]
            ids = torch.tensor([sequences[0][:n]], device=next(model.parameters()).device)
            self.states = decoder(input_ids=ids, use_cache=True).past_key_values
            self.tokens, self.model = sequences[0][:n], model
            return n, self._repeat(n, len(chosen))
        except (AttributeError, NotImplementedError, TypeError, ValueError) as exc:
            logger.info("scoring without a shared prefix: this model's cache cannot be reused (%s)", exc)
            self.unsupported, self.states, self.model, self.tokens = True, None, None, []
            return 0, None

    def _repeat(self, n: int, rows: int):
        cache = copy.deepcopy(self.states)
        if n < len(self.tokens):
            cache.crop(n - len(self.tokens))  # transformers 5: a negative count of tokens to drop
        cache.batch_repeat_interleave(rows)
        return cache


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
    """``wanted``, under a varlen attention kernel that keeps packed examples apart; otherwise a
    warning, and padding."""
    if not wanted:
        return False
    implementation = getattr(model.config, "_attn_implementation", None) or "this model's"
    if not packing_isolates(model):
        logger.warning("padding_free: %s attention does not keep packed sequences apart; scoring padded batches",
                       implementation)
        return False
    if "flash" not in implementation:
        logger.warning("padding_free: with %s attention a packed row attends over its whole length (dense block mask), "
                       "slower than padded batches (benchmarks/bench_score.py); scoring padded batches. It pays under "
                       "a varlen kernel: attn_implementation=flash_attention_2", implementation)
        return False
    return True


@torch.no_grad()
def score_batch(model, encoded: list[Encoded], batch: list[int], pad_id: int, padding_free: bool = False,
                prefix: SharedPrefix | None = None) -> dict[int, np.ndarray]:
    """Per-token NLL (float32, NaN where not a response token) of the examples ``batch`` names, in one forward:
    right-padded, continuing ``prefix``'s cache where the examples share one, or with ``padding_free`` laid end
    to end in one row (:mod:`forgetless.core.packing`)."""
    device = next(model.parameters()).device
    chosen = [encoded[i] for i in batch]
    if padding_free:
        ids, positions, response = (t.to(device) for t in flat_batch(chosen))
        nll = split_row(token_nll(model, ids, None, response, positions).cpu(), [len(e) for e in chosen])
        return {i: nll[row].numpy() for row, i in enumerate(batch)}
    skip, cache = prefix.cache_for(model, chosen) if prefix is not None else (0, None)
    rows = [Encoded(e.input_ids[skip:], e.response_mask[skip:]) for e in chosen] if skip else chosen
    ids, attention, response = (t.to(device) for t in pad_batch(rows, pad_id))
    nll = token_nll(model, ids, attention, response, past_key_values=cache).cpu()
    head = np.full(skip, np.nan, dtype=np.float32)  # the prefix's tokens: prompt, never scored
    return {i: np.concatenate([head, nll[row][: len(rows[row])].numpy()]) for row, i in enumerate(batch)}


def score_buckets(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """The scoring batches: length buckets of at most ``batch_tokens`` tokens and :data:`MAX_PADDING` padding."""
    return length_buckets(lengths, batch_tokens, max_padding=MAX_PADDING)


def score_encoded(model, encoded: list[Encoded], pad_id: int, batch_tokens: int = 8192,
                  description: str = "scoring", shared: bool = True, padding_free: bool = False,
                  prefix: SharedPrefix | None = None) -> list[np.ndarray]:
    """Per-token NLL (float32, NaN where not a response token) for each encoded example, in length-bucketed batches
    (see the module's docstring for the layouts: the same NLLs each way). ``prefix``: a :class:`SharedPrefix` kept
    across calls on the same model (default: a new one for this call's batches).

    ``shared``: under a multi-process launch the batches are shared among the processes, which must all call this
    with the same examples (:mod:`forgetless.lm.distributed`); False scores everything here (one process's own work).
    """
    padding_free = use_padding_free(model, padding_free)
    prefix = prefix if prefix is not None else SharedPrefix()
    lengths = [len(e) for e in encoded]
    batches = score_buckets(lengths, batch_tokens)
    mine = distributed.share(batches, lengths) if shared else batches
    results: dict[int, np.ndarray] = {}
    for batch in progress(mine, description, total_items=sum(map(len, mine)), count=len):
        results.update(score_batch(model, encoded, batch, pad_id, padding_free, prefix))
    return distributed.gather(results, len(encoded)) if shared else [results[i] for i in range(len(encoded))]
