"""The scoring layouts give the batch-1 NLLs: buckets capped in padding, and the shared prompt prefix whose KV
cache every batch continues (hand-computed prefix lengths, cropping across calls, the response-start limit)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import build_model
from forgetless.lm.batching import length_buckets
from forgetless.lm.engines import HfEngine
from forgetless.lm.scoring import SharedPrefix, common_prefix, prefix_limit, score_batch, score_encoded
from forgetless.lm.templates import Encoded

PREFIX = list(range(40, 52))  # 12 prompt tokens every example starts with


def example(tail: list[int], prompt_tail: int) -> Encoded:
    """PREFIX + tail; the first ``prompt_tail`` tail tokens are prompt, the rest response."""
    ids = PREFIX + tail
    return Encoded(ids, [0] * (len(PREFIX) + prompt_tail) + [1] * (len(tail) - prompt_tail))


@torch.no_grad()
def batch1_nll(model, e: Encoded) -> np.ndarray:
    """The reference: one example alone, full-vocabulary log-softmax, token i from row i - 1."""
    ids = torch.tensor([e.input_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    nll = np.full(len(e), np.nan, dtype=np.float32)
    for i in range(1, len(e)):
        if e.response_mask[i]:
            nll[i] = -float(logp[i - 1, e.input_ids[i]])
    return nll


def assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert (np.isnan(g) == np.isnan(w)).all()
        assert np.nanmax(np.abs(g - w)) < 1e-5


def test_common_prefix_and_its_limit_hand_checked():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 5]], [4, 4, 3]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]], [3, 3]) == 3
    assert common_prefix([[7, 1], [8, 1]], [2, 2]) == 0
    # Response from position 3: the prefix stops at 2, so token 3 is predicted from row 2, outside the prefix.
    assert prefix_limit(Encoded([5, 6, 7, 8, 9], [0, 0, 0, 1, 1])) == 2
    assert prefix_limit(Encoded([5, 6, 7], [0, 0, 0])) == 3  # no response: the whole example may be shared


def test_buckets_cap_padding_hand_checked():
    # Lengths 10, 9, 6, 6 (sorted): [10, 9] pads 1 of 20 tokens (5%); adding a 6 would pad 9 of 30 (30%).
    assert length_buckets([10, 9, 6, 6], batch_tokens=40, max_padding=0.05) == [[0, 1], [2, 3]]
    assert length_buckets([10, 9, 6, 6], batch_tokens=40, max_padding=0.04) == [[0], [1], [2, 3]]
    assert length_buckets([10, 9, 6, 6], batch_tokens=40) == [[0, 1, 2, 3]]  # no cap: the token budget only


def test_shared_prefix_scores_the_batch1_nlls(tokenizer):
    model = build_model(len(tokenizer), seed=5)
    # Equal lengths: one batch, whose common prefix is PREFIX (two examples share 60, 61 beyond it, not all).
    encoded = [example([60, 61, 62, 63, 64, 65], 2), example([70, 71, 72, 73, 74, 75], 1),
               example([60, 61, 80, 81, 82, 83], 3), example([90, 91, 92, 93, 94, 95], 1)]
    want = [batch1_nll(model, e) for e in encoded]
    prefix = SharedPrefix()
    got = score_encoded(model, encoded, tokenizer.pad_token_id, batch_tokens=1000, shared=False, prefix=prefix)
    assert_same(got, want)
    assert prefix.tokens == PREFIX  # every example starts with these 12 tokens, and no more in common
    # Without the prefix the same NLLs (score_batch's own padded path).
    alone = score_batch(model, encoded, list(range(len(encoded))), tokenizer.pad_token_id)
    assert_same([alone[i] for i in range(len(encoded))], want)


def test_prefix_stops_before_the_first_response_token(tokenizer):
    """The examples agree on 14 tokens but one's response starts at token 13: the prefix holds 12, so token 13
    is still scored, from row 12 of its own batch."""
    model = build_model(len(tokenizer), seed=6)
    encoded = [example([60, 61, 62, 63], 1), example([60, 61, 70, 71, 72], 3)]
    prefix = SharedPrefix()
    got = score_encoded(model, encoded, tokenizer.pad_token_id, batch_tokens=1000, shared=False, prefix=prefix)
    assert len(prefix.tokens) == 12 and not np.isnan(got[0][13])
    assert_same(got, [batch1_nll(model, e) for e in encoded])


def test_engine_prefix_is_cropped_for_a_batch_that_shares_fewer_tokens(tokenizer):
    """An engine keeps its prefix across calls: a first call of one example caches its whole prompt (14 tokens), the
    next shares only PREFIX with it and continues a cropped copy; the kept prefix is not changed."""
    model = build_model(len(tokenizer), seed=7)
    first, second = example([60, 61, 62, 63], 2), example([70, 71, 72, 73], 1)
    engine = HfEngine(model, tokenizer, batch_tokens=1000)
    assert_same(engine.score([first]), [batch1_nll(model, first)])
    assert len(engine.prefix.tokens) == 13  # PREFIX + 60: the token before the first response token is not held
    assert_same(engine.score([second]), [batch1_nll(model, second)])
    assert len(engine.prefix.tokens) == 13 and engine.prefix.states.get_seq_length() == 13
    assert_same(engine.score([first, second]), [batch1_nll(model, e) for e in (first, second)])


def test_no_prefix_below_the_minimum(tokenizer):
    model = build_model(len(tokenizer), seed=8)
    encoded = [Encoded([40, 41, 60, 61, 62], [0, 0, 0, 1, 1]), Encoded([40, 41, 70, 71], [0, 0, 1, 1])]
    prefix = SharedPrefix()
    got = score_encoded(model, encoded, tokenizer.pad_token_id, shared=False, prefix=prefix)
    assert prefix.tokens == [] and prefix.states is None
    assert_same(got, [batch1_nll(model, e) for e in encoded])


def test_padding_free_scoring_falls_back_under_sdpa(tokenizer, caplog):
    """sdpa packs through a dense block mask, slower than padded batches: scored padded, with the reason logged."""
    model = build_model(len(tokenizer), seed=9)
    encoded = [example([60, 61, 62], 1), example([70, 71, 72, 73], 2)]
    with caplog.at_level(logging.WARNING):
        got = score_encoded(model, encoded, tokenizer.pad_token_id, shared=False, padding_free=True)
    assert "slower than padded batches" in caplog.text
    assert_same(got, [batch1_nll(model, e) for e in encoded])


@pytest.mark.parametrize("padding_free", [False, True])
def test_score_batch_layouts_hand_aligned(tokenizer, padding_free):
    """score_batch without fallback, padded and packed: the same NLLs as one example at a time."""
    model = build_model(len(tokenizer), seed=10)
    encoded = [example([60, 61, 62, 63, 64], 2), example([70, 71], 1), Encoded([50, 51, 52], [1, 1, 1])]
    got = score_batch(model, encoded, [0, 1, 2], tokenizer.pad_token_id, padding_free=padding_free)
    assert_same([got[i] for i in range(3)], [batch1_nll(model, e) for e in encoded])
    assert np.isnan(got[2][0])  # position 0 is never scored


def test_a_cache_that_cannot_be_reused_scores_without_the_prefix(tokenizer, monkeypatch, caplog):
    """A model whose cache cannot be cropped or repeated (some hybrid caches): one log line, then no prefix, and the
    same NLLs."""
    model = build_model(len(tokenizer), seed=11)
    encoded = [example([60, 61, 62, 63], 1), example([70, 71, 72, 73], 2)]

    def refuse(self, n, rows):
        raise NotImplementedError("this cache cannot be repeated")

    monkeypatch.setattr(SharedPrefix, "_repeat", refuse)
    prefix = SharedPrefix()
    with caplog.at_level(logging.INFO):
        got = score_encoded(model, encoded, tokenizer.pad_token_id, shared=False, prefix=prefix)
    assert prefix.unsupported and prefix.states is None and "without a shared prefix" in caplog.text
    assert_same(got, [batch1_nll(model, e) for e in encoded])
