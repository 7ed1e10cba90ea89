"""keep=best-epoch: each epoch's adapter is saved and measured; the run keeps the best (ties: the earlier)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import train_config
from forgetless.train.select import best_epoch
from forgetless.train.stage import run_train


def stub_measure(scores: list[float]):
    """A selection measure that returns ``scores`` in turn, one per epoch, and counts its calls."""
    calls = []

    def measure(model) -> dict:
        assert not model.training and not torch.is_grad_enabled()  # measured as in evaluation
        calls.append(len(calls))
        return {"metric": "stub", "score": scores[len(calls) - 1], "n": 1, "higher_is_better": True}
    return measure, calls


def adapter_weights(path):
    return load_file(path / "adapter_model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scores, kept", [([0.7, 0.3], 1), ([0.2, 0.9], 2), ([0.5, 0.5], 1)])
def test_the_kept_adapter_is_the_best_epochs(train_world, scores, kept):
    name = f"best-{'-'.join(map(str, scores))}"
    cfg = train_config(train_world, name, max_steps=-1, epochs=2, keep="best-epoch")
    measure, calls = stub_measure(scores)
    out = run_train(cfg, select_measure=measure)
    assert len(calls) == 2
    epochs = [adapter_weights(out / "epochs" / f"epoch-{k}") for k in (1, 2)]
    assert not same(epochs[0], epochs[1])  # the epochs differ, so the choice is visible
    assert same(adapter_weights(out / "adapter"), epochs[kept - 1])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["keep"] == "best-epoch" and summary["kept_epoch"] == kept
    assert [(r["epoch"], r["step"], r["score"]) for r in summary["epochs"]] == [(1, 4, scores[0]), (2, 8, scores[1])]


def test_best_epoch_lower_is_better_and_nan_never_wins():
    rows = [{"epoch": 1, "score": 1.0}, {"epoch": 2, "score": 0.5}, {"epoch": 3, "score": float("nan")}]
    assert best_epoch([{**r, "higher_is_better": False} for r in rows]) == 2
    assert best_epoch([{**r, "higher_is_better": True} for r in rows]) == 1
    with pytest.raises(ValueError, match="no epoch has a score"):
        best_epoch([{"epoch": 1, "score": float("nan"), "higher_is_better": True}])


@pytest.mark.parametrize("overrides, message", [
    ({"keep": "best"}, "keep must be one of"),
    ({"adapter": "full"}, "adapter=full"),
    ({"max_steps": 3}, "whole epochs"),
    ({"max_steps": -1, "epochs": 1.5}, "whole epochs"),
    ({"max_steps": -1, "select_on": "gen:mbpp-validation:accuracy"},
     "records gen:mbpp-validation, gen:mbpp-validation:defines"),
    ({"max_steps": -1, "select_on": "mbbp"}, "unknown task 'mbbp'"),
])
def test_best_epoch_settings_are_checked_when_built(train_world, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_config(train_world, "x", **{"keep": "best-epoch", **overrides})


def test_select_on_the_mbpp_eval_task_measures_pass_at_1(train_world):
    cfg = train_config(train_world, "best-mbpp", max_steps=-1, epochs=2, batch_size=4, keep="best-epoch",
                       select_on="mbpp", select_limit=1)
    out = run_train(cfg)
    rows = json.loads((out / "train_summary.json").read_text())["epochs"]
    assert [(r["epoch"], r["metric"], r["n"], r["score"]) for r in rows] == [(1, "pass@1", 1, 0.0),
                                                                             (2, "pass@1", 1, 0.0)]
    assert json.loads((out / "train_summary.json").read_text())["kept_epoch"] == 1  # a tie: the earlier epoch


def test_select_on_a_behaviour_record_reads_that_record(train_world, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from conftest import build_model
    from forgetless.train import select

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(select, "SELECT_MAX_NEW_TOKENS", 8)  # a few tokens of a random model's answer suffice
    cfg = train_config(train_world, "x", max_steps=-1, epochs=2, keep="best-epoch",
                       select_on="gen:mbpp-validation:defines", select_limit=2)
    model = get_peft_model(build_model(len(train_world.tokenizer)), LoraConfig(r=2, target_modules=["q_proj"])).eval()
    record = select.selection_measure(cfg, train_world.tokenizer)(model)
    assert (record["task"], record["metric"], record["n"], record["higher_is_better"]) == (
        "gen:mbpp-validation:defines", "defines", 2, True)
    assert record["score"] == 0.0  # 8 tokens of a random model define no function


def test_a_resumed_run_keeps_the_epochs_measured_before_the_crash(train_world):
    from conftest import Crash, crash_at

    cfg = train_config(train_world, "best-resume", max_steps=-1, epochs=2, keep="best-epoch", save_steps=4)
    measure, calls = stub_measure([0.9, 0.1])
    with pytest.raises(Crash):  # after epoch 1 (steps 1-4, checkpoint at 4) and two steps of epoch 2
        run_train(cfg, callbacks=[crash_at(6)], select_measure=measure)
    assert len(calls) == 1
    epoch_1 = adapter_weights(train_world.root / "best-resume" / "epochs" / "epoch-1")
    measure, calls = stub_measure([0.1])  # only epoch 2 is measured again
    out = run_train(train_config(train_world, "best-resume", max_steps=-1, epochs=2, keep="best-epoch", save_steps=4,
                                 resume=True), select_measure=measure)
    assert len(calls) == 1
    summary = json.loads((out / "train_summary.json").read_text())
    assert [(r["epoch"], r["score"]) for r in summary["epochs"]] == [(1, 0.9), (2, 0.1)]
    assert summary["kept_epoch"] == 1 and same(adapter_weights(out / "adapter"), epoch_1)
