"""The library API (forgetless.api, the names exported from `forgetless`) and docs/own-trainer.md run as written."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import forgetless
from conftest import SRC, build_model
from forgetless.core.logits import token_nll  # noqa: F401  (the alignment the scores follow)
from forgetless.lm.data import DataError

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Write a python function to add two numbers."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"}]


def test_every_export_resolves_and_import_stays_light():
    for name in forgetless.__all__:
        assert getattr(forgetless, name) is not None
    code = "import sys, forgetless; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": SRC}, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("shape", ["messages", "bare", "sharegpt", "prompt", "dataset", "jsonl"])
def test_build_sft_table_takes_the_shapes_users_have(shape, tokenizer, tmp_path):
    from datasets import Dataset

    record = {"messages": MESSAGES}
    data = {"messages": [record], "bare": [MESSAGES],
            "sharegpt": [{"conversations": [{"from": "human", "value": MESSAGES[0]["content"]},
                                            {"from": "gpt", "value": MESSAGES[1]["content"]}]}],
            "prompt": [{"prompt": MESSAGES[0]["content"], "response": MESSAGES[1]["content"]}],
            "dataset": Dataset.from_list([record])}.get(shape)
    if shape == "jsonl":
        import json

        data = tmp_path / "d.jsonl"
        data.write_text(json.dumps(record) + "\n")
    table = forgetless.build_sft_table(data, tokenizer)
    assert isinstance(table, Dataset) and len(table) == 1
    expected = forgetless.build_sft_table([record], tokenizer)[0]
    assert table[0]["input_ids"] == expected["input_ids"] and table[0]["labels"] == expected["labels"]
    row = table[0]
    trained = [i for i, y in enumerate(row["labels"]) if y != -100]
    assert trained == [i for i, m in enumerate(row["response_mask"]) if m and i > 0]
    assert all(math.isnan(v) for v in row["nll"])


def test_build_sft_table_names_a_bad_record(tokenizer):
    with pytest.raises(DataError, match="example 1"):
        forgetless.build_sft_table([{"messages": MESSAGES}, {"text": "x"}], tokenizer)


def test_score_dataset_matches_the_models_own_loss(tokenizer):
    """nll[i] scores token i: their mean over the response equals the model's loss on the response labels."""
    model = build_model(len(tokenizer), initializer_range=0.5)
    table = forgetless.score_dataset(model, tokenizer, forgetless.build_sft_table([{"messages": MESSAGES}], tokenizer))
    row = table[0]
    nll = np.array(row["nll"], dtype=np.float64)
    response = np.array(row["response_mask"], bool)
    response[0] = False
    assert np.isnan(nll[~response]).all() and np.isfinite(nll[response]).all()
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=torch.tensor([row["labels"]])).loss.item()
    assert nll[response].mean() == pytest.approx(loss, rel=1e-4)
    assert model.training is False or model.training is True  # restored, whichever it was


def hand_scored(tokenizer):
    """A one-row table whose 4 response NLLs are set by hand: ppl 1.5, 3, 2, 4 (τ = 2.5 masks 3 and 4)."""
    from datasets import Dataset

    ids = list(range(10, 18))
    mask = [0, 0, 0, 0, 1, 1, 1, 1]
    nll = [math.nan] * 4 + [math.log(1.5), math.log(3.0), math.log(2.0), math.log(4.0)]
    return Dataset.from_list([{"id": "0", "input_ids": ids, "response_mask": mask, "labels": [-100] * 8,
                               "loss_weight": [0.0] * 8, "nll": nll}])


def test_mask_dataset_hand_computed(tokenizer):
    stm = forgetless.mask_dataset(hand_scored(tokenizer), policy="threshold", tau=2.5)[0]
    assert stm["labels"] == [-100] * 4 + [14, -100, 16, -100]
    assert stm["loss_weight"] == [0.0] * 4 + [1.0, 0.0, 1.0, 0.0]
    assert stm["masked_fraction"] == 0.5
    soft = forgetless.mask_dataset(hand_scored(tokenizer), policy="inverse-ppl")[0]
    assert soft["loss_weight"][4:] == pytest.approx([1 / 1.5, 1 / 3, 1 / 2, 1 / 4])
    auto = forgetless.mask_dataset(hand_scored(tokenizer), policy="auto-tau", fraction=0.25)[0]
    assert auto["labels"][4:] == [14, 15, 16, -100]  # the single highest-ppl token
    with pytest.raises(ValueError, match="scored table"):
        forgetless.mask_dataset(hand_scored(tokenizer).remove_columns("nll"))


def test_collator_keeps_nll_for_stm_labels_on_the_fly(tokenizer):
    table = hand_scored(tokenizer)
    collator = forgetless.MaskedBatchCollator(0, keep_nll=True)
    sft = forgetless.mask_dataset(table, policy="none")
    batch = collator([sft[0], {**sft[0], "input_ids": sft[0]["input_ids"][:6], "labels": sft[0]["labels"][:6],
                               "loss_weight": sft[0]["loss_weight"][:6], "nll": sft[0]["nll"][:6]}])
    assert batch["nll"].shape == (2, 8) and torch.isnan(batch["nll"][1, 6:]).all()
    labels = forgetless.stm_labels(batch["labels"], batch["nll"], tau=2.5)
    expected = forgetless.mask_dataset(table, policy="threshold", tau=2.5)[0]["labels"]
    assert labels[0].tolist() == expected
    assert labels[1, :6].tolist() == expected[:6] and labels[1, 6:].tolist() == [-100, -100]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="its TRL examples need the [trl] extra")
def test_own_trainer_doc_runs_as_written(tokenizer, tmp_path, monkeypatch):
    """Every python block of docs/own-trainer.md, in order, on a tiny model built from a config."""
    blocks = python_blocks(ROOT / "docs" / "own-trainer.md")
    assert len(blocks) >= 4
    import trl

    # The doc is written for a GPU (TRL's bf16 default); here: the CPU, one step, no trackers.
    gpu_config = trl.SFTConfig
    monkeypatch.setattr(trl, "SFTConfig", lambda **kw: gpu_config(**{**kw, "use_cpu": True, "bf16": False,
                                                                     "max_steps": 1, "report_to": []}))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "masks").mkdir()
    model = build_model(len(tokenizer))
    namespace = {"model": model, "tokenizer": tokenizer}
    for block in blocks:
        exec(compile(block, "docs/own-trainer.md", "exec"), namespace)
    assert Path("masks/stm.parquet").is_file() and namespace["trainer"] is not None
    # the on-the-fly labels are the STM table's (a random tiny model finds every token surprising: all masked,
    # so its loss is NaN there; the labels are what is checked)
    batch, stm = namespace["batch"], namespace["stm"]
    for b in range(4):
        row = stm[b]["labels"]
        assert batch["labels"][b, :len(row)].tolist() == row
    assert "loss" in namespace
