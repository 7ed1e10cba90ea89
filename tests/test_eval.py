"""The eval stage: result files and keys, predictions mode, in-memory models, the base cache,
batched generation (left padding, stop at end of turn), and a short real run (slow)."""

from __future__ import annotations

import json

import pytest

from forgetless.eval.stage import EvalConfig, evaluate_model, evaluate_tasks, run_eval
from forgetless.lm.decode import DecodingSettings, cut_at_stop, generate, left_pad, stop_token_ids
from forgetless.core.intervals import paired_difference, wilson_interval
from forgetless.eval.tasks.custom import task_from_definition
from forgetless.eval.tasks.gsm8k import load_gsm8k

TASK_KEYS = {"task", "metric", "score", "n", "ci95", "higher_is_better", "chance", "finish_rate", "n_finished",
             "settings"}
ITEM_KEYS = {"id", "score", "prompt", "output", "extracted", "gold", "finished"}


def test_left_pad_and_stop_cut():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([4, 9, 2, 9], {9}) == ([4], True)
    assert cut_at_stop([4, 2], {9}) == ([4, 2], False)


def test_stop_tokens_include_end_of_turn(tokenizer):
    vocab = tokenizer.get_vocab()
    assert vocab["<|im_end|>"] in stop_token_ids(tokenizer)
    assert vocab["<|endoftext|>"] in stop_token_ids(tokenizer)


def test_batched_generation_equals_one_at_a_time(tokenizer, tiny_model):
    prompts = [[{"role": "user", "content": "Write a python function to add two numbers."}],
               [{"role": "user", "content": "hello"}],
               [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]]
    settings = DecodingSettings(max_new_tokens=6)
    batched = generate(tiny_model, tokenizer, prompts, settings, batch_size=3, show_progress=False)
    single = [generate(tiny_model, tokenizer, [p], settings, batch_size=1, show_progress=False)[0] for p in prompts]
    assert batched == single  # left padding must not change greedy outputs
    assert len(batched) == 3


def _rigged(model, token_id: int):
    """Make the model always predict ``token_id`` next (an LM head of zeros plus a one-hot bias)."""
    import torch

    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head
    return model


def test_generation_stops_at_end_of_turn_and_respects_max_new_tokens(tokenizer):
    from conftest import build_model

    prompts = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "add two numbers please"}]]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stopper = _rigged(build_model(len(tokenizer)), im_end)
    assert generate(stopper, tokenizer, prompts, DecodingSettings(max_new_tokens=5), show_progress=False) == ["", ""]
    token = tokenizer("a", add_special_tokens=False)["input_ids"][0]
    talker = _rigged(build_model(len(tokenizer)), token)
    outputs = generate(talker, tokenizer, prompts, DecodingSettings(max_new_tokens=5), show_progress=False)
    assert [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs] == [5, 5]


def _write_predictions(path, task, pairs):
    with open(path, "w") as f:
        for item_id, output in pairs:
            f.write(json.dumps({"task": task, "id": item_id, "output": output}) + "\n")


def test_predictions_mode_scores_without_a_model(tmp_path):
    items = load_gsm8k()[:3]
    preds = tmp_path / "preds.jsonl"
    _write_predictions(preds, "gsm8k", [(items[0].id, "... #### 5"), (items[1].id, f"#### {items[1].gold:g}"),
                                        (items[2].id, "#### -1")])
    out = run_eval(EvalConfig(output_dir=str(tmp_path / "ev"), tasks=("gsm8k",), predictions=str(preds),
                              progress=False))
    summary = json.loads((out / "gsm8k.json").read_text())
    assert set(summary) == TASK_KEYS
    assert summary["n"] == 3 and summary["score"] == pytest.approx(2 / 3)
    assert summary["ci95"] == pytest.approx(list(wilson_interval(2, 3)))
    assert summary["settings"]["source"] == "predictions"
    records = [json.loads(line) for line in (out / "gsm8k.items.jsonl").read_text().splitlines()]
    assert [set(r) for r in records] == [ITEM_KEYS] * 3
    assert [r["score"] for r in records] == [1.0, 1.0, 0.0]
    assert json.loads((out / "scores.json").read_text())["gsm8k"]["score"] == pytest.approx(2 / 3)
    assert (out / "manifest.json").is_file() and (out / "config.json").is_file()


def _echo_task(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": f"i{i}", "q": f"say {i}", "a": str(i)}) + "\n"
                                              for i in range(4)))
    return task_from_definition({"name": "echo", "data": str(tmp_path / "d.jsonl"), "prompt": "{q}", "gold": "a",
                                 "metric": "numeric", "max_new_tokens": 4})


def test_base_results_are_cached_and_reused(tmp_path):
    task = _echo_task(tmp_path)
    calls = []

    def fake_generate(prompts, decoding):
        calls.append(len(prompts))
        return [p[0]["content"].split()[-1] for p in prompts]  # answers '0', '1', ...

    cfg = EvalConfig(output_dir=str(tmp_path), tasks=("echo",), cache_dir=str(tmp_path / "cache"), progress=False)
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        results = evaluate_tasks([task], cfg, fake_generate, tmp_path / run, fingerprint="model-x")
        assert results["echo"]["score"] == 1.0
    assert calls == [4]  # the second run came from the cache
    assert json.loads((tmp_path / "b" / "echo.json").read_text())["settings"]["source"] == "cache"
    assert (tmp_path / "b" / "echo.items.jsonl").read_text() == (tmp_path / "a" / "echo.items.jsonl").read_text()
    (tmp_path / "c").mkdir()
    evaluate_tasks([task],
                   EvalConfig(output_dir=str(tmp_path), tasks=("echo",), cache_dir=str(tmp_path / "cache"), limit=2),
                   fake_generate, tmp_path / "c", fingerprint="model-x")
    evaluate_tasks([task], cfg, fake_generate, tmp_path / "c", fingerprint="model-y")
    assert calls == [4, 2, 4]  # another subset, another model: no reuse


