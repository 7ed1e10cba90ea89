"""Bad input through the CLI (``forgetless.cli.main``): exit 2, one error line naming the file or example and
what is wrong, no traceback, and nothing a later stage would take as complete (no manifest.json)."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from conftest import build_model, build_tokenizer, save_tiny_model
from forgetless.cli import main
from forgetless.train.collate import build_sft_table, write_table
from forgetless.lm.data import load_examples


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model dir without a chat template, data, a task file, tables and a foreign adapter (the model with
    a template is the shared ``tiny_model_dir``)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("bad")
    tok = build_tokenizer("chatml")
    plain = build_tokenizer("chatml")
    plain.chat_template = None
    save_tiny_model(root / "plain", tokenizer=plain)
    rows = [{"id": f"ex{i}", "prompt": f"Write a python function number {i}.",
             "response": "def add(a, b):\n    return a + b" + " + 0" * (3 * i)} for i in range(4)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "echo.jsonl").write_text("".join(json.dumps({"id": f"i{i}", "q": f"say {i}", "a": str(i)}) + "\n"
                                             for i in range(3)))
    (root / "echo.json").write_text(json.dumps({"name": "echo", "data": str(root / "echo.jsonl"), "prompt": "{q}",
                                                "gold": "a", "metric": "numeric", "max_new_tokens": 2}))
    # An adapter trained for another base: hidden size 48 instead of 32.
    other = build_model(len(tok), hidden_size=48, intermediate_size=96)
    get_peft_model(other, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(
        root / "foreign")
    (root / "not-an-adapter").mkdir()
    table = build_sft_table(load_examples(str(root / "data.jsonl")), tok)
    write_table(table, root / "sft.parquet")
    some = [dict(r) for r in table]
    some[0] = dict(some[0], labels=[-100] * len(some[0]["labels"]), loss_weight=[0.0] * len(some[0]["labels"]))
    write_table(some, root / "some-masked.parquet")
    write_table([dict(r, labels=[-100] * len(r["labels"]), loss_weight=[0.0] * len(r["labels"])) for r in table],
                root / "all-masked.parquet")
    (root / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    return root


def record_file(root, name: str, content) -> str:
    path = root / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


GOOD = json.dumps({"prompt": "Q", "response": "A"}) + "\n"
DATA_CASES = {  # file content -> what the error line must say
    "malformed": (GOOD + '{"messages": [\n', ":2: malformed JSON"),
    "missing-fields": (GOOD + json.dumps({"text": "hi"}) + "\n", "no 'messages'"),
    "unknown-role": (json.dumps({"messages": [{"role": "narrator", "content": "x"},
                                              {"role": "assistant", "content": "y"}]}) + "\n",
                     "unknown role 'narrator'"),
    "blank-response": (GOOD + json.dumps({"prompt": "Q", "response": " \n\t"}) + "\n", "response is empty"),
    "no-assistant": (json.dumps({"messages": [{"role": "user", "content": "Q"}]}) + "\n", "assistant turn"),
    "non-utf8": (b'{"prompt": "caf\xe9", "response": "x"}\n', "not UTF-8"),
    "empty": ("\n  \n", "empty"),
}


def expect_error(capsys, argv: list[str], out, *needles: str) -> str:
    """Run the CLI; assert exit 2, exactly one error line holding every needle, no traceback, and nothing in
    ``out`` but (for eval, retention and train, which record their settings first) ``config.json``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"forgetless {argv[0]}: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert written in ([], ["config.json"]), written  # at most the resolved settings: no manifest, no results
    return lines[0]


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_file_through_score(world, tiny_model_dir, tmp_path, capsys, case):
    content, problem = DATA_CASES[case]
    path = record_file(tmp_path, f"{case}.jsonl", content)
    out = tmp_path / "scores"
    expect_error(capsys,
                 ["score", "--model", str(tiny_model_dir), "--data", path, "--output-dir", str(out), "device=cpu"],
                 out, path, problem)


@pytest.mark.parametrize("override, problem", [
    ("tau=nan", "tau"), ("tau=0", "tau"), ("tau=-1", "tau"), ("fraction=1.0", "fraction"),
    ("fraction=-0.1", "fraction"), ("tua=3", "did you mean 'tau'"),
])
def test_bad_mask_settings(world, tmp_path, capsys, override, problem):
    out = tmp_path / "m"
    expect_error(capsys, ["mask", "--scores", str(tmp_path), "--output-dir", str(out), override], out, problem)


def test_overlong_prompts_truncated_or_skipped_and_counted(world, tiny_model_dir, tmp_path, capsys):
    lengths = sorted(len(r) for r in pq.read_table(world / "sft.parquet").column("input_ids").to_pylist())
    limit = lengths[1]  # the two longer examples exceed it
    common = ["--model", str(tiny_model_dir), "--data", str(world / "data.jsonl"), "--device", "cpu"]
    assert main(["score", *common, "--output-dir", str(tmp_path / "t"), f"max_length={limit}"]) == 0
    assert main(["score", *common, "--output-dir", str(tmp_path / "s"), f"max_length={limit}", "overlong=skip"]) == 0
    t, s = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("t", "s"))
    assert (t["truncated"], t["skipped_overlong"], t["scored_examples"]) == (2, 0, 4)
    assert (s["truncated"], s["skipped_overlong"], s["scored_examples"]) == (0, 2, 2)
    capsys.readouterr()
    # Every example too long and skipped: nothing left is an error, not an empty scores file.
    out = tmp_path / "none"
    expect_error(capsys, ["score", *common, "--output-dir", str(out), "max_length=4", "overlong=skip"], out,
                 str(world / "data.jsonl"), "max_length=4")
    assert not (out / "scores.parquet").exists()


