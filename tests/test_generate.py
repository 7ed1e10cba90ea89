"""Generation stage: selection rules, statistics by hand, resumable end-to-end run on a tiny model
with an injected verifier, and verifiers for MBPP (real sandbox) and math answers."""

from __future__ import annotations

import dataclasses

import json
import math
from pathlib import Path

import numpy as np
import pytest

import forgetless.generate.stage as gen
from forgetless.lm.data import Example, load_examples
from forgetless.generate.mechanism import compare_sets, format_table, ppl_summary
from forgetless.lm.engines import HfEngine
from forgetless.lm.decode import DecodingSettings, cut_at_stop, decode_ids, left_pad, sample_batch
from forgetless.eval.tasks import Item, get_task
from forgetless.eval.tasks.math import last_boxed
from forgetless.generate.assemble import select_answer
from forgetless.generate.verify import Verifier, extract_code, make_verifier, mbpp_verifier, reference_gold
from forgetless.lm.data import DataError


def test_left_pad_and_cut_at_stop():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([3, 4, 9, 5, 9], {9}) == ([3, 4], True)
    assert cut_at_stop([3, 4], {9}) == ([3, 4], False)


def test_sample_batch_keeps_prompt_order_and_the_decode_stop_rule(tokenizer, tiny_model):
    """k samples per prompt, cut like decode_ids cuts."""
    prompts = [tokenizer.encode("Write a python"), tokenizer.encode("def add(a, b):"), tokenizer.encode("hello")]
    settings = DecodingSettings(8, greedy=False, temperature=0.7, top_p=0.9)
    sampled = sample_batch(tiny_model, tokenizer, prompts, 2, settings, seed=3)
    assert [len(row) for row in sampled] == [2, 2, 2]
    assert all(s.finished or s.new_tokens == 8 for row in sampled for s in row)
    # With k = 1 and a single prompt, one sample is what decode_ids draws from the same seed.
    (one,) = sample_batch(tiny_model, tokenizer, prompts[:1], 1, settings, seed=5)[0]
    (ids, stop), = decode_ids(tiny_model, tokenizer, prompts[:1], dataclasses.replace(settings, seed=5),
                              show_progress=False)
    assert one.text == tokenizer.decode(ids, skip_special_tokens=True) and one.finished == (stop is not None)
    with pytest.raises(ValueError, match="greedy"):
        sample_batch(tiny_model, tokenizer, prompts, 2, DecodingSettings(8))


def _record(samples):
    return {"id": "x", "ground_truth_verified": True, "samples": [
        {"index": i, "text": f"s{i}", "verified": ok, "mean_nll": nll, "new_tokens": 1, "finished": True,
         "token_nll": None if nll is None else [nll]} for i, (ok, nll) in enumerate(samples)]}


def test_select_answer_rules():
    # sample 1 is wrong despite the lowest NLL; 2 and 3 are correct, 3 has the lower NLL; 4 is empty.
    record = _record([(False, 2.0), (False, 0.1), (True, 1.0), (True, 0.5), (False, None)])
    assert select_answer(record, "lowest-ppl", seed=0)["index"] == 3
    assert select_answer(record, "first", seed=0)["index"] == 2
    picks = {select_answer(record, "random", seed=s)["index"] for s in range(20)}
    assert picks == {2, 3}
    assert select_answer(_record([(False, 1.0), (False, None)]), "lowest-ppl", 0) is None
    # Nothing checked (task none): every non-empty sample is a candidate.
    assert select_answer(_record([(None, 1.0), (None, 0.3), (None, None)]), "lowest-ppl", 0)["index"] == 1


def test_ppl_summary_by_hand():
    # Example A: token NLLs 0 and ln 4 -> example ppl exp(ln4 / 2) = 2. Example B: ln 2 -> ppl 2.
    stats = ppl_summary([np.array([0.0, math.log(4)]), np.array([math.log(2)]), np.array([])], taus=(1.5, 2.5, 10.0))
    assert stats["examples"] == 2 and stats["response_tokens"] == 3
    assert stats["mean_example_ppl"] == pytest.approx(2.0)
    assert stats["corpus_ppl"] == pytest.approx(2.0)  # exp((ln4 + ln2) / 3) = exp(ln 8 / 3)
    assert stats["fraction_examples_ppl_above_2"] == 0.0  # 2 is not above 2
    # token ppls 1, 4, 2: above 1.5 -> 2 of 3; above 2.5 -> 1 of 3; above 10 -> none.
    assert stats["fraction_tokens_above"] == pytest.approx({"1.5": 2 / 3, "2.5": 1 / 3, "10.0": 0.0})


