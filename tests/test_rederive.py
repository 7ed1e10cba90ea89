"""benchmarks/rederive.py recomputes every number of a committed result from its per-item records."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "verdicts-small"


def rederive(result_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rederive.py"), str(result_dir)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_committed_fixture_rederives():
    done = rederive(FIXTURE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every number re-derived" in done.stdout
    text = (FIXTURE / "verdicts.md").read_text()
    assert text.startswith("# Verdicts") and "stm@lr0.0003 wins against sft@lr0.0003" in text


COMMITTED = sorted(p.parent.name for p in (ROOT / "benchmarks" / "results").glob("*/verdicts.json"))


@pytest.mark.parametrize("result", COMMITTED)
def test_every_committed_result_rederives(result):
    """Each result under benchmarks/results/ with verdicts (the recipes pilot, the confirmatory run when it lands)."""
    done = rederive(ROOT / "benchmarks" / "results" / result)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_changed_item_is_caught(tmp_path):
    result = tmp_path / "result"
    shutil.copytree(FIXTURE, result)
    with gzip.open(result / "items.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    flipped = next(r for r in rows if r["model"] == "sft@lr0.0003" and r["measure"] == "gen:gsm8k:asked")
    flipped["score"] = 1.0 - flipped["score"]
    with gzip.open(result / "items.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    done = rederive(result)
    assert done.returncode == 1 and "same_dose differs" in done.stdout


@pytest.mark.parametrize("name", ["items.jsonl.gz", "verdicts.json", "verdicts.md"])
def test_the_fixture_is_small_and_complete(name):
    assert (FIXTURE / name).stat().st_size < 200_000


def test_the_run_ends_with_the_grids_verdict_sentences():
    """`forgetless run` prints the verdict block's sentences of a grid report (each with its interval and n), the
    same ones report.md opens with."""
    from forgetless.verdict import grid_verdict_lines

    lines = grid_verdict_lines(FIXTURE)
    md = (FIXTURE / "verdicts.md").read_text()
    assert lines and all(line in md for line in lines)
    assert lines[0].startswith("- stm@lr0.0003 wins against sft@lr0.0003") and "[+0.362, +0.688]" in lines[0]
    assert all("n = " in line and "[" in line for line in lines)
    assert grid_verdict_lines(FIXTURE / "nowhere") == []


def test_the_committed_ifeval_base_rescores_to_its_figures(tmp_path):
    """benchmarks/results/ifeval-base: the base's 541 answers at 512 tokens, re-scored, give the committed metrics
    and per-instruction outcomes (the README's base figure)."""
    from forgetless.eval.stage import EvalConfig, run_eval

    result = ROOT / "benchmarks" / "results" / "ifeval-base"
    predictions = tmp_path / "predictions-512.jsonl"
    predictions.write_bytes(gzip.decompress((result / "predictions-512.jsonl.gz").read_bytes()))
    out = run_eval(EvalConfig(tasks=("ifeval",), predictions=str(predictions), output_dir=str(tmp_path / "eval"),
                              cache=False, progress=False))
    fresh = json.loads((out / "scores.json").read_text())["ifeval"]
    committed = json.loads((result / "eval-512" / "scores.json").read_text())["ifeval"]
    assert fresh["n"] == 541 and fresh["metrics"] == committed["metrics"]
    with gzip.open(result / "eval-512" / "ifeval.items.jsonl.gz", "rt") as f:
        assert [json.loads(line)["extracted"] for line in f] == \
            [json.loads(line)["extracted"] for line in (out / "ifeval.items.jsonl").read_text().splitlines()]