# Wilson 95% intervals by hand: centre (p + z²/2n) / (1 + z²/n), half z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
WILSON_1_OF_4 = (0.0456, 0.6994)
WILSON_N2 = {0: (0.0, 0.6576), 1: (0.0945, 0.9055), 2: (0.3424, 1.0)}  # k right of 2


def test_evaluate_in_memory_model(tmp_path, tokenizer):
    from conftest import build_model

    task = _echo_task(tmp_path)  # "say i", gold i, for i = 0..3
    model = _rigged(build_model(len(tokenizer)), tokenizer.convert_tokens_to_ids("1")).train()  # always says "1"
    cfg = EvalConfig(batch_size=2, max_new_tokens=1, progress=False)
    results = evaluate_model(model, tokenizer, cfg, tmp_path / "out", tasks=[task])
    assert results["echo"]["n"] == 4 and results["echo"]["score"] == 0.25  # right on "say 1" only
    assert list(results["echo"]["ci95"]) == pytest.approx(WILSON_1_OF_4, abs=1e-4)
    records = [json.loads(line) for line in (tmp_path / "out" / "echo.items.jsonl").read_text().splitlines()]
    assert [(r["gold"], r["output"], r["score"]) for r in records] == [("0", "1", 0.0), ("1", "1", 1.0),
                                                                       ("2", "1", 0.0), ("3", "1", 0.0)]
    assert model.training  # the caller's mode is restored


def test_eval_config_validation():
    with pytest.raises(ValueError):
        EvalConfig(limit=0)
    with pytest.raises(ValueError):
        EvalConfig(backend="tgi")
    assert EvalConfig(tasks="gsm8k").tasks == ("gsm8k",)


def test_paired_difference_hand_computed():
    d = paired_difference({"a": 1.0, "b": 1.0, "c": 0.0, "z": 1.0}, {"a": 1.0, "b": 0.0, "c": 1.0})
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.0)
    assert d["ci95"][0] <= 0.0 <= d["ci95"][1]


def _sql_definition(root):
    import sqlite3

    (root / "dbs" / "shop").mkdir(parents=True)
    conn = sqlite3.connect(root / "dbs" / "shop" / "shop.sqlite")
    conn.executescript("CREATE TABLE items (id INTEGER, name TEXT, price REAL); "
                       "INSERT INTO items VALUES (1, 'pen', 1.5), (2, 'bag', 30);")
    conn.commit()
    conn.close()
    (root / "dev.json").write_text(json.dumps([{"question_id": "q1", "db_id": "shop", "question": "How many items?",
                                                "SQL": "SELECT COUNT(*) FROM items"},
                                               {"question_id": "q2", "db_id": "shop", "question": "Cheapest item?",
                                                "SQL": "SELECT name FROM items ORDER BY price LIMIT 1"}]))
    (root / "sql.yaml").write_text(f"name: sql_shop\ndata: {root / 'dev.json'}\ndb_root: {root / 'dbs'}\nmetric: sql\n")
    return str(root / "sql.yaml")


@pytest.mark.slow
def test_short_real_run_of_the_embedded_model(tmp_path, embedded):
    model, tokenizer = embedded
    tasks = ("mbpp", "gsm8k", "math", "arc_challenge", _sql_definition(tmp_path))
    cfg = EvalConfig(tasks=tasks, limit=2, max_new_tokens=8, batch_size=2, progress=False, sandbox_timeout_s=5)
    results = evaluate_model(model, tokenizer, cfg, tmp_path / "out")
    assert set(results) == {"mbpp", "gsm8k", "math", "arc_challenge", "sql_shop"}
    # 8 new tokens cannot hold a function that passes find_Min_Sum's or count_element_freq's asserts.
    assert results["mbpp"]["score"] == 0.0
    for name, summary in results.items():
        records = [json.loads(line) for line in (tmp_path / "out" / f"{name}.items.jsonl").read_text().splitlines()]
        assert all(isinstance(r["output"], str) and r["output"] for r in records)
        right = [r["score"] for r in records]
        assert summary["n"] == 2 and set(right) <= {0.0, 1.0}, name
        assert summary["score"] == sum(right) / 2 and summary["ci95"] == pytest.approx(WILSON_N2[int(sum(right))],
                                                                                       abs=1e-4)
    arc = [json.loads(line) for line in (tmp_path / "out" / "arc_challenge.items.jsonl").read_text().splitlines()]
    assert any(r["extracted"] in ("A", "B", "C", "D") for r in arc)  # the model answers with a letter


def test_configs_load_from_cli_style_overrides(tmp_path):
    from forgetless.config import load_config
    from forgetless.report.stage import ReportConfig

    cfg = load_config(EvalConfig, None, ["tasks=[gsm8k, math]", "limit=3", "seed=null", f"output_dir={tmp_path}"])
    assert cfg.tasks == ("gsm8k", "math") and cfg.limit == 3 and cfg.seed is None
    rep = load_config(ReportConfig, None, ["runs=[base=/a, stm=/b]", "target=gsm8k"])
    assert rep.runs == ("base=/a", "stm=/b") and rep.target == "gsm8k"
