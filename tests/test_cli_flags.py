"""The CLI's flags: one --output-dir, train's --adapter-type, defaults in --help, no prefix matching, one-line
errors, and each subcommand's --help example builds a valid config."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from forgetless import cli
from forgetless.cli import COMMANDS, EXAMPLES, build_parser, main
from forgetless.config import ConfigError, load_config
from forgetless.verdict import verdict_lines


def parsed_config(argv: list[str]):
    """The config a command line would run, built without running the stage (the CLI's own path to it)."""
    captured = {}

    def fake_stage(config):
        """Keep the config."""
        captured["config"] = config
        return Path(".")

    name = argv[0]
    cls, _, _ = COMMANDS[name]
    saved = COMMANDS[name]
    COMMANDS[name] = (cls, fake_stage, lambda out: None)
    try:
        assert main(argv) == 0
    finally:
        COMMANDS[name] = saved
    return captured["config"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_help_example_builds_a_config(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(EXAMPLES[name])[1:]
    assert argv[0] == name
    if name == "report":  # `report RUN_DIR` needs the directory to exist to be taken as one
        Path(argv[1]).mkdir(parents=True)
    if name == "run":  # a user's data file
        Path("my.jsonl").write_text('{"prompt": "2+2?", "response": "4"}\n')
    config = parsed_config(argv)
    assert type(config) is COMMANDS[name][0]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_takes_output_dir_and_the_old_spelling_with_a_line(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    required = {"train": ["--data", "x.parquet"], "report": ["rundir"]}.get(name, [])
    Path("rundir").mkdir()
    field = "out_dir" if "out_dir" in COMMANDS[name][0].__dataclass_fields__ else "output_dir"
    assert getattr(parsed_config([name, *required, "--output-dir", "a"]), field) == "a"
    assert getattr(parsed_config([name, *required, "--out-dir=b"]), field) == "b"
    assert "--out-dir is deprecated; use --output-dir" in capsys.readouterr().err


def test_train_adapter_type(capsys):
    assert parsed_config(["train", "--data", "x", "--output-dir", "o", "--adapter-type", "full"]).adapter == "full"
    assert parsed_config(["train", "--data", "x", "--output-dir", "o", "--adapter", "dora"]).adapter == "dora"
    assert "--adapter is deprecated; use --adapter-type" in capsys.readouterr().err
    assert "--adapter-type" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()


def test_help_shows_defaults():
    text = build_parser()._subparsers._group_actions[0].choices["mask"].format_help()
    assert "(default: 2.5)" in " ".join(text.split())  # --tau
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "(required)" in text


def test_no_prefix_matching_and_a_hint(capsys):
    """`--lr 1e-4` was taken as `--lr-scheduler 1e-4` by argparse's prefix matching."""
    assert main(["train", "--data", "x", "--output-dir", "o", "--lr", "1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unrecognized arguments: --lr" in err and "--learning-rate" in err


def test_missing_required_field_is_named_in_one_line(capsys):
    assert main(["train", "--learning-rate", "1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("forgetless train: error: TrainConfig: missing required settings data, output_dir "
                   "(give --data VALUE, --output-dir VALUE)")
    from forgetless.train.config import TrainConfig

    with pytest.raises(ConfigError, match="missing required setting data"):
        load_config(TrainConfig, overrides=["output_dir=o"])


def test_verdict_lines_from_a_report():
    def row(label, base):
        return {"label": label, "is_base": base, "tasks": {"t": {"score": 0.5}, "o": {"score": 0.4}},
                "metrics": {"TI_abs": 0.1, "BWT_abs": -0.02, "TI": 0.2, "BWT": -0.05, "bwt_tasks": ["o"]},
                "paired": {"t": {"mean": 0.1, "ci95": [0.05, 0.15], "n": 10},
                           "o": {"mean": -0.02, "ci95": [-0.04, 0.0], "n": 10}}}

    report = {"base": "base", "target": "t", "lower_is_better": [], "rows": [row("base", True), row("stm", False)]}
    assert verdict_lines(report) == ["stm: target (t) +0.100 [+0.050, +0.150], other measures (BWT) -0.020 "
                                     "[-0.040, +0.000]"]


def test_run_prints_the_verdict_not_the_report():
    assert COMMANDS["run"][2] is cli.print_verdict


def test_model_card_of_a_trained_adapter(tmp_path):
    """The card holds the recipe, τ, masked fraction and data fingerprint, then the run's measured line."""
    import json
    from types import SimpleNamespace

    from forgetless.train.card import add_measured, card_text, mask_facts, write_card

    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "manifest.json").write_text(json.dumps({"policy": "threshold", "tau": 2.5,
                                                                  "masked_fraction": 0.3125}))
    facts = mask_facts(tmp_path / "masks" / "data.parquet")
    assert facts == {"policy": "threshold", "tau": 2.5, "masked_fraction": 0.3125}
    config = SimpleNamespace(model="tiny", method="stm", adapter="lora", learning_rate=1e-4, epochs=2,
                             output_dir=str(tmp_path / "stm"))
    (tmp_path / "adapter").mkdir()
    write_card(tmp_path / "adapter", card_text(config, {"data_fingerprint": "abc123", "forgetless": "0.1.0"},
                                               {"examples": 8}, facts))
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "| τ (perplexity threshold) | 2.5 |" in card and "| masked fraction of response tokens | 31.2% |" in card
    assert "| data fingerprint | abc123 |" in card and "stm (masking policy: threshold)" in card
    add_measured(tmp_path / "adapter", ["stm: target (t) +0.100 [+0.050, +0.150]"], "r/report.html")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "Not measured yet" not in card and "- stm: target (t) +0.100 [+0.050, +0.150]" in card
    assert card.count("## Measured against the base") == 1


def test_readme_your_data_command_builds_its_config(tmp_path, monkeypatch):
    """README.md's "Your model, your data" command, as written, makes a valid run config
    targeting the held-out share."""
    from forgetless.run import run_target, training_data

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your model, your data", 1)[1]
    command = section.split("```bash\n", 1)[1].split("\n", 1)[0]
    monkeypatch.chdir(tmp_path)
    Path("my.jsonl").write_text('{"prompt": "2+2?", "response": "4"}\n')
    config = parsed_config(shlex.split(command)[1:])
    assert config.model == "meta-llama/Llama-3.2-1B-Instruct" and config.out_dir == "runs/mine"
    assert run_target(config) == "holdout" and training_data(config) == "runs/mine/holdout/train.jsonl"