def test_compare_sets_views():
    gt = {"a": np.array([2.0]), "b": np.array([2.0]), "c": np.array([2.0])}
    so = {"a": np.array([0.0]), "b": np.array([2.0]), "c": np.array([0.0])}  # b fell back to the ground truth
    stats = compare_sets({"ground_truth": gt, "self_output": so}, {"self_output": {"a", "c"}},
                         {"every": [np.array([1.0])]})
    assert stats["prompts"] == {"all": 3, "generated": 2}
    assert stats["views"]["all"]["self_output"]["mean_nll"] == pytest.approx(2 / 3)
    assert stats["views"]["generated"]["self_output"]["mean_nll"] == 0.0
    assert stats["views"]["generated"]["ground_truth"]["examples"] == 2
    assert "self_output" in format_table(stats) and "all_samples" in format_table(stats)


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        gen.GenerateConfig(method="distill")
    with pytest.raises(ValueError, match="temperature"):
        gen.GenerateConfig(temperature=0)
    with pytest.raises(ValueError, match="reference"):
        gen.GenerateConfig(method="rephrase", rephrase_template="Rewrite: {instruction}")
    with pytest.raises(ValueError, match="paper"):
        gen.GenerateConfig(method="paper_rephrase", data="gsm8k")
    with pytest.raises(ValueError, match="on_failure"):
        gen.GenerateConfig(on_failure="retry")


def test_defaults_are_the_authors():
    """generate_self-output_training_data.py: 32 samples (one rewrite for rephrase), T 0.7, top-p 0.95, 512 tokens."""
    so, re_ = gen.GenerateConfig(), gen.GenerateConfig(method="rephrase")
    assert (so.samples, so.temperature, so.top_p, so.max_new_tokens, so.choose, so.on_failure) == \
        (32, 0.7, 0.95, 512, "lowest-ppl", "drop")
    assert (re_.samples, gen.GenerateConfig(method="rephrase", samples=4).samples) == (1, 4)


def test_rephrase_prompt_holds_instruction_and_reference():
    ex = Example("1", [{"role": "user", "content": "Add two numbers."},
                       {"role": "assistant", "content": "def add(a, b): return a + b"}])
    cfg = gen.GenerateConfig(method="rephrase", rephrase_template="T: {instruction} | R: {reference}")
    assert gen.generation_prompt(cfg, ex) == [{"role": "user",
                                               "content": "T: Add two numbers. | R: def add(a, b): return a + b"}]
    assert gen.generation_prompt(gen.GenerateConfig(), ex) == ex.prompt_messages
    # The authors' PROMPT_TEMPLATE, filled in.
    assert gen.generation_prompt(gen.GenerateConfig(method="rephrase"), ex)[0]["content"] == (
        "Below are an instruction that describes a task along with a reference answer. Using the reference answer as a "
        "guide, write your own response.\n### Instruction:\nAdd two numbers.\n### Reference Answer:\n"
        "def add(a, b): return a + b\n### Response:")


@pytest.fixture
def tiny_stage(monkeypatch, tokenizer, tiny_model, tmp_path):
    """run_generate on the tiny model; the 'verifier' accepts any answer to e0 and e3, and every ground truth."""
    monkeypatch.setattr(gen, "open_engine", lambda config: HfEngine(tiny_model, tokenizer, config.batch_tokens))
    monkeypatch.setattr(gen, "load_tokenizer", lambda *a, **k: tokenizer)
    monkeypatch.setattr(gen, "model_fingerprint", lambda *a, **k: "tiny")
    monkeypatch.setattr(gen, "make_verifier",
                        lambda *a, **k: Verifier("e0-e3",
                                                 lambda ex, answer: ex.id in ("e0", "e3") or answer == ex.response))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"Write a python function number {i}.",
                                        "response": "def add(a, b):\n    return a + b\n",
                                        "test_list": ["assert 1"]}) + "\n"
                            for i in range(5)))
    defaults = dict(data=str(data), samples=3, max_new_tokens=6, batch_size=2, device="cpu",
                    out_dir=str(tmp_path / "out"))
    return lambda **kw: gen.GenerateConfig(**{**defaults, **kw})


def test_prompts_without_a_passing_answer_are_dropped_and_counted(tiny_stage):
    """The default, as the authors did: only e0's and e3's samples pass, so 3 of 5 prompts leave the data."""
    out = gen.run_generate(tiny_stage())
    examples = load_examples(str(out / gen.DATA_FILE))
    assert [ex.id for ex in examples] == ["e0", "e3"]
    assert all(ex.meta["provenance"]["source"] == "self_output" for ex in examples)
    stats = json.loads((out / "generation_stats.json").read_text())
    assert {k: stats[k] for k in ("prompts", "prompts_with_verified_sample", "prompts_without_passing_answer",
                                  "dropped", "fallbacks", "training_examples")} == \
        {"prompts": 5, "prompts_with_verified_sample": 2, "prompts_without_passing_answer": 3, "dropped": 3,
         "fallbacks": 0, "training_examples": 2}
    # The ppl comparison covers the kept prompts: the ground truth of e0 and e3 against their samples.
    assert json.loads((out / "mechanism_stats.json").read_text())["prompts"]["all"] == 2


