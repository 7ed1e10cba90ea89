"""run_train end to end on a tiny model: outputs, adapters that load back, accumulation invariance, resume."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import Crash, build_model, conversations, crash_at, train_config
from forgetless.core.errors import ConfigError
from forgetless.train.collate import (MaskedBatchCollator, TableError, build_sft_table, check_row, read_table,
                                      table_counts, write_table)
from forgetless.train.stage import TrainConfig, run_train

# train_world's tables: the 8 responses (answer + <|im_end|>) are these many tokens, each starting at position 30.
RESPONSE_LENGTHS = [14, 11, 28, 11, 27, 16, 10, 21]  # 138 in all
# stm.parquet drops positions divisible by 3; 30 is one, so ceil(n / 3) of each: 5+4+10+4+9+6+4+7 = 49 dropped.
EXPECTED_COUNTS = {
    "sft": {"examples": 8, "response_tokens": 138, "trained_tokens": 138, "trained_weight": 138.0,
            "masked_fraction": 0.0, "examples_without_trained_tokens": 0},
    "stm": {"examples": 8, "response_tokens": 138, "trained_tokens": 89, "trained_weight": 89.0,
            "masked_fraction": 49 / 138, "examples_without_trained_tokens": 0},
}


def test_train_world_tables_hold_the_hand_counted_tokens(train_world):
    for table in ("sft", "stm"):
        rows = read_table(train_world.root / f"{table}.parquet")
        assert [sum(r["response_mask"]) for r in rows] == RESPONSE_LENGTHS
        assert all(r["response_mask"].index(1) == 30 for r in rows)
        trained = sum(y != -100 for r in rows for y in r["labels"])
        assert trained == EXPECTED_COUNTS[table]["trained_tokens"]


def test_build_sft_table_and_collator(tokenizer):
    rows = build_sft_table(conversations(2), tokenizer)
    for r in rows:
        check_row(r, 0)
        assert r["labels"][0] == -100
        assert [y != -100 for y in r["labels"][1:]] == [bool(m) for m in r["response_mask"][1:]]
    b = MaskedBatchCollator(tokenizer.pad_token_id)(rows)
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert b["attention_mask"][short].sum().item() == n
    assert (b["input_ids"][short, n:] == tokenizer.pad_token_id).all()
    assert (b["labels"][short, n:] == -100).all() and (b["loss_weight"][short, n:] == 0).all()
    assert table_counts(rows)["masked_fraction"] == pytest.approx(1 - sum(sum(r["response_mask"][1:]) for r in rows)
                                                                  / sum(sum(r["response_mask"]) for r in rows))


def test_check_row_rejects_inconsistent_rows(tokenizer):
    row = build_sft_table(conversations(1), tokenizer)[0]
    bad = dict(row, loss_weight=[0.0] * len(row["labels"]))  # trained labels with zero weight
    with pytest.raises(TableError, match="loss_weight"):
        check_row(bad, 3)
    with pytest.raises(TableError, match="length"):
        check_row(dict(row, labels=row["labels"][:-1]), 0)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="kl_coef"):
        TrainConfig(data="x", output_dir=str(tmp_path), method="kl")
    with pytest.raises(ValueError, match="adapter"):
        TrainConfig(data="x", output_dir=str(tmp_path), adapter="qlora")
    with pytest.raises(ValueError, match="save_steps must be a whole number of steps"):
        TrainConfig(data="x", output_dir=str(tmp_path), save_steps=2.5)


def test_checkpoint_interval_is_a_count_or_a_share_of_the_steps():
    from forgetless.train.stage import checkpoint_interval

    assert TrainConfig(data="x", output_dir="o").save_steps == 0.1  # ten checkpoints a run unless told otherwise
    assert checkpoint_interval(0.1) == 0.1
    assert isinstance(checkpoint_interval(3.0), int) and checkpoint_interval(3.0) == 3
    assert checkpoint_interval(0) == 500  # the Trainer's own value; save_strategy is "no"


@pytest.mark.parametrize("adapter,method,table",
                         [("lora", "sft", "sft"), ("dora", "stm", "stm"), ("full", "kl", "sft")])
def test_run_train_outputs(train_world, adapter, method, table):
    cfg = train_config(train_world, f"run-{adapter}", table, adapter=adapter, method=method,
                 kl_coef=0.5 if method == "kl" else 0.0, merge=adapter != "full")
    out = run_train(cfg)
    lines = [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all(x["trained_tokens"] > 0 for x in lines)
    assert ("kl_per_token" in lines[0]) == (method == "kl")
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["table"] == pytest.approx(EXPECTED_COUNTS[table])
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["num_modules"] == 14 and diag["total_frobenius"] > 0
    assert json.loads((out / "manifest.json").read_text())["data_fingerprint"]
    ids = torch.tensor([read_table(cfg.data)[0]["input_ids"]])
    base = build_model(len(train_world.tokenizer))
    if adapter == "full":
        from transformers import AutoModelForCausalLM

        tuned = AutoModelForCausalLM.from_pretrained(out / "model")
    else:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(build_model(len(train_world.tokenizer)), out / "adapter").eval()
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(out / "merged")
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert (tuned(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_trainer_accumulation_1x4_equals_4x1(train_world):
    """Through the real Trainer: one SGD step of batch 4 x 1 and of batch 1 x 4 give the same weights."""
    from transformers import AutoModelForCausalLM

    common = dict(table="stm", adapter="full", max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=1e9,
                  epochs=1.0)
    a = run_train(train_config(train_world, "ga-4x1", batch_size=4, grad_accum=1, **common))
    b = run_train(train_config(train_world, "ga-1x4", batch_size=1, grad_accum=4, **common))
    la, lb = (json.loads((d / "loss.jsonl").read_text().splitlines()[0]) for d in (a, b))
    assert la["trained_tokens"] == lb["trained_tokens"]
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)
    wa, wb = (AutoModelForCausalLM.from_pretrained(d / "model").state_dict() for d in (a, b))
    base = build_model(len(train_world.tokenizer)).state_dict()
    assert (wa["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]).abs().max() > 1e-4
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_resume_after_crash_matches_uninterrupted(train_world):
    kw = dict(max_steps=5, save_steps=2, lora_dropout=0.1, learning_rate=2e-2)
    full = run_train(train_config(train_world, "resume-full", **kw))
    with pytest.raises(Crash):
        run_train(train_config(train_world, "resume-cut", **kw), callbacks=[crash_at(3)])
    # a fresh run would train over the interrupted one's checkpoints: it stops before any model loads
    with pytest.raises(ConfigError, match=r"interrupted run's checkpoint \(checkpoint-2\): resume=true continues"):
        run_train(train_config(train_world, "resume-cut", model="/no/such/model", **kw))
    cut = run_train(train_config(train_world, "resume-cut", resume=True, **kw))
    assert not list((cut / "checkpoints").glob("checkpoint-*"))  # a finished run keeps no checkpoints
    summary = json.loads((cut / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-2")
    steps = [json.loads(x)["step"] for x in (cut / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    losses = [[json.loads(x)["loss"] for x in (d / "loss.jsonl").read_text().splitlines()] for d in (full, cut)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    from safetensors.torch import load_file

    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (full, cut))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_short_real_run_on_embedded_mbpp(tmp_path, embedded):
    """A few LoRA steps on 4 bundled MBPP examples: the adapter loads back and changes the outputs."""
    from peft import PeftModel

    from forgetless.lm.data import load_examples

    model, tok = embedded
    # The 4 shortest of the first 8 (158-208 tokens): the prompts alone run to 245 tokens, so no cut.
    rows = sorted(build_sft_table(load_examples("mbpp-train", limit=8), tok), key=lambda r: len(r["input_ids"]))[:4]
    write_table(rows, tmp_path / "mbpp.parquet")
    out = run_train(TrainConfig(data=str(tmp_path / "mbpp.parquet"), output_dir=str(tmp_path / "run"),
                                max_steps=2, batch_size=1, learning_rate=1e-3, device="cpu"))
    ids = torch.tensor([rows[0]["input_ids"][:32]])
    with torch.no_grad():
        before = model(ids).logits
        tuned = PeftModel.from_pretrained(model, out / "adapter")
        after = tuned(ids).logits
    tuned.unload()  # hand the shared session model back without the adapter
    assert (after - before).abs().max() > 1e-3
    assert json.loads((out / "diagnostics.json").read_text())["num_modules"] == 30 * 7
