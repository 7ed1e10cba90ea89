"""`forgetless run` end to end on a tiny saved model: every stage, the report, and resume."""

import json
from pathlib import Path

import pytest

from forgetless.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


def test_run_writes_report_and_resumes(tiny_run_config, capsys, caplog):
    config, out = tiny_run_config
    assert main(["run", str(config)]) == 0
    report = (out / "report" / "report.md").read_text()
    for label in ("base", "sft", "auto-tau-q0.3"):
        assert label in report
    assert "Retention, paired against the base model" in report
    # Behaviour columns in the main table, its own section with the methods compared pairwise.
    # plain names, not internal ones, head the columns
    assert "gen:gsm8k (" not in report
    assert ("| run | GSM8K (target) | arc_easy | GSM8K: KL drift | GSM8K: did what was asked | GSM8K: working kept "
            "| GSM8K: skips the working") in report
    assert "## Behaviour: what each model writes" in report and "| sft vs auto-tau-q0.3 |" in report
    assert "### mbpp-validation" in report and "asserts passed" in report
    assert (out / "report" / "masked_fraction_vs_tau.png").stat().st_size > 1000
    assert (out / "report" / "drift_vs_gain.png").stat().st_size > 1000
    check_report_json(json.loads((out / "report" / "report.json").read_text()), out)
    check_pinned_numbers(json.loads((out / "report" / "report.json").read_text()))
    for plot in ("training_loss.png", "delta_w.png", "token_ppl_distribution.png"):
        assert (out / "report" / plot).stat().st_size > 1000
    page = (out / "report" / "report.html").read_text()
    assert "Retention, paired against the base model" in page and page.count("data:image/png;base64,") >= 5
    assert '<s class="tok masked"' in page  # the token view shows the auto-tau mask, not sft's empty one
    masks = json.loads((out / "masks" / "target-auto-tau-q0.3" / "mask_stats.json").read_text())
    assert masks["policy"] == "auto-tau" and 0.2 < masks["masked_fraction"] <= 0.3
    card = (out / "train" / "auto-tau-q0.3" / "adapter" / "README.md").read_text()
    assert "| masked fraction of response tokens |" in card and "- auto-tau-q0.3: target (gsm8k)" in card
    printed = capsys.readouterr().out.strip().splitlines()  # the verdict, not the whole report
    assert printed[-1] == f"report: {out / 'report' / 'report.html'}" and printed[-3].startswith("sft: target (gsm8k)")
    adapter_mtime = (out / "train" / "auto-tau-q0.3" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    caplog.set_level("INFO")
    assert main(["run", str(config)]) == 0  # everything done already: nothing retrained
    assert ((out / "train" / "auto-tau-q0.3" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
            == adapter_mtime)
    assert "train auto-tau-q0.3: done already" in caplog.text
    # stages whose settings hold tuples (task lists) resume too: their stamps read back as lists
    assert "retention auto-tau-q0.3: done already" in caplog.text and "eval base: done already" in caplog.text
    assert "re-running" not in caplog.text


def report_numbers(data: dict) -> dict:
    """Every number of report.json a refactor must not move (not wall times or paths), flat, by row/measure."""
    out = {}
    for row in data["rows"]:
        label = row["label"]
        for task, r in row["tasks"].items():
            out[f"{label}/{task}"] = [r["score"], r["n"], *(r["ci95"] or [None, None])]
        for task, r in row.get("paired", {}).items():
            out[f"{label}/paired/{task}"] = [r["mean"], r["n"], *(r["ci95"] or [None, None])]
        for key, value in (row.get("metrics") or {}).items():
            if value is None or isinstance(value, (int, float)):
                out[f"{label}/metrics/{key}"] = value
        out.update({f"{label}/extras/{k}": v for k, v in row["extras"].items() if k != "train_time_s"})
    return out


def check_pinned_numbers(data: dict) -> None:
    """The tiny run's report numbers equal those b82a008 wrote (tests/fixtures/tiny_run_numbers.json), so a
    refactor that claims no change of results is held to it. Regenerate the file only for a change that means to
    move results, and say so in the commit."""
    pinned = json.loads((FIXTURES / "tiny_run_numbers.json").read_text())
    numbers = report_numbers(data)
    assert sorted(numbers) == sorted(pinned)
    for key, value in pinned.items():
        got, want = numbers[key], value
        if not isinstance(want, list):
            got, want = [got], [want]
        assert len(got) == len(want), key
        for a, b in zip(got, want):  # None (no estimate) must stay None, nan stay nan
            same = a is None if b is None else a == pytest.approx(b, rel=1e-4, abs=1e-6, nan_ok=True)
            assert same, (key, a, b)


def check_report_json(data: dict, out) -> None:
    """report.json holds the config's runs and item counts, the base against itself, and TI/BWT that follow
    from the rows' own scores (recomputed here); masked fraction and τ are the mask stage's."""
    assert (data["base"], data["target"]) == ("base", "gsm8k") and data["tasks"][0] == "gsm8k"
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["base", "sft", "auto-tau-q0.3"] and [r["is_base"] for r in data["rows"]] == [True, False,
                                                                                                       False]
    limits = {"gsm8k": 2, "arc_easy": 3, "drift:gsm8k": 2, "gen:gsm8k:format": 2, "gen:mbpp-validation": 2}
    for row in data["rows"]:
        assert {t: row["tasks"][t]["n"] for t in limits} == limits  # eval limit 2, mc_limit 3, drift/behaviour 2
    assert rows["base"]["tasks"]["drift:gsm8k"]["score"] == 0.0  # the base drifts nothing from itself
    assert "metrics" not in rows["base"] and set(rows["base"]["extras"].values()) == {None}
    base = {t: r["score"] for t, r in rows["base"]["tasks"].items()}
    for label in ("sft", "auto-tau-q0.3"):
        row = rows[label]
        tuned, m = {t: r["score"] for t, r in row["tasks"].items()}, row["metrics"]
        assert m["TI_abs"] == pytest.approx(tuned["gsm8k"] - base["gsm8k"])
        assert all(row["tasks"][t]["n"] > 0 for t in m["bwt_tasks"] + m["bwt_undefined"])  # never an empty task
        rel = [(tuned[t] - base[t]) / base[t] for t in m["bwt_tasks"]]
        assert m["BWT"] == (pytest.approx(sum(rel) / len(rel)) if rel else None)
        both = m["bwt_tasks"] + m["bwt_undefined"]
        assert m["BWT_abs"] == pytest.approx(sum(tuned[t] - base[t] for t in both) / len(both))
        assert {t: d["n"] for t, d in row["paired"].items() if t in ("gsm8k", "arc_easy")} == {"gsm8k": 2,
                                                                                               "arc_easy": 3}
        assert row["extras"]["delta_w_norm"] > 0
    assert rows["sft"]["extras"]["masked_fraction"] == 0.0
    stats = json.loads((out / "masks" / "target-auto-tau-q0.3" / "mask_stats.json").read_text())
    assert 0.2 < stats["masked_fraction"] <= 0.3
    assert rows["auto-tau-q0.3"]["extras"]["masked_fraction"] == pytest.approx(stats["masked_fraction"])
    assert rows["auto-tau-q0.3"]["extras"]["tau"] == pytest.approx(stats["tau"])


def test_run_config_errors_name_the_section(tiny_run_config, capsys):
    config, _ = tiny_run_config
    assert main(["run", str(config), "train.learnig_rate=1"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


def test_run_refuses_two_trainings_pushing_to_one_hub_repo(tiny_run_config, capsys):
    config, out = tiny_run_config
    assert main(["run", str(config), "train.push_to_hub=true", "train.hub_model_id=me/one"]) == 2
    assert "overwrite each other on the hub (me/one)" in capsys.readouterr().err
    assert not out.exists()  # refused before any stage ran


def test_report_of_a_run_dir_is_the_runs_report(tiny_run_config, tmp_path):
    config, out = tiny_run_config
    assert main(["run", str(config)]) == 0
    # The mask stage records the τ it applied in its own manifest: the report reads it there.
    manifest = json.loads((out / "masks" / "target-auto-tau-q0.3" / "manifest.json").read_text())
    assert manifest["policy"] == "auto-tau" and manifest["tau"] > 1 and 0.2 < manifest["masked_fraction"] <= 0.3
    assert main(["report", str(out), f"output_dir={tmp_path / 'again'}"]) == 0
    for name in ("report.md", "retention.json"):
        assert (tmp_path / "again" / name).read_text() == (out / "report" / name).read_text()
    assert f"| {manifest['tau']:.2f} |" in (tmp_path / "again" / "report.md").read_text()


def test_learning_rate_grid_writes_the_frontier_and_report_reproduces_it(tiny_run_config, tmp_path):
    config, _ = tiny_run_config
    out = tmp_path / "grid"
    assert main(["run", str(config), f"out_dir={out}", "learning_rates=[0.001, 0.01]", "frontier.gain=gain_target",
                 "frontier.retention=working_kept"]) == 0
    frontier = (out / "report" / "frontier.md").read_text()
    assert "sft@lr0.001" in frontier and "auto-tau-q0.3@lr0.01" in frontier and "`working_kept`" in frontier
    assert main(["report", str(out), f"output_dir={tmp_path / 'again'}"]) == 0
    assert (tmp_path / "again" / "frontier.md").read_text() == frontier
    assert (tmp_path / "again" / "report.md").read_text() == (out / "report" / "report.md").read_text()


def test_self_output_method_generates_its_data_then_trains_on_it(tmp_path, tiny_model_dir, caplog):
    """A self-output method without `data`: the base model answers the target prompts (generate stage,
    out_dir/generate/self-output), the training table holds those answers, a second run reuses them."""
    import pyarrow.parquet as pq

    from forgetless.lm.data import load_examples
    from forgetless.lm.modeling import load_tokenizer
    from forgetless.lm.templates import encode_conversation

    config = tmp_path / "run.yaml"
    config.write_text(f"""
out_dir: {tmp_path / 'out'}
model: {tiny_model_dir}
data: mbpp-train
limit: 3
max_length: 1024
methods: [{{method: self-output}}]
generate: {{task: none, samples: 2, max_new_tokens: 8, device: cpu}}
train: {{max_steps: 1, batch_size: 2, device: cpu}}
eval: {{tasks: [gsm8k], limit: 1, max_new_tokens: 2, device: cpu, cache: false}}
target: mbpp
""")
    out = tmp_path / "out"
    assert main(["run", str(config)]) == 0
    generated = out / "generate" / "self-output"
    stats = json.loads((generated / "generation_stats.json").read_text())
    assert (stats["prompts"], stats["samples"]) == (3, 6)  # the run's limit; 2 samples a prompt
    examples = load_examples(str(generated / "data.jsonl"))
    assert examples and all(ex.meta["provenance"]["source"] == "self_output" for ex in examples)
    ground_truth = {ex.id: ex.response for ex in load_examples("mbpp-train", limit=3)}
    assert all(ex.response != ground_truth[ex.id] for ex in examples)
    # The training table is the generated conversations, token for token.
    table = pq.read_table(out / "masks" / "self-output-self-output" / "data.parquet").to_pylist()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert [r["id"] for r in table] == [ex.id for ex in examples]
    for row, ex in zip(table, examples):
        encoded = encode_conversation(tokenizer, ex.messages, 1024)
        assert row["input_ids"] == encoded.input_ids and row["response_mask"] == encoded.response_mask
    samples_mtime = (generated / "samples.jsonl").stat().st_mtime_ns
    caplog.set_level("INFO")
    assert main(["run", str(config)]) == 0
    assert "generate self-output: done already" in caplog.text and "train self-output: done already" in caplog.text
    assert (generated / "samples.jsonl").stat().st_mtime_ns == samples_mtime


def test_the_verdicts_compare_every_recipe_with_stm_unless_the_config_names_a_reference():
    from forgetless.core.verdicts import VerdictConfig
    from forgetless.grid import MethodSpec
    from forgetless.run import with_reference

    methods = (MethodSpec("sft"), MethodSpec("random-mask"), MethodSpec("stm"))
    stm = methods[2].label
    assert with_reference(None, methods) == {"reference": stm}
    assert with_reference({"n_boot": 10}, methods) == {"n_boot": 10, "reference": stm}
    assert with_reference({"reference": "sft"}, methods) == {"reference": "sft"}
    assert with_reference(VerdictConfig(n_boot=200), methods).reference == stm
    assert with_reference(VerdictConfig(reference="sft"), methods).reference == "sft"
    assert with_reference(None, (MethodSpec("sft"), MethodSpec("dft"))) is None  # no STM: the records' first
    assert with_reference(None, (MethodSpec("sft"), MethodSpec("auto-tau", fraction=0.2))) == {
        "reference": MethodSpec("auto-tau", fraction=0.2).label}
