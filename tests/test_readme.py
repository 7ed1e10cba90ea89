"""README.md stays a two-minute read that is true to the code: under 10,000 bytes; every `forgetless` command it shows
parses with the CLI's own flags and config fields (and `run`'s pass the run's config check); every `key=value` it
names is a run setting; every relative link reaches a file (and heading); CI's test-command marker is in place; the
library quickstart runs as written. Each checker is also shown failing on a doctored README."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from forgetless.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LIMIT = 10_000
MARKER = "<!-- test-command -->"
TEST_COMMAND = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
SETUP_AND_DEMO = "bash scripts/setup.sh && .venv/bin/forgetless run demo"
# The RunConfig sections that are overrides of a stage config: `train.learning_rate=...` names a TrainConfig field.
SECTIONS = {"score": "forgetless.score.stage.ScoreConfig", "train": "forgetless.train.stage.TrainConfig",
            "generate": "forgetless.generate.stage.GenerateConfig", "eval": "forgetless.eval.stage.EvalConfig",
            "retention": "forgetless.retention.stage.RetentionConfig"}


def readme() -> str:
    return README.read_text(encoding="utf-8")


def without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def forgetless_commands(text: str) -> list[list[str]]:
    """Each `forgetless <subcommand> ...` of the bash blocks and inline code, as argv from the subcommand on."""
    lines = [line for block in fenced(text, "bash") for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`((?:\.venv/bin/)?forgetless [^`]+)`", without_fences(text))
    commands = []
    for line in lines:
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0] in ("forgetless", ".venv/bin/forgetless"):
                commands.append(words[1:])
    return commands


def subparser(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


def unknown_flags(commands: list[list[str]]) -> list[str]:
    """Flags (and subcommands) a command shows that the CLI does not have: each flag must be one of the subcommand's
    own options, as its --help lists them."""
    bad = []
    for argv in commands:
        if not argv or argv[0] not in COMMANDS:
            bad.append(f"unknown subcommand: forgetless {' '.join(argv)}")
            continue
        options = {o for a in subparser(argv[0])._actions for o in a.option_strings}
        bad += [f"forgetless {argv[0]} {w}" for w in argv[1:] if w.startswith("-") and w.split("=")[0] not in options]
    return bad


def field_names(cls) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


def stage_class(section: str):
    import importlib

    module, _, name = SECTIONS[section].rpartition(".")
    return getattr(importlib.import_module(module), name)


def unknown_run_keys(keys: list[str]) -> list[str]:
    """Run settings (`key`, `section.key`) that are not fields of RunConfig or of the section's stage config."""
    from forgetless.run import RunConfig

    bad = []
    for key in keys:
        top, _, sub = key.partition(".")
        if top not in field_names(RunConfig):
            bad.append(key)
        elif sub and (top not in SECTIONS or sub.split(".")[0] not in field_names(stage_class(top))):
            bad.append(key)
    return bad


def inline_run_keys(text: str) -> list[str]:
    """The settings named in inline code outside commands: `key=value`, and `section.key` of a stage section."""
    spans = re.findall(r"`([^`\n]+)`", without_fences(text))
    keys = [m.group(1) for s in spans if (m := re.fullmatch(r"([a-z_][a-z0-9_.]*)=\S+", s))]
    keys += [s for s in spans if re.fullmatch(rf"(?:{'|'.join(SECTIONS)})\.[a-z_]+", s)]
    return keys


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = without_fences(path.read_text(encoding="utf-8"))
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def broken_links(text: str, base: Path, here: Path) -> list[str]:
    """Relative links (and their #anchors) that reach no file or no heading."""
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_fences(text)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        name, _, anchor = target.partition("#")
        path = (base / name).resolve() if name else here
        if not path.exists():
            bad.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(target)
    return bad


def test_readme_is_under_the_limit():
    size = len(README.read_bytes())
    assert size < LIMIT, f"README.md is {size} bytes; keep it under {LIMIT} (move detail to docs/)"


def test_ci_marker_and_commands_stay():
    """.ci/run reads the test command two lines after the marker (awk: getline; getline)."""
    lines = readme().splitlines()
    assert lines.count(MARKER) == 1
    assert lines[lines.index(MARKER) + 2] == TEST_COMMAND
    assert SETUP_AND_DEMO in readme() and "bash scripts/setup.sh" in readme()
    assert MARKER in (ROOT / ".ci" / "run").read_text()


def test_every_flag_shown_exists():
    commands = forgetless_commands(readme())
    assert {c[0] for c in commands} >= {"run"}
    assert unknown_flags(commands) == []


def test_the_flag_checker_fails_on_a_wrong_flag():
    doctored = "```bash\nforgetless run demo --output-dir a --lr 1e-4\nforgetless trian --data x\n```\n"
    assert unknown_flags(forgetless_commands(doctored)) == ["forgetless run --lr", "unknown subcommand: forgetless "
                                                            "trian --data x"]


