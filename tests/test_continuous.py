"""Continuous batching (lm/continuous.py) gives the answers of one-prompt-at-a-time ``model.generate``, item by item,
with no decode step spent on a row that has stopped."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model, build_tokenizer
from forgetless.lm import decode
from forgetless.lm.continuous import SlotDecoder, supports_slots
from forgetless.lm.decode import DecodingSettings, decode_ids, sample_batch
from forgetless.lm.templates import encode_prompt

QUESTIONS = ["Write a python function to add two numbers.", "hello", "def add(a, b):",
             "The quick brown fox jumps over the lazy dog. 0123456789", "print('hello world')",
             "assert add(1, 2) == 3\nassert add(0, 0) == 0", "You are a helpful assistant."]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("chatml")


def prompts_of(tok, questions=QUESTIONS):
    return [encode_prompt(tok, [{"role": "user", "content": q}]) for q in questions]


def one_at_a_time(model, tok, prompts, settings):
    """The reference: ``model.generate`` on each prompt alone (no padding, no cache tricks)."""
    out = {}
    decode._decode_padded(model, tok, prompts, list(range(len(prompts))), settings, 1,
                          lambda i, new, stop: out.__setitem__(i, (new, stop)))
    return [out[i] for i in range(len(prompts))]


def frequent_token(answers) -> int:
    """A token that the reference writes in some rows (at least two) but not all: made a stop token, rows stop at
    different steps and some run to the budget."""
    rows_with = {}
    for new, _ in answers:
        for t in set(new[1:]):
            rows_with[t] = rows_with.get(t, 0) + 1
    return max((t for t, n in rows_with.items() if 2 <= n < len(answers)), key=lambda t: (rows_with[t], -t))


@pytest.mark.parametrize("overrides", [{}, {"attn_implementation": "eager"}, {"num_key_value_heads": 4},
                                       {"head_dim": 16}])
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_greedy_equals_one_prompt_at_a_time(tok, monkeypatch, overrides, rows):
    model = build_model(len(tok), seed=3, **overrides)
    prompts, settings = prompts_of(tok), DecodingSettings(max_new_tokens=12)
    stop = frequent_token(one_at_a_time(model, tok, prompts, settings))
    monkeypatch.setattr(decode, "stop_token_ids", lambda _: [stop])
    reference = one_at_a_time(model, tok, prompts, settings)
    stops = [s for _, s in reference]
    assert stops.count(stop) >= 2 and None in stops  # some rows stop early, some run to the budget
    assert decode_ids(model, tok, prompts, settings, batch_size=rows, show_progress=False) == reference


def test_no_decode_step_for_a_stopped_row(tok, monkeypatch):
    model = build_model(len(tok), seed=3)
    prompts, settings = prompts_of(tok), DecodingSettings(max_new_tokens=12)
    stop = frequent_token(one_at_a_time(model, tok, prompts, settings))
    answers = {}
    decoder = SlotDecoder(model, 3, {stop}, 12, lambda logits, rows: logits.argmax(-1),
                          lambda i, new, s: answers.__setitem__(i, (list(new), s)))
    decoder.run(prompts, list(range(len(prompts))), [None] * len(prompts))
    written = [len(new) + (s is not None) for new, s in answers.values()]  # tokens chosen, the stop included
    # The first token of a row comes from its prefill; every later one from one row of one decode step.
    assert decoder.row_steps == sum(written) - len(prompts)
    assert decoder.steps < sum(written) - len(prompts)  # rows shared steps
    assert max(len(new) for new, _ in answers.values()) == 12 and min(written) < 12


def test_budget_and_stop_rule(tok, monkeypatch):
    """An answer cut at the budget has exactly max_new_tokens tokens and no stop; a stop ends it, not kept."""
    model = build_model(len(tok), seed=3)
    prompts = prompts_of(tok)[:3]
    (new, _), *_ = decode_ids(model, tok, prompts, DecodingSettings(max_new_tokens=6), batch_size=2,
                              show_progress=False)
    monkeypatch.setattr(decode, "stop_token_ids", lambda _: [new[3]])  # the 4th token of answer 0 becomes a stop
    cut = decode_ids(model, tok, prompts, DecodingSettings(max_new_tokens=6), batch_size=2, show_progress=False)
    assert cut[0] == (new[: new.index(new[3])], new[3])


def test_budget_counts_the_stop_token(tok, monkeypatch):
    model = build_model(len(tok), seed=3)
    prompts = prompts_of(tok)[:1]
    free = decode_ids(model, tok, prompts, DecodingSettings(max_new_tokens=8), show_progress=False)[0][0]
    last = free[4]
    first = free.index(last)
    monkeypatch.setattr(decode, "stop_token_ids", lambda _: [last])
    # With a budget of first + 1 tokens the stop is the last token it may write: kept as the stop.
    assert decode_ids(model, tok, prompts, DecodingSettings(max_new_tokens=first + 1), show_progress=False) == [
        (free[:first], last)]
    # One token less and the answer is cut before it, with no stop.
    assert decode_ids(model, tok, prompts, DecodingSettings(max_new_tokens=first), show_progress=False) == [
        (free[:first], None)]


def test_samples_are_seeded_per_sample_not_per_batch(tok):
    model = build_model(len(tok), seed=3)
    prompts, settings = prompts_of(tok)[:4], DecodingSettings(max_new_tokens=10, greedy=False, temperature=1.5)
    a = sample_batch(model, tok, prompts, 3, settings, seed=7, batch_size=2)
    b = sample_batch(model, tok, prompts, 3, settings, seed=7, batch_size=12)
    c = sample_batch(model, tok, prompts[1:2], 3, settings, seed=7, batch_size=12)
    assert a == b  # the same samples however many rows share the steps
    assert len({s.text for p in a for s in p}) > 6  # samples differ from each other
    assert c[0] != a[1]  # the seed follows the position in the call (prompt 1 of 4 is not prompt 0 of 1)
    assert sample_batch(model, tok, prompts, 3, settings, seed=8, batch_size=2) != a


def test_models_it_cannot_run_decode_padded(tok, caplog):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=4)).eval()
    assert supports_slots(model) == "sliding-window attention"
    prompts, settings = prompts_of(tok)[:3], DecodingSettings(max_new_tokens=5)
    with caplog.at_level("INFO"):
        got = decode_ids(model, tok, prompts, settings, batch_size=2, show_progress=False)
    assert "padded generate() batches (sliding-window attention)" in caplog.text
    assert got == one_at_a_time(model, tok, prompts, settings)
    assert supports_slots(build_model(len(tok))) is None


def test_qwen2_without_sliding_window_runs_in_slots(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False)).eval()
    assert supports_slots(model) is None
    prompts, settings = prompts_of(tok), DecodingSettings(max_new_tokens=8)
    assert decode_ids(model, tok, prompts, settings, batch_size=3, show_progress=False) == one_at_a_time(
        model, tok, prompts, settings)


def test_live_rows_fit_the_kv_cache_budget(tok, monkeypatch):
    from forgetless.lm import continuous

    model = build_model(len(tok), seed=3)  # 2 layers, 2 kv heads of 8: 2 * 2 * 2 * 8 * 4 = 256 bytes a token, k and v
    prompts = prompts_of(tok)
    longest = max(map(len, prompts)) + 5
    monkeypatch.setattr(continuous, "KV_CACHE_BYTES", 256 * longest * 2 + 255)  # room for two rows, not three
    decoder = SlotDecoder(model, 32, set(), 5, lambda logits, rows: logits.argmax(-1), lambda *a: None)
    decoder.run(prompts, list(range(len(prompts))), [None] * len(prompts))
    assert decoder.rows == 2 and decoder.cache.keys[0].shape[0] == 2
    decoder = SlotDecoder(model, 32, set(), 5, lambda logits, rows: logits.argmax(-1), lambda *a: None)
    decoder.run(prompts[:3], [0, 1, 2], [None] * 3)
    assert decoder.rows == 2  # never more rows than prompts, nor than the budget
    monkeypatch.setattr(continuous, "KV_CACHE_BYTES", 1 << 30)
    decoder = SlotDecoder(model, 32, set(), 5, lambda logits, rows: logits.argmax(-1), lambda *a: None)
    decoder.run(prompts[:3], [0, 1, 2], [None] * 3)
    assert decoder.rows == 3


@pytest.mark.slow
def test_embedded_greedy_equals_one_prompt_at_a_time(embedded):
    """The embedded model on GSM8K and MBPP prompts: continuous batching (3 rows for 6 prompts, so rows are
    refilled and moved) writes what ``model.generate`` writes for each prompt alone."""
    from forgetless.eval.tasks import get_task
    from forgetless.retention.answers import prompt_set

    model, tokenizer = embedded
    messages = prompt_set("gsm8k", 3)[1] + [item.messages for item in get_task("mbpp-test").load()[:3]]
    prompts = [encode_prompt(tokenizer, m) for m in messages]
    settings = DecodingSettings(max_new_tokens=40)
    reference = one_at_a_time(model, tokenizer, prompts, settings)
    assert decode_ids(model, tokenizer, prompts, settings, batch_size=3, show_progress=False) == reference


def lora_model(tok, **lora):
    """A tiny Llama with a LoRA adapter whose B is not zero (the adapter changes the answers)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                        **lora)
    return get_peft_model(build_model(len(tok), seed=3), config).eval()


