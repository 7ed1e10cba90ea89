"""Crashes: a non-finite loss stops training at its step and keeps the last good checkpoint; kill -9 during
training and evaluation, then a re-run, gives what an uninterrupted run gives (same seeds, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import build_tokenizer, cli, kill_mid_run, run_to_end
from forgetless.lm.data import load_examples
from forgetless.train.collate import build_sft_table, write_table
from forgetless.train.loss import NonFiniteLossError
from forgetless.train.stage import TrainConfig, last_checkpoint, run_train


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """An SFT table of 8 examples for the shared tiny model (``world / "model"`` links to it)."""
    root = tmp_path_factory.mktemp("crash")
    rows = [{"prompt": f"Write a python function number {i}.",
             "response": "def add(a, b):\n    return a + b" + " + 0" * i}
            for i in range(8)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_table(build_sft_table(load_examples(str(root / "data.jsonl")), build_tokenizer("chatml")),
                root / "sft.parquet")
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    return root


def train_config(world, name, **kw):
    base = dict(data=str(world / "sft.parquet"), output_dir=str(world / name), model=str(world / "model"), device="cpu",
                max_steps=4, batch_size=2, learning_rate=2e-2, lora_dropout=0.1, save_steps=1, save_total_limit=2)
    return TrainConfig(**{**base, **kw})


def checkpoint_step(path: str | None) -> int | None:
    return None if path is None else int(path.rsplit("-", 1)[1])


def adapter_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "loss.jsonl").read_text().splitlines())]


def test_non_finite_loss_stops_at_its_step_and_keeps_last_good_checkpoint(world, monkeypatch):
    import forgetless.train.loss as loss_module

    real, calls = loss_module.compute_masked_loss, []

    def nan_at_third_step(*args, **kwargs):
        calls.append(1)
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if len(calls) == 3 else loss), stats

    monkeypatch.setattr(loss_module, "compute_masked_loss", nan_at_third_step)
    cfg = train_config(world, "nan", max_steps=5)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 3; .*last good checkpoint: .*checkpoint-2"):
        run_train(cfg)
    out = Path(cfg.output_dir)
    assert last_checkpoint(out).endswith("checkpoint-2") and not (out / "checkpoints" / "checkpoint-3").exists()
    assert not (out / "manifest.json").exists() and not (out / "adapter").exists()
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    assert [s for s, _ in losses(out)] == [1, 2] and all(math.isfinite(v) for _, v in losses(out))


def test_incomplete_checkpoint_is_not_resumed_from(tmp_path):
    for step in (2, 3):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text('{"global_st')  # cut by a kill
    assert last_checkpoint(tmp_path).endswith("checkpoint-2")


def test_kill_9_during_training_then_resume_equals_uninterrupted(world):
    cfg = train_config(world, "killed", max_steps=5)
    reference = run_train(train_config(world, "uncut", max_steps=5))
    out = Path(cfg.output_dir)
    cmd = cli("train", "--data", cfg.data, "--output-dir", str(out), "--model", cfg.model, "--device", "cpu",
              "max_steps=5", "batch_size=2", "learning_rate=0.02", "lora_dropout=0.1", "save_steps=1",
              "save_total_limit=2", "resume=true")
    kill_mid_run(cmd, out, trigger=out / "checkpoints" / "checkpoint-2" / "trainer_state.json",
                 too_late=[out / "checkpoints" / "checkpoint-5", out / "adapter", out / "manifest.json"])
    # Killed mid-run: a resumable checkpoint before the last step (1 if the kill cut checkpoint-2 short), no results.
    resume_step = checkpoint_step(last_checkpoint(out))
    assert resume_step is not None and 1 <= resume_step < 5
    assert not (out / "manifest.json").exists() and not (out / "train_summary.json").exists()
    done = run_to_end(cmd)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert checkpoint_step(summary["resumed_from"]) == resume_step  # resumed, not started over
    assert [s for s, _ in losses(out)] == list(range(1, 6))
    assert [v for _, v in losses(out)] == pytest.approx([v for _, v in losses(reference)], rel=1e-5)
    a, b = adapter_weights(out), adapter_weights(reference)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not list(out.rglob(".*.tmp"))


def test_kill_9_during_evaluation_then_rerun_keeps_finished_tasks(world, tmp_path):
    from forgetless.eval.stage import EvalConfig, run_eval

    tasks = []
    for name, n in (("first", 3), ("second", 30)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"id": f"{name}{i}", "q": f"say {i}", "a": str(i)}) + "\n"
                                for i in range(n)))
        (tmp_path / f"{name}.json").write_text(json.dumps({"name": name, "data": str(data), "prompt": "{q}",
                                                           "gold": "a", "metric": "numeric", "max_new_tokens": 6}))
        tasks.append(str(tmp_path / f"{name}.json"))
    settings = ["batch_size=1", "cache=false", "progress=false", "device=cpu", f"tasks=[{','.join(tasks)}]"]
    out = tmp_path / "killed"
    cmd = cli("eval", "--model", str(world / "model"), "--output-dir", str(out), *settings)
    kill_mid_run(cmd, out, trigger=out / "first.json", too_late=[out / "second.json", out / "manifest.json"])
    first_mtime = (out / "first.json").stat().st_mtime_ns
    done = run_to_end(cmd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "first.json").stat().st_mtime_ns == first_mtime  # kept, not evaluated again
    assert "already evaluated" in done.stderr
    reference = run_eval(EvalConfig(output_dir=str(tmp_path / "uncut"), model=str(world / "model"), tasks=tuple(tasks),
                                    batch_size=1, cache=False, progress=False, device="cpu"))
    for name in ("first", "second"):
        assert (out / f"{name}.items.jsonl").read_text() == (reference / f"{name}.items.jsonl").read_text()
    a, b = (json.loads((d / "scores.json").read_text()) for d in (out, reference))
    assert {t: (r["score"], r["n"]) for t, r in a.items()} == {t: (r["score"], r["n"]) for t, r in b.items()}
    assert a["second"]["n"] == 30
