"""The data stages (score, eval, retention, generate) across 2 CPU processes (torchrun, gloo) write what 1 process
writes.

Each process takes whole batches of the one-process batching (:mod:`forgetless.lm.distributed`), so the same
examples share a forward pass however the work is split, and a sampled batch has the same seed: the records are
expected equal, the scores to float precision. One launch runs the four stages (``tests/data_worker.py``, which
checks that the launch has 2 processes); the references run here, in this one process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import data_worker as w

ROOT = Path(__file__).resolve().parents[1]


def launch(mode: str, world: Path, out: Path, expect_ok: bool = True,
           cmd: list[str] | None = None) -> subprocess.CompletedProcess:
    """``data_worker.py MODE WORLD OUT`` (or ``cmd``) under torchrun, 2 processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *(cmd or [str(ROOT / "tests" / "data_worker.py"), mode, str(world), str(out)])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=ROOT / "tests")
    if expect_ok:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return w.make_world(tmp_path_factory.mktemp("data-dist"))


@pytest.fixture(scope="module")
def two(world):
    """The four stages run once by 2 processes."""
    out = world / "two"
    launch("stages", world, out)
    ranks = [json.loads((out / f"world-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Every sharing loop (decode, scoring, MC, drift, surprise, grading, sampling) split its batches between the two.
    a, b = (np.array(r["shares"]) for r in ranks)  # per loop: (this process's batches, all batches)
    assert len(a) > 10 and np.array_equal(a[:, 1], b[:, 1]) and np.array_equal(a[:, 0] + b[:, 0], a[:, 1])
    several = a[:, 1] > 1
    assert several.sum() > 5 and (a[several, 0] > 0).all() and (b[several, 0] > 0).all()
    return out


def test_assign_balances_batches_by_cost():
    from forgetless.lm.distributed import assign, gather, padded_tokens, share

    # Costliest first, each to the lighter process: 5 | 4, 3 -> 7 | then 3 -> 8 | 1 -> 8.
    assert assign([5, 4, 3, 3, 1], 2) == [[0, 3], [1, 2, 4]]
    assert assign([1, 1, 1], 1) == [[0, 1, 2]] and assign([2], 3) == [[0], [], []]
    assert padded_tokens([0, 2], [3, 9, 5]) == 10
    assert share([[0], [1, 2]], [1, 1, 1]) == [[0], [1, 2]]  # one process: every batch
    assert gather({1: "b", 0: "a"}, 2) == ["a", "b"]
    with pytest.raises(RuntimeError, match="1 of 2 items have no result"):
        gather({0: "a"}, 2)


def max_difference(a, b, path: str = "") -> float:
    """Largest |a - b| over the numbers of two JSON-like values; anything else must be equal (NaN equals NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        return max([max_difference(a[k], b[k], f"{path}.{k}") for k in a], default=0.0)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        return max([max_difference(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))], default=0.0)
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), path
            return 0.0
        return abs(a - b)
    assert a == b, f"{path}: {a!r} != {b!r}"
    return 0.0


def items(out: Path, stem: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{stem}.items.jsonl").read_text().splitlines()]


def same_records(two: Path, one: Path, stems: list[str]) -> float:
    """Per-item records and score records of each stem equal (numbers to 1e-6); the largest difference."""
    worst = 0.0
    for stem in stems:
        worst = max(worst, max_difference(items(two, stem), items(one, stem), stem))
        a, b = (json.loads((d / f"{stem}.json").read_text()) for d in (two, one))
        a["settings"].pop("generation_s", None), b["settings"].pop("generation_s", None)
        worst = max(worst, max_difference(a, b, stem))
    assert worst < 1e-6
    return worst


def test_score_two_processes_equal_one(world, two):
    from forgetless.score.stage import run_score

    one = pq.read_table(run_score(w.score_config(world, world / "one" / "score")) / "scores.parquet")
    both = pq.read_table(two / "score" / "scores.parquet")
    assert both.column("id").to_pylist() == one.column("id").to_pylist() == [f"s{i}" for i in range(22)]
    assert both.column("input_ids").to_pylist() == one.column("input_ids").to_pylist()
    a, b = (np.concatenate([np.asarray(x, np.float64) for x in t.column("nll").to_pylist()]) for t in (both, one))
    assert np.array_equal(np.isnan(a), np.isnan(b))
    dnll = float(np.nanmax(np.abs(a - b)))
    print(f"score: max |dnll| {dnll:.2e} over {int((~np.isnan(a)).sum())} tokens")
    assert dnll < 1e-5
    # Each process's shared prompt prefix is taken from its own batches, so the sums agree to float precision.
    stats_two, stats_one = (json.loads((d / "score" / "stats.json").read_text()) for d in (two, world / "one"))
    assert stats_two.keys() == stats_one.keys()
    for key, value in stats_one.items():
        assert stats_two[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    assert not (two / "score" / "parts").exists()


def test_score_resumes_after_one_process_is_killed(world):
    out = world / "killed"
    killed = launch("score-kill", world, out, expect_ok=False)
    assert killed.returncode != 0
    parts = sorted((out / "score" / "parts").glob("part-*.npz"))
    saved = sum(len(np.load(p)["index"]) for p in parts)
    assert len(parts) >= 2 and 0 < saved < 22  # killed mid-run: parts of both processes' work, not all of it
    assert not (out / "score" / "scores.parquet").exists() and not (out / "score" / "manifest.json").exists()
    launch("score", world, out)
    scored = [json.loads((out / f"scored-{r}.json").read_text())["scored"] for r in (0, 1)]
    assert sum(scored) == 22 - saved and all(n > 0 for n in scored)  # only the unsaved examples, shared
    resumed = pq.read_table(out / "score" / "scores.parquet")
    one_dir = world / "one" / "score"
    if not (one_dir / "scores.parquet").exists():
        from forgetless.score.stage import run_score

        run_score(w.score_config(world, one_dir))
    one = pq.read_table(one_dir / "scores.parquet")
    assert resumed.column("id").to_pylist() == one.column("id").to_pylist()
    a, b = (np.concatenate([np.asarray(x, np.float64) for x in t.column("nll").to_pylist()]) for t in (resumed, one))
    print(f"score after a kill: {saved} of 22 examples kept, {scored} scored on "
          f"resume, max |dnll| {np.nanmax(np.abs(a - b)):.2e}")
    assert np.allclose(a, b, atol=1e-5, equal_nan=True)


def test_eval_records_equal(world, two):
    from forgetless.eval.stage import run_eval

    one = run_eval(w.eval_config(world, world / "one" / "eval"))
    worst = same_records(two / "eval", one, ["echo", "gsm8k"])
    print(f"eval: records equal, max |d| {worst:.2e}")
    assert len(items(one, "gsm8k")) == 5 and len(items(one, "echo")) == 5


def test_retention_records_equal(world, two, monkeypatch):
    from forgetless.retention.records import list_tasks, task_filename
    from forgetless.retention.stage import run_retention

    monkeypatch.chdir(world)
    one = run_retention(w.retention_config(world, world / "one" / "retention"))
    tasks = list_tasks(one)
    assert sorted(list_tasks(two / "retention")) == sorted(tasks)
    kinds = {t.split(":")[0] for t in tasks}
    assert {"arc_easy", "drift", "gen", "heldout"} <= kinds  # MC, drift, behaviour (graded MBPP too), held-out
    assert "gen:mbpp-tiny.jsonl:defines" in tasks
    worst = same_records(two / "retention", one, [task_filename(t) for t in tasks])
    print(f"retention: {len(tasks)} records equal, max |d| {worst:.2e}")
    manifest = json.loads((two / "retention" / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == sorted(tasks)


def test_generate_records_equal(world, two, monkeypatch):
    import forgetless.generate.stage as gen

    monkeypatch.setattr(gen, "make_verifier", w.parity_verifier)
    one = gen.run_generate(w.generate_config(world, world / "one" / "generate"))
    a, b = ([json.loads(x) for x in (d / gen.SAMPLES_FILE).read_text().splitlines()] for d in (two / "generate", one))
    assert [r["id"] for r in a] == [f"e{i}" for i in range(7)]  # the processes' files merged in data order
    worst = max_difference(a, b, "samples")
    assert worst < 1e-6
    texts = {s["text"] for r in b for s in r["samples"]}
    assert len(texts) > 3 and {s["verified"] for r in b for s in r["samples"]} == {True, False}  # real samples
    assert (two / "generate" / gen.DATA_FILE).read_text() == (one / gen.DATA_FILE).read_text()
    assert not list((two / "generate").glob("samples.rank*.jsonl"))
    print(f"generate: samples equal, max |d| {worst:.2e}")


def test_run_under_torchrun(world):
    """``forgetless run`` launched on 2 processes: every stage once, the stamps and the report by the first."""
    out = world / "run"
    config = world / "run.yaml"
    config.write_text(f"""
out_dir: {out}
model: {world / 'model'}
data: {world / 'score.jsonl'}
limit: 8
methods: [{{method: sft}}, {{method: auto-tau, fraction: 0.3}}]
train: {{max_steps: 1, batch_size: 1, device: cpu}}
eval: {{tasks: [{world / 'echo.json'}], limit: 3, max_new_tokens: 4, device: cpu, cache: false}}
retention: {{mc_tasks: [arc_easy], mc_limit: 3, drift_sources: [], behaviour_sources: [], heldout_source: null,
             device: cpu, cache_dir: {out / 'cache'}}}
target: echo
""")
    done = launch("run", world, out, cmd=["-m", "forgetless.cli", "run", str(config)])
    assert done.stdout.count("report: ") == 1  # one verdict, from the first process
    assert "| auto-tau-q0.3 |" in (out / "report" / "report.md").read_text()
    for label in ("sft", "auto-tau-q0.3"):
        assert json.loads((out / "train" / label / "train_summary.json").read_text())["processes"] == 2
    for stage in ("train/sft", "eval/base", "eval/auto-tau-q0.3", "retention/sft"):
        assert (out / stage / ".run_stamp.json").is_file() and (out / stage / "manifest.json").is_file()
