"""Determinism (same config and seed: same masks, data order and CPU loss curve) and stale caches (a change of
model, tokenizer, chat template, data or length invalidates scores and cached base evaluations, and says why)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from conftest import build_model, build_tokenizer
from forgetless.train.collate import build_sft_table, write_table
from forgetless.lm.data import load_examples
from forgetless.eval.stage import EvalConfig, evaluate_tasks
from forgetless.mask.stage import MaskConfig, run_mask
from forgetless.lm.modeling import model_fingerprint
from forgetless.score.stage import ScoreConfig, run_score
from forgetless.eval.tasks.custom import task_from_definition
from forgetless.train.stage import TrainConfig, run_train


@pytest.fixture
def world(tmp_path, tiny_model_copy):
    """tmp_path with data.jsonl and a private copy of the tiny model in ``model`` (the tests below rewrite it)."""
    rows = [{"id": f"ex{i}", "prompt": f"Write a python function number {i}.",
             "response": "def add(a, b):\n    return a + b" + " + 0" * i} for i in range(8)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def score(world, **kw):
    return run_score(ScoreConfig(model=str(world / "model"), data=str(world / "data.jsonl"),
                                 out_dir=str(world / "scores"), device="cpu", **kw))


def test_same_seed_same_masks(world):
    scores = score(world)

    def labels(name, **kw):
        out = run_mask(MaskConfig(scores=str(scores), out_dir=str(world / name), **kw))
        return pq.read_table(out / "data.parquet").column("labels").to_pylist()

    # A random tiny model puts every token near ppl 400: fractions, not tau, give masks with both kinds of token.
    for policy in ("random", "fraction", "threshold"):
        kw = dict(policy=policy, tau=400.0) if policy == "threshold" else dict(policy=policy, fraction=0.3)
        assert labels(f"{policy}-a", seed=0, **kw) == labels(f"{policy}-b", seed=0, **kw)
    a = labels("random-c", policy="random", fraction=0.3, seed=0)
    b = labels("random-d", policy="random", fraction=0.3, seed=1)
    trained = [sum(y != -100 for y in row) for row in a]
    assert a != b and sum(trained) > 0 and sum(trained) == sum(sum(y != -100 for y in row) for row in b)


def test_same_seed_same_data_order_and_loss_curve(world, monkeypatch):
    import forgetless.train.loss as loss_module

    tok = build_tokenizer("chatml")
    write_table(build_sft_table(load_examples(str(world / "data.jsonl")), tok), world / "sft.parquet")
    real, seen = loss_module.compute_masked_loss, []

    def recording(model, inputs, *args, **kwargs):
        seen.append([int(x) for x in (inputs["labels"] != -100).sum(dim=1)])  # which examples, in which order
        return real(model, inputs, *args, **kwargs)

    monkeypatch.setattr(loss_module, "compute_masked_loss", recording)

    def run(name, seed):
        seen.clear()
        out = run_train(TrainConfig(data=str(world / "sft.parquet"), output_dir=str(world / name),
                                    model=str(world / "model"), device="cpu", max_steps=4, batch_size=2,
                                    learning_rate=2e-2, lora_dropout=0.1, seed=seed))
        return list(seen), (out / "loss.jsonl").read_text()

    order_a, curve_a = run("a", 0)
    order_b, curve_b = run("b", 0)
    order_c, _ = run("c", 1)
    assert len(order_a) == 4 and order_a == order_b
    assert curve_a == curve_b  # byte-identical loss.jsonl on CPU
    assert order_c != order_a  # the seed does decide the order


def test_score_cache_rejects_changed_model_and_tokenizer(world, caplog):
    """Extends tests/test_stages.py (max_length, data, chat template) with the model weights and the tokenizer."""
    caplog.set_level("INFO")
    first = (score(world) / "scores.parquet").stat().st_mtime_ns
    build_model(len(build_tokenizer("chatml")), seed=1).save_pretrained(world / "model")
    score(world)
    assert "model changed" in caplog.text
    assert (world / "scores" / "scores.parquet").stat().st_mtime_ns != first
    tok = build_tokenizer("chatml")
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(world / "model")
    caplog.clear()
    score(world)
    assert "model, template changed" in caplog.text  # tokenizer files and vocabulary both moved
    manifest = json.loads((world / "scores" / "manifest.json").read_text())
    assert manifest["key"]["model"] == model_fingerprint(str(world / "model"))


def test_eval_base_cache_rejects_changes_and_says_why(world, caplog):
    caplog.set_level("INFO")
    data = world / "echo.jsonl"
    data.write_text("".join(json.dumps({"id": f"i{i}", "q": f"say {i}", "a": str(i)}) + "\n" for i in range(3)))
    task = task_from_definition({"name": "echo", "data": str(data), "prompt": "{q}", "gold": "a", "metric": "numeric",
                                 "max_new_tokens": 4})
    calls = []

    def fake_generate(prompts, decoding):
        calls.append(len(prompts))
        return [p[0]["content"].split()[-1] for p in prompts]

    def evaluate(name, **kw):
        out = world / name
        out.mkdir()
        caplog.clear()
        cfg = EvalConfig(tasks=("echo",), cache_dir=str(world / "cache"), progress=False, **kw)
        evaluate_tasks([task], cfg, fake_generate, out, fingerprint=model_fingerprint(str(world / "model")))
        return json.loads((out / "echo.json").read_text())["settings"]["source"]

    assert evaluate("a") == "generated" and evaluate("b") == "cache"
    tok = build_tokenizer("chatml")
    tok.chat_template = tok.chat_template.replace("helpful", "careful")
    tok.save_pretrained(world / "model")
    assert evaluate("template") == "generated" and "not used: model files" in caplog.text
    build_model(len(tok), seed=2).save_pretrained(world / "model")
    assert evaluate("weights") == "generated" and "not used: model files" in caplog.text
    assert evaluate("max-new-tokens", max_new_tokens=2) == "generated" and "not used: decoding settings" in caplog.text
    data.write_text(data.read_text().replace("say 1", "say one"))
    assert evaluate("data") == "generated" and "not used: items" in caplog.text
    assert evaluate("again") == "cache"
    assert calls == [3] * 5
