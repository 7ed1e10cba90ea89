"""Scoring with one model and training another that shares its tokenizer (`score_model`), and the
refusal when the tokenizers differ."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import build_tokenizer, save_tiny_model
from forgetless.config import ConfigError
from forgetless.lm.modeling import load_tokenizer
from forgetless.lm.templates import tokenizer_differences
from forgetless.run import MethodSpec, RunConfig, run_experiment
from forgetless.score.stage import ScoreConfig, run_score


def nll_column(scores_dir) -> np.ndarray:
    return np.concatenate([np.asarray(x)
                           for x in pq.read_table(scores_dir / "scores.parquet").column("nll").to_pylist()])


def test_tokenizer_differences_name_what_differs(tokenizer):
    assert tokenizer_differences(tokenizer, build_tokenizer("chatml")) == []
    # Same BPE vocabulary (trained on the same lines), another template and end-of-turn token.
    assert tokenizer_differences(tokenizer, build_tokenizer("llama3")) == ["chat template", "special tokens"]
    other = build_tokenizer("chatml")
    other.add_tokens(["zebra"])
    assert tokenizer_differences(tokenizer, other) == ["vocabulary"]
    other = build_tokenizer("chatml")
    other.pad_token = "<|endoftext|>"  # padding never enters a scored token
    assert tokenizer_differences(tokenizer, other) == []


def test_masks_come_from_the_score_model(tiny_model_dir, tmp_path):
    # A second tiny model, other weights and width, with the trained model's own tokenizer.
    scorer = save_tiny_model(tmp_path / "scorer", load_tokenizer(str(tiny_model_dir)), seed=7, hidden_size=48,
                             max_position_embeddings=2048)
    config = RunConfig(out_dir=str(tmp_path / "out"), model=str(tiny_model_dir), score_model=str(scorer),
                       data="mbpp-train", limit=2, methods=(MethodSpec("auto-tau", fraction=0.3),),
                       eval={"tasks": ["gsm8k"], "limit": 1, "max_new_tokens": 2, "device": "cpu", "cache": False},
                       train={"max_steps": 1, "batch_size": 2, "device": "cpu"}, score={"device": "cpu"})
    run_experiment(config)
    scores = tmp_path / "out" / "scores" / "target"
    direct = run_score(ScoreConfig(model=str(scorer), data="mbpp-train", limit=2, device="cpu",
                                   out_dir=str(tmp_path / "s")))
    own = run_score(ScoreConfig(model=str(tiny_model_dir), data="mbpp-train", limit=2, device="cpu",
                                out_dir=str(tmp_path / "o")))
    np.testing.assert_array_equal(nll_column(scores), nll_column(direct))  # NaN off the response on both
    assert not np.allclose(nll_column(scores), nll_column(own), equal_nan=True)
    assert (tmp_path / "out" / "train" / "auto-tau-q0.3" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_score_model_with_another_tokenizer_is_refused_before_any_work(tiny_model_dir, tmp_path):
    other = save_tiny_model(tmp_path / "other", build_tokenizer("llama3"))
    config = RunConfig(out_dir=str(tmp_path / "out"), model=str(tiny_model_dir), score_model=str(other), eval=None)
    with pytest.raises(ConfigError) as refused:
        run_experiment(config)
    message = str(refused.value)
    assert "\n" not in message and str(other) in message and str(tiny_model_dir) in message
    assert "chat template, special tokens differ" in message
    assert not (tmp_path / "out").exists()


def test_score_model_is_the_one_way_to_name_the_scorer():
    with pytest.raises(ValueError, match="score_model"):
        RunConfig(score={"model": "x"})
