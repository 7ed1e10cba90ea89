"""A name the library does not know (behaviour source, task, recipe) fails in the config check, before any model
loads: one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import pytest

from forgetless import cli
from forgetless.lm import modeling


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model is a test failure here."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for name in ("load_model_and_tokenizer", "load_model", "load_tokenizer"):
        monkeypatch.setattr(modeling, name, refuse)


def _fails_in_one_line(capsys, argv: list[str], says: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


@pytest.mark.parametrize("flag, value", [("--behaviour-sources", "nope"), ("--drift-sources", "gsm8kk"),
                                         ("--heldout-source", "mbpp-nothing")])
def test_unknown_prompt_set_fails_before_the_model(no_model, tmp_path, capsys, flag, value):
    out = tmp_path / "ret"
    _fails_in_one_line(capsys, ["retention", flag, value, f"output_dir={out}"], "unknown prompt set")
    assert not out.exists()


def test_known_prompt_sets_pass_the_check():
    from forgetless.retention.stage import RetentionConfig

    RetentionConfig(behaviour_sources=("ifeval", "gsm8k", "mbpp-test", "naturalqs"), drift_sources=("math-test",))


def test_unknown_task_fails_before_the_model(no_model, tmp_path, capsys):
    out = tmp_path / "ev"
    _fails_in_one_line(capsys, ["eval", "tasks=[ifeval,nope]", f"output_dir={out}"], "unknown task 'nope'")
    assert not out.exists()


def test_unknown_recipe_fails_before_the_model(no_model, tmp_path, capsys):
    out = tmp_path / "run"
    _fails_in_one_line(capsys, ["run", "demo", f"out_dir={out}", "methods=[{method: nope}]"], "unknown method 'nope'")
    assert not out.exists()


def test_unknown_behaviour_source_in_a_run_fails_before_the_model(no_model, tmp_path, capsys):
    out = tmp_path / "run"
    _fails_in_one_line(capsys, ["run", "demo", f"out_dir={out}", "retention.behaviour_sources=[gsm8k,nope]"],
                       "unknown prompt set")
    assert not out.exists()