def test_lora_decodes_merged_with_the_unmerged_answers_and_weights_restored(tok, monkeypatch):
    from peft.tuners.lora import LoraLayer

    from forgetless.lm.modeling import merged_lora

    model = lora_model(tok)
    prompts, settings = prompts_of(tok), DecodingSettings(max_new_tokens=12)
    unmerged = one_at_a_time(model, tok, prompts, settings)  # PEFT's wrapped layers, adapter applied per forward
    with model.disable_adapter():
        assert one_at_a_time(model, tok, prompts, settings) != unmerged  # the adapter matters
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged_during = []
    original = decode.SlotDecoder.run
    monkeypatch.setattr(decode.SlotDecoder, "run", lambda self, *a: (
        merged_during.append(all(m.merged for m in model.modules() if isinstance(m, LoraLayer))), original(self, *a)))
    assert decode_ids(model, tok, prompts, settings, batch_size=3, show_progress=False) == unmerged
    assert merged_during == [True]
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLayer))  # unmerged on the way out
    after = model.state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-6
    with model.disable_adapter(), merged_lora(model) as m:  # the adapter-disabled base view stays the base
        assert not any(x.merged for x in m.modules() if isinstance(x, LoraLayer))


def test_dora_and_plain_models_are_left_unmerged(tok):
    from peft.tuners.lora import LoraLayer

    from forgetless.lm.modeling import merged_lora

    dora = lora_model(tok, use_dora=True)
    with merged_lora(dora):
        assert not any(m.merged for m in dora.modules() if isinstance(m, LoraLayer))
    plain = build_model(len(tok), seed=3)
    weights = {k: v.clone() for k, v in plain.state_dict().items()}
    with merged_lora(plain) as m:
        assert m is plain
    assert all(torch.equal(weights[k], v) for k, v in plain.state_dict().items())
