"""Stage stamps: a finished stage is skipped for the same settings, compared less the fields that only say how it
ran; an interrupted training continues only from checkpoints of the same settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from forgetless import __version__
from forgetless.lm.stamps import STAMP, STARTED, record_start, run_once, stage_done, started_with
from forgetless.run import continue_or_restart
from forgetless.train.config import CHECKPOINTING, TrainConfig


def test_stage_done_compares_every_field_but_the_ignored_ones(tmp_path):
    calls = []
    settings = {"lr": 1e-3, "save_steps": 0, "resume": False}
    run_once(tmp_path, settings, lambda: calls.append(1), "stage")
    assert json.loads((tmp_path / STAMP).read_text()) == {**settings, "forgetless_version": __version__}
    run_once(tmp_path, settings, lambda: calls.append(2), "stage")
    assert calls == [1]  # done already
    checkpointed = {**settings, "save_steps": 0.1, "resume": True}
    assert not stage_done(tmp_path, checkpointed)
    assert stage_done(tmp_path, checkpointed, ignore=CHECKPOINTING)
    assert not stage_done(tmp_path, {**checkpointed, "lr": 3e-4}, ignore=CHECKPOINTING)
    assert not stage_done(tmp_path / "never-ran", settings)


def test_started_with_reads_the_settings_a_run_started_with(tmp_path):
    assert not started_with(tmp_path, {"lr": 1}) and not (tmp_path / STARTED).exists()
    record_start(tmp_path, {"lr": 1, "resume": False})
    assert started_with(tmp_path, {"lr": 1, "resume": True}, ignore=("resume",))
    assert not started_with(tmp_path, {"lr": 1, "resume": True})
    assert not started_with(tmp_path, {"lr": 2, "resume": False}, ignore=("resume",))


def fake_checkpoint(out: Path, step: int) -> None:
    d = out / "checkpoints" / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_an_interrupted_training_continues_only_from_checkpoints_of_its_own_settings(tmp_path):
    cfg = TrainConfig(data="table.parquet", output_dir=str(tmp_path / "train"), learning_rate=1e-3)
    settings = {**dataclasses.asdict(cfg), "data_digest": "abc"}
    out = Path(cfg.output_dir)
    first = continue_or_restart(cfg, settings)  # nothing there: a fresh start, recorded
    assert not first.resume and started_with(out, settings)
    fake_checkpoint(out, 4)  # then the process died
    again = continue_or_restart(cfg, settings)
    assert again.resume and (out / "checkpoints" / "checkpoint-4").is_dir()
    changed = {**settings, "data_digest": "def"}  # the mask changed: its checkpoints are of another run
    fresh = continue_or_restart(cfg, changed)
    assert not fresh.resume and not (out / "checkpoints").exists() and started_with(out, changed)