def test_model_without_chat_template_falls_back_with_warning(world, tmp_path, caplog):
    caplog.set_level("WARNING")
    assert main(["score", "--model", str(world / "plain"), "--data", str(world / "data.jsonl"),
                 "--output-dir", str(tmp_path / "s"), "device=cpu"]) == 0
    assert "no chat template" in caplog.text
    ids = pq.read_table(tmp_path / "s" / "scores.parquet").column("input_ids").to_pylist()[0]
    assert build_tokenizer("chatml").decode(ids).startswith("### User:\nWrite a python function number 0.")


@pytest.mark.parametrize("stage", ["eval", "retention"])
def test_adapter_for_another_base_is_one_line(world, tiny_model_dir, tmp_path, capsys, stage):
    out = tmp_path / "o"
    extra = [f"tasks=[{world / 'echo.json'}]", "cache=false", "progress=false"] if stage == "eval" else ["mc_tasks=[]"]
    # key=value overrides go last: argparse takes one run of positionals per subcommand.
    line = expect_error(capsys, [stage, "--model", str(tiny_model_dir), "--adapter", str(world / "foreign"),
                                 "--output-dir", str(out), "--device", "cpu", *extra],
                        out, f"adapter {world / 'foreign'} does not match model {tiny_model_dir}", "size mismatch")
    assert len(line) < 500


def test_adapter_dir_without_adapter_config(world, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    expect_error(capsys, ["eval", "--model", str(tiny_model_dir), "--adapter", str(world / "not-an-adapter"),
                          "--output-dir", str(out), f"tasks=[{world / 'echo.json'}]", "cache=false", "device=cpu"],
                 out, str(world / "not-an-adapter"), "adapter_config.json")


def test_unknown_model_offline_in_eval(world, tmp_path, capsys):
    out = tmp_path / "o"
    expect_error(capsys, ["eval", "--model", "no-such-org/no-such-model", "--output-dir", str(out),
                          f"tasks=[{world / 'echo.json'}]", "cache=false"], out, "no-such-org/no-such-model",
                 "embedded")


@pytest.mark.parametrize("content, problem", [
    ('{"task": "echo", "id": "i0", "output": "0"}\n{"id": \n', ":2: malformed JSON"),
    ('{"task": "echo", "output": "0"}\n', ":1: a prediction needs 'id'"),
    (b'{"id": "i0", "output": "caf\xe9"}\n', "not UTF-8"),
])
def test_bad_predictions_file(world, tmp_path, capsys, content, problem):
    path = record_file(tmp_path, "preds.jsonl", content)
    out = tmp_path / "o"
    expect_error(capsys, ["eval", "--predictions", path, "--output-dir", str(out), f"tasks=[{world / 'echo.json'}]"],
                 out, path, problem)


@pytest.mark.parametrize("table, problem", [
    ("all-masked.parquet", "nothing to train on"), ("garbage.parquet", "garbage.parquet"),
    ("missing.parquet", "missing.parquet"),
])
def test_bad_training_table(world, tiny_model_dir, tmp_path, capsys, table, problem):
    out = tmp_path / "run"
    expect_error(capsys, ["train", "--data", str(world / table), "--output-dir", str(out), "--model",
                          str(tiny_model_dir), "max_steps=1", "device=cpu"], out, problem)
    assert not (out / "adapter").exists()


def test_partly_masked_table_trains_and_counts(world, tiny_model_dir, tmp_path, caplog):
    caplog.set_level("WARNING")
    out = tmp_path / "run"
    assert main(["train", "--data", str(world / "some-masked.parquet"), "--output-dir", str(out), "--model",
                 str(tiny_model_dir), "max_steps=1", "batch_size=4", "device=cpu"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["table"]["examples_without_trained_tokens"] == 1 and summary["table"]["examples"] == 4
    assert "1 of 4 examples have every response token masked" in caplog.text
    assert math.isfinite(summary["train_loss"]) and (out / "manifest.json").is_file()


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(monkeypatch, capsys):
    """A ForgetlessError (something the user can fix) is one line; anything else (here a plain RuntimeError inside
    the stage, as a bug or an out-of-memory error would be) shows its traceback and how to report it."""
    import forgetless.cli as cli
    from forgetless.core.errors import DataError

    def broken(config):
        """Score, with a bug."""
        raise RuntimeError("CUDA out of memory, or a bug")

    monkeypatch.setitem(cli.COMMANDS, "score", (cli.COMMANDS["score"][0], broken, cli.COMMANDS["score"][2]))
    assert cli.main(["score", "data=mbpp-train"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: CUDA out of memory, or a bug" in err
    assert "unexpected error" in err and "report it" in err

    def bad_data(config):
        """Score, on data with a problem."""
        raise DataError("data.jsonl:3: no assistant turn")

    monkeypatch.setitem(cli.COMMANDS, "score", (cli.COMMANDS["score"][0], bad_data, cli.COMMANDS["score"][2]))
    assert cli.main(["score", "data=mbpp-train"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "forgetless score: error: data.jsonl:3: no assistant turn"


def test_every_error_class_of_forgetless_is_a_forgetless_error():
    import inspect
    import pkgutil
    import importlib

    import forgetless
    from forgetless.core.errors import ForgetlessError

    found = []
    for mod in pkgutil.walk_packages(forgetless.__path__, "forgetless."):
        if mod.name.endswith(("vllm_backend", "cli", "__main__")) or ".tasks." in mod.name:
            continue
        module = importlib.import_module(mod.name)
        found += [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                  if issubclass(obj, Exception) and obj.__module__ == module.__name__]
    assert len(found) >= 10
    assert all(issubclass(cls, ForgetlessError) for cls in found), \
        [c for c in found if not issubclass(c, ForgetlessError)]
