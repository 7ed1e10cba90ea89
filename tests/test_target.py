"""The target of a run on a user's own data: the held-out split, the chrF task, the τ note, the target check, and a
tiny end-to-end run on a made-up JSONL (not MBPP)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from forgetless.cli import main
from forgetless.config import ConfigError, load_config
from forgetless.eval.tasks.custom import load_task_file, score_metric
from forgetless.lm.data import load_examples
from forgetless.run import RunConfig, check_settings, run_target, training_data
from forgetless.target import check_target, default_target, split_holdout, tau_share_note

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Peru", "Lima"),
            ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Cuba", "Havana"),
            ("Greece", "Athens"), ("Poland", "Warsaw")]


def capitals_jsonl(path):
    """A user's own data set: short question-answer pairs as `messages` JSONL."""
    lines = [json.dumps({"id": f"c{i}", "messages": [
        {"role": "user", "content": f"What is the capital of {country}?"},
        {"role": "assistant", "content": f"The capital of {country} is {city}."}]})
             for i, (country, city) in enumerate(CAPITALS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_split_is_seeded_disjoint_and_whole(tmp_path):
    data = str(capitals_jsonl(tmp_path / "capitals.jsonl"))
    paths = split_holdout(data, 0.25, seed=0, out_dir=tmp_path / "a")
    train, target = load_examples(str(paths["train"])), load_examples(str(paths["target"]))
    assert len(target) == max(4, round(0.25 * 12)) == 4 and len(train) == 8
    assert {e.id for e in train} | {e.id for e in target} == {f"c{i}" for i in range(12)}
    assert not {e.id for e in train} & {e.id for e in target}
    again = split_holdout(data, 0.25, seed=0, out_dir=tmp_path / "b")
    assert again["target"].read_text() == paths["target"].read_text()
    other = split_holdout(data, 0.25, seed=1, out_dir=tmp_path / "c")
    assert other["target"].read_text() != paths["target"].read_text()
    task = load_task_file(paths["task"])
    items = task.load()
    assert [it.gold for it in items] == [e.response for e in target]
    assert items[0].messages == target[0].prompt_messages  # the prompt only: the model writes the answer
    with pytest.raises(ConfigError, match="too few"):
        split_holdout(data, 0.99, seed=0, out_dir=tmp_path / "d")


def test_chrf_metric_by_hand():
    """chrF (character orders 1-6, β = 2; orders neither side has are left out): 'ab' against 'ac' matches 1 of 2
    unigrams and 0 of 1 bigram, so P = R = (1/2 + 0) / 2 = 1/4 and F = (1 + 4) P R / (4 P + R) = 1/4."""
    assert score_metric("chrf", "ab", "ac") == pytest.approx(0.25)
    assert score_metric("chrf", "The capital is Paris.", "The capital is Paris.") == 1.0
    assert score_metric("chrf", None, "x") == 0.0


def test_tau_note_by_hand():
    nll = np.log(np.array([1.0, 1.2, 3.0, 4.0, 5.0]))  # τ = 2.5 masks 3, 4 and 5: 60%
    note = tau_share_note(nll, 2.5, "my.jsonl")
    assert note.startswith("τ = 2.5 masks 60% of my.jsonl's response tokens (the paper's τ = 2.5 masked 20-24%")
    assert "τ = 4 would mask about 20% (method: auto-tau, fraction: 0.2)" in note  # only ppl 5 is above 4
    assert note.count("\n") == 0
    assert tau_share_note(np.log(np.array([1.0, 1.2, 1.3, 3.0, 1.1])), 2.5, "d") is None  # 20%: usual
    assert "masks 0%" in tau_share_note(np.log(np.array([1.0, 1.2, 1.3, 1.4, 1.1])), 2.5, "d")


def test_target_check_refuses_another_data_set(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"target gen:mbpp-validation measures mbpp, but the training data is my.jsonl"):
        check_target("gen:mbpp-validation", "my.jsonl", other_target=False)
    check_target("gen:mbpp-validation", "my.jsonl", other_target=True)
    check_target("gen:mbpp-validation", "mbpp-train", other_target=False)
    check_target("heldout:mbpp-validation:kept", "mbpp-train", other_target=False)
    check_target("tasks/mine.yaml", "my.jsonl", other_target=False)  # the user's own task file
    check_target("echo", "my.jsonl", other_target=False)  # a task of theirs by name
    with pytest.raises(ConfigError, match="measures gsm8k"):
        check_target("gsm8k", "mbpp-train", other_target=False)
    assert default_target("my.jsonl") == "holdout"
    assert default_target("mbpp-train", ("gsm8k", "mbpp-validation")) == "gen:mbpp-validation"
    assert default_target("mbpp-train") == "mbpp"


def test_demo_on_own_data_targets_its_held_out_share(tmp_path, capsys):
    data = str(capitals_jsonl(tmp_path / "capitals.jsonl"))
    from forgetless.cli import resolve_config_path

    config = load_config(RunConfig, resolve_config_path("demo"), [f"data={data}", f"out_dir={tmp_path / 'o'}"])
    assert run_target(config) == "holdout" and training_data(config) == str(tmp_path / "o" / "holdout" / "train.jsonl")
    check_settings(config)
    bad = load_config(RunConfig, resolve_config_path("demo"), [f"data={data}", "target=gen:mbpp-validation"])
    with pytest.raises(ConfigError, match="other_target=true"):
        check_settings(bad)
    assert main(["run", "demo", f"data={data}", "target=mbpp", f"--output-dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "target mbpp measures mbpp" in err
    assert not (tmp_path / "x").exists()  # refused before any work


def test_run_on_own_data_end_to_end(tmp_path, tiny_model_dir, capsys, caplog):
    """A tiny model, 12 question-answer pairs: 4 held out as the target, chrF of greedy answers there, the held-out
    NLL of all and kept tokens beside it, the τ note before training, and the verdict."""
    data = capitals_jsonl(tmp_path / "capitals.jsonl")
    config = tmp_path / "run.yaml"
    out = tmp_path / "out"
    config.write_text(f"""
out_dir: {out}
model: {tiny_model_dir}
data: {data}
holdout: 0.25
methods: [{{method: sft}}, {{method: stm, tau: 1.0e6, name: stm}}]  # a random model: τ 2.5 would mask all
train: {{max_steps: 1, batch_size: 2, device: cpu}}
eval: null
retention: {{mc_tasks: [], drift_sources: [], behaviour_sources: [], device: cpu, cache_dir: {tmp_path / 'cache'}}}
""")
    caplog.set_level("WARNING")
    assert main(["run", str(config)]) == 0
    assert "τ = 1e+06 masks 0% of" in caplog.text and "would mask about 20%" in caplog.text
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["target"] == "holdout" and report["tasks"][0] == "holdout"
    heldout = str(out / "holdout" / "target.jsonl")
    assert {f"heldout:{heldout}:all", f"heldout:{heldout}:kept"} <= set(report["tasks"])
    base = next(r for r in report["rows"] if r["is_base"])
    assert base["tasks"]["holdout"]["n"] == 4 and 0 <= base["tasks"]["holdout"]["score"] <= 1
    markdown = (out / "report" / "report.md").read_text()
    assert "- holdout (`holdout`): neutral" in markdown
    assert f"held-out NLL, kept tokens (`heldout:{heldout}:kept`): favours STM by construction" in markdown
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].startswith("sft: target (holdout) ") and lines[-2].startswith("stm: target (holdout) ")
    assert lines[-1] == f"report: {out / 'report' / 'report.html'}"
    assert not math.isnan(base["tasks"]["holdout"]["score"])