def test_every_run_setting_named_exists():
    keys = inline_run_keys(readme())
    assert "holdout" in keys and "limit" in keys
    assert unknown_run_keys(keys) == []


def test_the_setting_checker_fails_on_a_wrong_key():
    doctored = "`holdot=0.2`, `retention.behaviour_limitz`, `train.learning_rate=1e-4`, `eval.tasks=[gsm8k]`"
    assert unknown_run_keys(inline_run_keys(doctored)) == ["holdot", "retention.behaviour_limitz"]


def parsed_config(argv: list[str]):
    """The config a command line makes, through the CLI's own parsing, without running the stage."""
    captured = {}

    def keep(config):
        """Keep the config."""
        captured["config"] = config
        return Path(".")

    name = argv[0]
    saved = COMMANDS[name]
    COMMANDS[name] = (saved[0], keep, lambda out: None)
    try:
        code = main(argv)
    finally:
        COMMANDS[name] = saved
    assert code == 0, f"forgetless {shlex.join(argv)} exits {code}"
    return captured["config"]


@pytest.mark.parametrize("argv", forgetless_commands(readme()), ids=shlex.join)
def test_each_command_makes_a_valid_config(argv, tmp_path, monkeypatch):
    """Every override of a `forgetless run` command is a setting: the run's config check builds every stage's
    config from it before any work (an unknown `retention.x` fails earlier, when the config loads)."""
    from forgetless.run import check_settings

    monkeypatch.chdir(tmp_path)
    Path("my.jsonl").write_text("".join(f'{{"prompt": "{i}+2?", "response": "{i + 2}"}}\n' for i in range(8)))
    config = parsed_config(argv)
    assert type(config) is COMMANDS[argv[0]][0]
    if argv[0] == "run":
        assert unknown_run_keys([w.split("=", 1)[0] for w in argv[1:] if "=" in w and not w.startswith("-")]) == []
        check_settings(config)


def test_a_wrong_override_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="exits 2"):
        parsed_config(["run", "demo", "holdot=0.2"])
    assert "unknown config key 'holdot'" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="exits 2"):  # a section's keys are checked when the config loads
        parsed_config(["run", "demo", "retention.behaviour_limitz=3"])
    assert "unknown config key 'retention.behaviour_limitz'" in capsys.readouterr().err


def test_relative_links_reach_files_and_headings():
    assert broken_links(readme(), ROOT, README) == []


def test_docs_links_reach_files_and_headings():
    bad = {p.name: broken_links(p.read_text(encoding="utf-8"), p.parent, p)
           for p in sorted((ROOT / "docs").glob("*.md"))}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_link_checker_fails_on_a_missing_file_or_heading():
    doctored = "[a](docs/nothing.md) [b](docs/results.md#no-such-heading) [c](docs/results.md) [d](https://x.org/y)"
    assert broken_links(doctored, ROOT, README) == ["docs/nothing.md", "docs/results.md#no-such-heading"]


def test_slug_is_githubs():
    assert slug("Your data as a run's target") == "your-data-as-a-runs-target"
    assert slug("The committed frontier run (`benchmarks/results/frontier/`)") == \
        "the-committed-frontier-run-benchmarksresultsfrontier"


def quickstart() -> str:
    section = readme().split("## In your own training loop", 1)[1]
    (block, *_) = fenced(section, "python")
    return block


def test_quickstart_is_ten_lines_at_most():
    assert len(quickstart().strip().splitlines()) <= 10


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="the quickstart trains with TRL (the [trl] extra)")
def test_quickstart_runs_as_written(tmp_path, monkeypatch):
    """The README's library quickstart, line for line, with a tiny model and tokenizer in place of the hub model and
    one CPU step in place of TRL's GPU defaults."""
    import math

    import transformers
    import trl

    from conftest import build_model, build_tokenizer

    tokenizer = build_tokenizer("llama3")
    model = build_model(len(tokenizer), initializer_range=0.5)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    gpu_config = trl.SFTConfig
    monkeypatch.setattr(trl, "SFTConfig", lambda **kw: gpu_config(**{**kw, "use_cpu": True, "bf16": False,
                                                                     "max_steps": 1, "report_to": []}))
    monkeypatch.chdir(tmp_path)
    Path("my.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "Write a python function to add two numbers."}, '
        '{"role": "assistant", "content": "def add(a, b):\\n    return a + b\\n"}]}\n'
        '{"prompt": "Say hello world in python.", "response": "print(\'hello world\')"}\n' * 2)
    namespace: dict = {}
    exec(compile(quickstart(), "README.md", "exec"), namespace)
    stm, trainer = namespace["stm"], namespace["trainer"]
    assert len(stm) == 4 and trainer.state.global_step == 1
    for row in stm:  # STM at τ = 2.5: a response token is trained iff the base's perplexity there is at most 2.5
        kept = [y != -100 for y in row["labels"]]
        rule = [bool(m) and i > 0 and not math.isnan(n) and math.exp(n) <= 2.5
                for i, (m, n) in enumerate(zip(row["response_mask"], row["nll"]))]
        assert kept == rule
