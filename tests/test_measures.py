"""One definition of the retention measures: the retention stage and the training probe share
their settings (MeasureSettings) and the function that runs them (measure_retention)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import forgetless.retention.behaviour as behaviour
import forgetless.retention.drift as drift
import forgetless.retention.heldout as heldout
import forgetless.retention.mc as mc
import forgetless.retention.stage as stage
from forgetless.config import load_config
from forgetless.retention.measures import MeasureSettings, measure_retention
from forgetless.retention.stage import RetentionConfig
from forgetless.run import RunConfig, make
from forgetless.train.probe import ProbeConfig, retention_probe

ROOT = Path(__file__).resolve().parents[1]


def test_both_configs_inherit_the_measure_settings():
    shared = {f.name for f in dataclasses.fields(MeasureSettings)}
    assert shared <= {f.name for f in dataclasses.fields(ProbeConfig)}
    assert shared <= {f.name for f in dataclasses.fields(RetentionConfig)}
    probe = ProbeConfig()  # the probe's own, smaller defaults
    assert (probe.mc_tasks, probe.mc_limit, probe.drift_sources, probe.drift_limit, probe.behaviour_sources,
            probe.max_new_tokens, probe.heldout_limit, probe.tau) == (
        ("arc_easy", "sciq"), 40, ("gsm8k", "arc_challenge-test"), 4, (), 32, 12, 2.5)
    assert RetentionConfig().mc_limit == 150 and RetentionConfig().max_new_tokens == 192
    for cls in (ProbeConfig, RetentionConfig):
        for bad in ({"mc_limit": 0}, {"tau": 0.5}, {"mc_tasks": ("nope",)}):
            with pytest.raises(ValueError):
                cls(**bad)
    with pytest.raises(ValueError, match="every"):
        ProbeConfig(every=0)


@pytest.mark.parametrize("path", ["src/forgetless/configs/frontier.yaml", "benchmarks/probe_retention.yaml"])
def test_shipped_yaml_sections_still_build(path):
    config = load_config(RunConfig, ROOT / path)
    retention = make(RetentionConfig, config.retention, "retention")
    assert retention.mc_tasks or retention.behaviour_sources  # each shipped config measures something
    if config.probe:
        probe = make(ProbeConfig, config.probe, "probe")
        assert probe.every == config.probe["every"] and probe.tau == config.probe.get("tau", 2.5)


@pytest.fixture
def calls(monkeypatch):
    """Every measure replaced by a recorder of its arguments; each returns one record."""
    seen = []

    def recorder(name):
        def record(*args, **kwargs):
            seen.append((name, args[2:], kwargs))
            return {f"{name}:{args[3] if name != 'mc' else args[2]}": {"task": name}}
        return record

    for module, fn in ((mc, "evaluate_mc"), (drift, "evaluate_drift"), (behaviour, "evaluate_behaviour"),
                       (heldout, "evaluate_heldout")):
        monkeypatch.setattr(module, fn, recorder(fn.removeprefix("evaluate_")))
    return seen


def test_measure_retention_passes_each_setting(calls, tmp_path):
    model = torch.nn.Linear(2, 2)
    settings = MeasureSettings(mc_tasks=("piqa",), mc_limit=3, drift_sources=("gsm8k",), drift_limit=2,
                               behaviour_sources=("gsm8k",), behaviour_limit=5, max_new_tokens=7, top_k=9,
                               heldout_limit=4, tau=10.0, batch_tokens=64, behaviour_max_new_tokens={"gsm8k": 11})
    records = measure_retention(model, "tok", model, settings, tmp_path, "cache", "base-id")
    assert list(records) == ["mc:piqa", "drift:gsm8k", "behaviour:gsm8k", "heldout:mbpp-validation"]
    assert calls == [
        ("mc", ("piqa", 3, tmp_path, 64), {}),
        ("drift", (model, "gsm8k", 2, "cache", tmp_path, 7, 9, "base-id"), {}),
        ("behaviour", (model, "gsm8k", 5, "cache", tmp_path, 11, "base-id"), {"is_base": True}),  # its own budget
        ("heldout", (model, "mbpp-validation", 4, "cache", tmp_path, 10.0), {"base_id": "base-id"}),
    ]


def test_probe_and_stage_run_the_same_measures(calls, monkeypatch, tmp_path):
    model = torch.nn.Linear(2, 2)
    common = dict(mc_tasks=("piqa",), mc_limit=3, drift_sources=("gsm8k",), drift_limit=2, behaviour_sources=(),
                  max_new_tokens=7, heldout_limit=4, tau=10.0)
    # The probe: the adapter-disabled view is the base (None), records in probes/step-0.
    retention_probe(ProbeConfig(**common), "tok", tmp_path / "probes", "cache", "base-id")(model, 0)
    probe_calls = list(calls)
    calls.clear()
    # The stage on a separate base model: the same calls but for the base and the output directory.
    monkeypatch.setattr(stage, "load_models", lambda config: (model, "tok", "base", "base-id"))
    out = stage.run_retention(RetentionConfig(**common, output_dir=str(tmp_path / "ret"), cache_dir="cache"))
    step = tmp_path / "probes" / ".step-0.tmp"
    swap = {step: out, None: "base", "cache": Path("cache")}
    assert [(n, tuple(swap.get(a, a) if not isinstance(a, torch.nn.Module) else a for a in args), kw)
            for n, args, kw in probe_calls] == calls
    assert json.loads((out / "manifest.json").read_text())["tasks"] == ["mc:piqa", "drift:gsm8k",
                                                                        "heldout:mbpp-validation"]