def test_nothing_passing_is_an_error_after_the_counts(tiny_stage, monkeypatch):
    monkeypatch.setattr(gen, "make_verifier", lambda *a, **k: Verifier("never", lambda ex, answer: False))
    cfg = tiny_stage()
    with pytest.raises(DataError, match="no prompt of 5 has an answer that passed"):
        gen.run_generate(cfg)
    out = Path(cfg.out_dir)
    stats = json.loads((out / "generation_stats.json").read_text())
    assert (stats["dropped"], stats["training_examples"]) == (5, 0) and not (out / "manifest.json").exists()


def test_run_generate_end_to_end_and_resume(tiny_stage):
    cfg = tiny_stage(on_failure="ground_truth")
    out = gen.run_generate(cfg)
    samples = (out / gen.SAMPLES_FILE).read_text().splitlines()
    records = [json.loads(line) for line in samples]
    assert [r["id"] for r in records] == [f"e{i}" for i in range(5)]
    examples = load_examples(str(out / gen.DATA_FILE))  # readable by score/train like any data set
    assert len(examples) == 5
    stats = json.loads((out / "generation_stats.json").read_text())
    # Only e0's and e3's samples pass: the other three prompts fall back to their ground truth.
    assert (stats["prompts_with_verified_sample"], stats["fallbacks"], stats["dropped"]) == (2, 3, 0)
    assert [ex.meta["provenance"]["fallback"] for ex in examples] == [False, True, True, False, True]
    assert stats["samples"] == 15 and stats["ground_truth_verified"] == 5
    for ex, r in zip(examples, records):
        prov = ex.meta["provenance"]
        assert set(prov) >= {"source", "sample_index", "verified", "base_ppl", "fallback"}
        if prov["fallback"]:
            assert prov["source"] == "ground_truth" and ex.response == "def add(a, b):\n    return a + b\n"
        else:
            chosen = r["samples"][prov["sample_index"]]
            assert chosen["verified"] and ex.response == chosen["text"]
            assert prov["base_ppl"] == pytest.approx(math.exp(np.mean(chosen["token_nll"])), rel=1e-3)
        assert "response" not in ex.meta  # the original answer field would contradict the messages
    mech = json.loads((out / "mechanism_stats.json").read_text())
    assert set(mech["views"]["all"]) == {"ground_truth", "self_output"}

    # Crash after the first batch (2 prompts) with a torn line: the re-run samples the rest identically.
    (out / gen.SAMPLES_FILE).write_text("\n".join(samples[:2]) + '\n{"id": "e2", "sam')
    for name in ("manifest.json", gen.DATA_FILE):
        (out / name).unlink()
    gen.run_generate(cfg)
    resumed = [json.loads(line) for line in (out / gen.SAMPLES_FILE).read_text().splitlines()]
    assert sorted(resumed, key=lambda r: r["id"]) == records
    assert load_examples(str(out / gen.DATA_FILE))[4].messages == examples[4].messages


def test_changed_sampling_settings_refuse_to_mix(tiny_stage):
    """(on_failure is no sampling setting: changing it re-assembles the same samples.)"""
    gen.run_generate(tiny_stage())
    with pytest.raises(ValueError, match="temperature"):
        gen.run_generate(tiny_stage(temperature=0.9))


