"""Configs (YAML + overrides, unknown keys, types) and the CLI's error handling."""

import json
from dataclasses import dataclass, field

import pytest

from forgetless.cli import main
from forgetless.config import ConfigError, Overrides, build, check_overrides, load_config
from forgetless.mask.stage import MaskConfig
from forgetless.score.stage import ScoreConfig


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-4
    steps: int = 10


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    fraction: float | None = None
    tags: list[str] = field(default_factory=list)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run1\ninner:\n  lr: 3e-4\n  steps: 5\n")
    cfg = load_config(Outer, path, ["inner.steps=7", "fraction=0.2", "tags=[a, b]"])
    assert cfg == Outer(name="run1", inner=Inner(lr=3e-4, steps=7), fraction=0.2, tags=["a", "b"])


def test_int_is_accepted_for_float_and_null_for_optional():
    assert load_config(Outer, overrides=["inner.lr=1", "fraction=null"]).inner.lr == 1.0


def test_unknown_key_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(Outer, overrides=["inner.stesp=3"])
    with pytest.raises(ConfigError, match="unknown config key 'tua'.*'tau'"):
        load_config(MaskConfig, overrides=["tua=3"])


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="inner.steps: expected int"):
        load_config(Outer, overrides=["inner.steps=many"])


@dataclass(frozen=True)
class Sections:
    inner: Overrides[Inner] = field(default_factory=lambda: Overrides(Inner))
    maybe: Overrides[Inner] | None = None

    def __post_init__(self):
        check_overrides(self)


def test_a_section_sets_some_fields_each_checked_against_its_class():
    cfg = load_config(Sections, overrides=["inner.lr=1", "maybe.steps=3"])
    assert dict(cfg.inner) == {"lr": 1.0} and dict(cfg.maybe) == {"steps": 3} and load_config(Sections).maybe is None
    assert dict(Sections(inner={"steps": 2}).inner) == {"steps": 2}  # built in Python: checked the same
    with pytest.raises(ConfigError, match="unknown config key 'maybe.stesp'; did you mean 'steps'"):
        load_config(Sections, overrides=["maybe.stesp=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.x' \(valid: lr, steps\)"):
        Sections(inner={"x": 1})
    with pytest.raises(ConfigError, match="inner.steps: expected int"):
        load_config(Sections, overrides=["inner.steps=many"])


def test_a_runs_sections_read_back_from_its_run_config_json():
    import dataclasses

    from forgetless.lm.artifacts import as_json
    from forgetless.run import RunConfig
    from forgetless.train.config import TrainConfig

    config = load_config(RunConfig, overrides=["train.max_steps=1", "eval.tasks=gsm8k", "frontier.verdicts.n_boot=300",
                                               "methods=[{method: kl, train: {kl_coef: 0.1}}]"])
    assert config.train.cls is TrainConfig and config.eval["tasks"] == ("gsm8k",) and config.retention is None
    saved = as_json(dataclasses.asdict(config))  # what run_config.json holds: the keys set
    assert saved["train"] == {"max_steps": 1} and saved["methods"][0]["train"] == {"kl_coef": 0.1}
    assert build(RunConfig, saved) == config


def test_post_init_rules_surface_as_config_errors():
    with pytest.raises(ConfigError, match="tau"):
        load_config(MaskConfig, overrides=["tau=0"])
    with pytest.raises(ConfigError, match="tau"):
        load_config(MaskConfig, overrides=["tau=nan"])
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        load_config(MaskConfig, overrides=["fraction=1.0"])
    with pytest.raises(ConfigError, match="overlong"):
        load_config(ScoreConfig, overrides=["overlong=drop"])


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    assert main(["score", "--data", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:2: malformed JSON" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_unknown_key_and_offline_model(tmp_path, capsys):
    assert main(["mask", "tua=3"]) == 2
    assert "did you mean 'tau'" in capsys.readouterr().err
    assert main(["score", "--model", "no-such-org/no-such-model", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot load model 'no-such-org/no-such-model'" in err and "embedded" in err


def test_cli_debug_shows_traceback(tmp_path):
    with pytest.raises(ConfigError):
        main(["mask", "--debug", "tua=3"])


def test_cli_score_then_mask_on_tiny_model(tmp_path, capsys):
    from conftest import build_tokenizer, save_tiny_model

    save_tiny_model(tmp_path / "m", tokenizer=build_tokenizer("llama3"))  # a template with BOS, unlike tiny_model_dir's
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add {i}", "response": "return a + b"}) + "\n" for i in range(3)))
    assert main(["score", "--model", str(tmp_path / "m"), "--data", str(data), "--output-dir", str(tmp_path / "s"),
                 "device=cpu"]) == 0
    assert "Masked fraction vs tau" in capsys.readouterr().out
    assert main(["mask", "--scores", str(tmp_path / "s"), "--policy", "random", "--output-dir",
                 str(tmp_path / "r")]) == 0
    assert "policy random" in capsys.readouterr().out


def test_single_string_is_a_one_item_list():
    assert load_config(Outer, overrides=["tags=solo"]).tags == ["solo"]


def test_overrides_may_stand_between_flags(tmp_path, capsys):
    assert main(["mask", "--scores", str(tmp_path / "none"), "tau=3", "--output-dir", str(tmp_path / "o")]) == 2
    assert "forgetless score" in capsys.readouterr().err  # parsed fine, failed only on the missing scores
