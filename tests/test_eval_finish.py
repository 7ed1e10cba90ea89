"""Eval's finish rate: each item says whether its answer stopped on its own within the new-token budget
(``finished``), each task record the share that did (``finish_rate``, ``n_finished`` of ``n``) beside the budget
(``settings.max_new_tokens``); predictions carry no stop information (None)."""

from __future__ import annotations

import json
import logging
from collections import Counter

import forgetless.lm.decode as decode
from forgetless.eval.stage import EvalConfig, evaluate_model, print_eval_summary, run_eval
from forgetless.eval.tasks.custom import task_from_definition
from forgetless.lm.decode import DecodingSettings, decode_ids
from forgetless.lm.templates import encode_prompt

BUDGET = 6
QUESTIONS = ["say 0", "add two numbers", "hello there", "The quick brown fox", "what is 7 times 8?", "write a poem"]


def _task(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": f"i{i}", "q": q, "a": str(i)}) + "\n"
                                              for i, q in enumerate(QUESTIONS)))
    return task_from_definition({"name": "echo", "data": str(tmp_path / "d.jsonl"), "prompt": "{q}", "gold": "a",
                                 "metric": "numeric", "max_new_tokens": 32})


def _items(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hf_items_say_whether_they_finished_and_the_rate_is_their_share(tmp_path, tokenizer, tiny_model, monkeypatch,
                                                                      caplog):
    task = _task(tmp_path)
    prompts = [encode_prompt(tokenizer, it.messages) for it in task.load()]
    # The whole budget of every answer, under a stop token the model cannot write.
    monkeypatch.setattr(decode, "stop_token_ids", lambda tok: [-1])
    full = [new for new, _ in decode_ids(tiny_model, tokenizer, prompts, DecodingSettings(max_new_tokens=BUDGET),
                                         show_progress=False)]
    assert [len(f) for f in full] == [BUDGET] * len(QUESTIONS)
    # Stop at the commonest token that not every answer writes: those that write it finish, the others are cut.
    stop = next(t for t, n in Counter(t for f in full for t in set(f)).most_common() if n < len(full))
    monkeypatch.setattr(decode, "stop_token_ids", lambda tok: [stop])
    finished = [stop in f for f in full]
    assert 0 < sum(finished) < len(full)

    caplog.set_level(logging.INFO, logger="forgetless.eval.stage")
    cfg = EvalConfig(batch_size=4, max_new_tokens=BUDGET, progress=False)
    summary = evaluate_model(tiny_model, tokenizer, cfg, tmp_path / "out", tasks=[task])["echo"]
    records = _items(tmp_path / "out" / "echo.items.jsonl")
    assert [r["finished"] for r in records] == finished
    assert [r["output"] for r in records] == [tokenizer.decode(f[:f.index(stop)] if stop in f else f,
                                                               skip_special_tokens=True) for f in full]
    assert summary["n_finished"] == sum(finished) and summary["n"] == len(QUESTIONS)
    assert summary["finish_rate"] == sum(finished) / len(QUESTIONS)
    assert summary["settings"]["max_new_tokens"] == BUDGET == summary["settings"]["decoding"]["max_new_tokens"]
    assert json.loads((tmp_path / "out" / "echo.json").read_text())["finish_rate"] == summary["finish_rate"]
    assert f"finished {sum(finished) / len(QUESTIONS):.0%} within {BUDGET} new tokens" in caplog.text


def test_predictions_have_no_finish_rate(tmp_path, capsys):
    task_file = tmp_path / "echo.json"
    _task(tmp_path)
    task_file.write_text(json.dumps({"name": "echo", "data": str(tmp_path / "d.jsonl"), "prompt": "{q}", "gold": "a",
                                     "metric": "numeric", "id": "id"}))
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"task": "echo", "id": f"i{i}", "output": str(i % 2)}) + "\n"
                             for i in range(3)))
    out = run_eval(EvalConfig(output_dir=str(tmp_path / "ev"), tasks=(str(task_file),), predictions=str(preds),
                              progress=False))
    summary = json.loads((out / "echo.json").read_text())
    assert summary["n"] == 3 and summary["finish_rate"] is None and summary["n_finished"] is None
    assert summary["settings"]["max_new_tokens"] is None  # another engine's budget is not known
    assert [r["finished"] for r in _items(out / "echo.items.jsonl")] == [None] * 3
    print_eval_summary(out)
    assert "finish rate unknown (predictions carry no stop information)" in capsys.readouterr().out


def test_generate_functions_giving_text_only_leave_the_finish_rate_unknown(tmp_path):
    from forgetless.eval.stage import evaluate_tasks

    cfg = EvalConfig(tasks=("echo",), cache=False, progress=False)
    summary = evaluate_tasks([_task(tmp_path)], cfg, lambda prompts, decoding: ["0"] * len(prompts))["echo"]
    assert summary["finish_rate"] is None and summary["settings"]["max_new_tokens"] == 32


def test_cached_base_results_from_before_finish_rates_are_made_again(tmp_path):
    from forgetless.eval.stage import evaluate_tasks
    from forgetless.lm.decode import Sampled

    task, calls = _task(tmp_path), []

    def fake_generate(prompts, decoding):
        calls.append(len(prompts))
        return [Sampled("0", i % 2 == 0, 1) for i in range(len(prompts))]

    cfg = EvalConfig(tasks=("echo",), cache_dir=str(tmp_path / "cache"), progress=False)
    runs = []
    for run in ("a", "b", "c"):
        (tmp_path / run).mkdir()
        runs.append(evaluate_tasks([task], cfg, fake_generate, tmp_path / run, fingerprint="model-x")["echo"])
        if run == "a":  # the entry as stored before records had a finish rate
            (entry,) = (tmp_path / "cache").glob("*/echo.json")
            entry.write_text(json.dumps({k: v for k, v in json.loads(entry.read_text()).items()
                                         if k not in ("finish_rate", "n_finished")}))
    assert calls == [6, 6]  # b evaluated again and stored its results; c reused them
    assert [r["settings"]["source"] for r in runs] == ["generated", "generated", "cache"]
    assert [r["finish_rate"] for r in runs] == [0.5] * 3
    assert [r["finished"] for r in _items(tmp_path / "c" / "echo.items.jsonl")] == [True, False] * 3