def test_extract_code_and_math_golds():
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\ntext") == "def f():\n    return 1\n"
    assert extract_code("```python\ndef f(): pass") == "def f(): pass"  # cut mid-block
    assert extract_code("def f(): pass") == "def f(): pass"
    assert last_boxed(r"so \boxed{\frac{1}{2}} and") == r"\frac{1}{2}"
    gsm = Example("g", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x\n#### 1,234"}])
    assert reference_gold("gsm8k", gsm) == 1234.0
    verify = make_verifier("gsm8k", "gsm8k", gsm)
    assert verify(gsm, "... so the answer is 1234.") and not verify(gsm, "the answer is 1233")
    assert verify(gsm, "It costs $1,234.00.\n#### $1,234.00")
    mth = Example("m",
                  [{"role": "user", "content": "q"}, {"role": "assistant", "content": r"thus $\boxed{\frac{1}{2}}$"}])
    assert reference_gold("math", mth) == r"\frac{1}{2}"
    assert make_verifier("math", "math", mth)(mth, r"The answer is $\boxed{0.5}$")


# (task, reference, answer, correct): the old verifier (math-verify on the whole answer) said the
# opposite on each; evaluation reads the number after '####' (GSM8K) or the boxed answer (MATH).
DISAGREED = [
    ("gsm8k", "x\n#### 12", "#### 12 dollars, after 3 days", True),   # old: took the last number, 3
    ("gsm8k", "x\n#### 18", "#### 18\nWe used 2 steps.", True),      # old: 2
    ("gsm8k", "x\n#### 0.5", "#### 1/2", False),                      # numeric match: '1/2' reads as 1
    ("math", r"so $\boxed{0.5}$", r"\frac12", True),                  # old: no math span, nothing parsed
]


@pytest.mark.parametrize("task, reference, answer, correct", DISAGREED)
def test_verifier_agrees_with_evaluation(task, reference, answer, correct):
    ex = Example("e", [{"role": "user", "content": "q"}, {"role": "assistant", "content": reference}])
    item = Item("e", ex.prompt_messages, reference_gold(task, ex))
    assert get_task(task).evaluate([answer], [item])[0].score == float(correct)
    assert make_verifier(task, task, ex)(ex, answer) is correct


def test_mbpp_verifier_runs_tests_in_sandbox():
    ex = load_examples("mbpp-train", limit=2)
    verify = mbpp_verifier(timeout_s=20)
    assert verify.many(ex, [e.response for e in ex]) == [True, True]
    wrong = ex[1].response.replace("return", "return None and", 1)
    assert verify.many([ex[0], ex[1]], ["no code here", wrong]) == [False, False]


@pytest.mark.slow
def test_embedded_self_output_on_one_mbpp_prompt(embedded, monkeypatch, tmp_path):
    """The real model and the real MBPP sandbox: one prompt, two short samples."""
    monkeypatch.setattr(gen, "open_engine", lambda config: HfEngine(*embedded, config.batch_tokens))
    # 24 tokens rarely pass the tests: keep the reference so that the prompt stays.
    cfg = gen.GenerateConfig(data="mbpp-train", limit=1, samples=2, max_new_tokens=24, device="cpu",
                             on_failure="ground_truth", out_dir=str(tmp_path / "so"))
    out = gen.run_generate(cfg)
    stats = json.loads((out / "generation_stats.json").read_text())
    assert stats["prompts"] == 1 and stats["samples"] == 2 and stats["ground_truth_verified"] == 1
    (ex,) = load_examples(str(out / gen.DATA_FILE))
    assert ex.meta["provenance"]["base_ppl"] > 1.0
    mech = json.loads((out / "mechanism_stats.json").read_text())
    assert mech["views"]["all"]["ground_truth"]["response_tokens"] > 10


def test_paper_method_writes_the_authors_answers(tiny_stage, tmp_path):
    # The bundled file: rows 0 and 1 hold a rephrasing that passed the tests, row 2 only the reference.
    dropped = gen.run_generate(tiny_stage(method="paper_rephrase", data="mbpp-train", limit=3,
                                          out_dir=str(tmp_path / "drop")))
    assert [ex.id for ex in load_examples(str(dropped / gen.DATA_FILE))] == ["601", "602"]
    assert json.loads((dropped / "generation_stats.json").read_text())["dropped"] == 1
    out = gen.run_generate(tiny_stage(method="paper_rephrase", data="mbpp-train", limit=3, on_failure="ground_truth"))
    examples = load_examples(str(out / gen.DATA_FILE))
    stats = json.loads((out / "generation_stats.json").read_text())
    assert len(examples) == 3 and stats["prompts"] == 3
    assert (stats["fallbacks"], stats["dropped"]) == (1, 0)
    assert [ex.meta["provenance"]["source"] for ex in examples] == ["paper_rephrase", "paper_rephrase", "ground_truth"]
    assert examples[2].response == load_examples("mbpp-train", limit=3)[2].response
    assert examples[0].response != load_examples("mbpp-train", limit=1)[0].response
    assert all(ex.meta["provenance"]["base_ppl"] > 1.0 for ex in examples)
    assert not (out / gen.SAMPLES_FILE).exists()


def test_compare_adds_another_runs_answers_and_samples(tiny_stage, tmp_path):
    # With the references kept, every prompt is in both sets (dropping would leave only e0 and e3 in common).
    first = gen.run_generate(tiny_stage(out_dir=str(tmp_path / "so"), on_failure="ground_truth"))
    out = gen.run_generate(tiny_stage(method="rephrase", out_dir=str(tmp_path / "re"), compare=(str(first),),
                                      on_failure="ground_truth"))
    views = json.loads((out / "mechanism_stats.json").read_text())["views"]
    assert list(views["all"]) == ["ground_truth", "rephrase", "self_output"]
    assert views["all_samples"]["self_output (every sample)"]["examples"] == 15
    assert views["all_samples"]["rephrase (every sample)"]["examples"] == 15
