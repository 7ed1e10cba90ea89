"""The frontier: interpolation at matched gain, the paired bootstrap, and checkpoint probes along a run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from forgetless.core.frontier import common_gains, interpolate_at_gain, matched_gain_table, resolved, verdict
from forgetless.core.intervals import paired_difference
from forgetless.train.probe import ProbeCallback, read_probes
from forgetless.train.stage import run_train
from conftest import Crash, build_model, build_tokenizer, crash_at, train_config


def test_interpolate_on_hand_made_curve():
    curve = [(0.0, 1.0), (0.2, 0.9), (0.6, 0.5)]
    assert interpolate_at_gain(curve, 0.1) == pytest.approx(0.95)
    assert interpolate_at_gain(curve, 0.4) == pytest.approx(0.7)   # halfway from 0.9 to 0.5
    assert interpolate_at_gain(curve, 0.2) == pytest.approx(0.9)   # a point itself
    assert interpolate_at_gain(curve, 0.6) == pytest.approx(0.5)   # the end point is inside
    assert interpolate_at_gain(curve, 0.61) is None                 # never extrapolate
    assert interpolate_at_gain(curve, -0.01) is None
    assert interpolate_at_gain([], 0.1) is None
    assert interpolate_at_gain([(0.1, 0.8), (0.1, 0.6)], 0.1) == pytest.approx(0.7)  # equal gains averaged
    with pytest.raises(ValueError):
        interpolate_at_gain([(0.5, 1.0), (0.1, 0.9)], 0.2)


def test_matched_gain_table_interval_and_lr():
    curves = {
        "sft": [{"gain": 0.4, "retention": 0.6, "ci95": [0.5, 0.7], "lr": 1e-3},
                {"gain": 0.0, "retention": 1.0, "ci95": [1.0, 1.0], "lr": 1e-4}],   # unsorted on purpose
        "stm": [{"gain": 0.0, "retention": 1.0, "ci95": [1.0, 1.0], "lr": 1e-4},
                {"gain": 0.2, "retention": 0.9, "ci95": [0.8, 1.0], "lr": 1e-3}],
    }
    table = matched_gain_table(curves, [0.1, 0.3])
    assert table["sft"][0.1]["retention"] == pytest.approx(0.9)
    assert table["sft"][0.1]["ci95"] == pytest.approx([0.875, 0.925])
    assert table["sft"][0.1]["lr"] == pytest.approx(10 ** -3.75)  # a quarter of the way on log10 lr
    assert table["stm"][0.1]["retention"] == pytest.approx(0.95)
    assert table["stm"][0.3] is None                              # stm's curve stops at gain 0.2
    assert common_gains(curves, 3) == pytest.approx([0.0, 0.1, 0.2])
    assert common_gains({"a": [{"gain": 0.0}, {"gain": 0.1}], "b": [{"gain": 0.2}]}) == []


def test_paired_difference_identical_models_interval_around_zero():
    rng = random.Random(1)
    a = {str(i): float(rng.random() < 0.5) for i in range(150)}
    r = paired_difference(a, dict(a), n_boot=500, seed=0)
    assert r["n"] == 150 and r["mean"] == 0.0 and r["ci95"][0] <= 0.0 <= r["ci95"][1]
    assert resolved(r) is False
    assert "cannot tell" in verdict("stm", "sft", "ARC-Easy acc", r)


def test_paired_difference_finds_planted_difference_and_pairs_by_id():
    rng = random.Random(2)
    b = {str(i): float(rng.random() < 0.5) for i in range(200)}
    # a answers 30 of b's wrong items right and nothing else differs: +0.15 exactly
    wrong = [k for k, v in b.items() if v == 0.0][:30]
    a = {k: (1.0 if k in wrong else v) for k, v in b.items()}
    a["extra"] = 0.0  # ids only one model has are left out
    r = paired_difference(a, b, n_boot=1000, seed=0)
    assert r["n"] == 200 and r["mean"] == pytest.approx(0.15)
    assert 0.0 < r["ci95"][0] < 0.15 < r["ci95"][1]
    assert resolved(r) is True
    assert "stm is better" in verdict("stm", "sft", "acc", r)
    assert "sft is better" in verdict("stm", "sft", "KL", r, higher_is_better=False)
    assert resolved(paired_difference({"x": 1.0}, {"y": 1.0})) is None
    few = paired_difference({"0": 1.0, "1": 1.0}, {"0": 0.0, "1": 0.0})
    assert resolved(few) is None and "too few to judge" in verdict("a", "b", "acc", few)


def _probe_recorder(calls):
    def probe(model, step):
        calls.append((step, model.training))
        model.eval()  # a careless probe: the callback must restore the mode
        return {"step_measure": float(step), "retention": 1.0 - 0.1 * step}
    return probe


def test_probe_order_modes_and_last_step(train_world, tmp_path):
    calls = []
    out = tmp_path / "probes.jsonl"
    seen_modes = []

    class Spy(ProbeCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            r = super().on_step_end(args, state, control, model=model, **kw)
            seen_modes.append(all(m.training for m in model.modules()))
            return r

    cb = Spy(out, _probe_recorder(calls), every=2)
    run_train(train_config(train_world, "probe-order", max_steps=5, lora_dropout=0.1), callbacks=[cb])
    assert [s for s, _ in calls] == [0, 2, 4, 5]  # step 0, every 2, and the last step
    assert [r["step"] for r in read_probes(out)] == [0, 2, 4, 5]
    assert all(seen_modes)  # the trainer's train mode is back after each probe


def test_probe_resume_skips_done_steps(train_world, tmp_path):
    out = tmp_path / "probes.jsonl"
    calls = []
    kw = dict(max_steps=5, save_steps=2)
    with pytest.raises(Crash):
        run_train(train_config(train_world, "probe-resume", **kw),
                  callbacks=[ProbeCallback(out, _probe_recorder(calls), every=1), crash_at(3)])
    assert [s for s, _ in calls] == [0, 1, 2, 3]
    calls.clear()
    run_train(train_config(train_world, "probe-resume", resume=True, **kw),
              callbacks=[ProbeCallback(out, _probe_recorder(calls), every=1)])
    assert [s for s, _ in calls] == [4, 5]  # resumed from checkpoint-2: steps 3 is in the file already
    assert [r["step"] for r in read_probes(out)] == [0, 1, 2, 3, 4, 5]


def test_guard_stops_training(train_world, tmp_path):
    calls = []
    cb = ProbeCallback(tmp_path / "probes.jsonl", _probe_recorder(calls), every=1,
                       guard_metric="retention", guard_min=0.75, guard_restore=False)
    d = run_train(train_config(train_world, "probe-guard", max_steps=8), callbacks=[cb])
    # retention = 1 - 0.1 * step falls below 0.75 at step 3
    assert cb.stopped_at == 3
    assert json.loads((d / "train_summary.json").read_text())["global_steps"] == 3


def test_guard_puts_back_the_last_passing_weights(train_world, tmp_path):
    from safetensors.torch import load_file

    seen = {}

    def probe(model, step):
        seen[step] = {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad}
        return {"retention": 1.0 - 0.1 * step}

    cb = ProbeCallback(tmp_path / "probes.jsonl", probe, every=1, guard_metric="retention", guard_min=0.75)
    d = run_train(train_config(train_world, "probe-guard-restore", max_steps=8), callbacks=[cb])
    assert (cb.stopped_at, cb.restored_to) == (3, 2)  # 0.7 < 0.75 at step 3; step 2 (0.8) was the last within
    saved = load_file(d / "adapter" / "adapter_model.safetensors")
    assert saved and all(torch.equal(w, seen[2][n]) for n, w in saved.items())
    assert not all(torch.equal(w, seen[3][n]) for n, w in saved.items())  # the step-3 weights were not kept


def test_probe_keeps_adapter_state():
    """A probe that disables the adapter inside leaves it enabled, with the same weights."""
    from peft import LoraConfig, get_peft_model

    from forgetless.train.probe import preserved_state

    tok = build_tokenizer("chatml")
    model = get_peft_model(build_model(len(tok)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    ids = torch.tensor([[1, 2, 3, 4]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.eval()
        tuned = model(ids).logits
        model.train()
    with preserved_state(model):
        with model.disable_adapter():
            model.eval()
            model(ids)
    assert all(m.training for m in model.modules())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tuned)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def _records(d, acc_items, kl_items, nll_items, base_nll):
    """Retention records of one model: an MC task, one drift source and held-out NLL (all kinds)."""
    from forgetless.retention.records import make_record, write_task

    write_task(d, make_record("arc_easy", "acc", acc_items, higher_is_better=True, chance=0.25, binary=True),
               [{"id": str(i), "score": s} for i, s in enumerate(acc_items)])
    write_task(d, make_record("drift:gsm8k", "kl_base_tuned", kl_items, higher_is_better=False),
               [{"id": str(i), "score": s} for i, s in enumerate(kl_items)])
    change = sum(nll_items) / len(nll_items) - base_nll
    for kind in ("kept", "masked", "all"):
        settings = {"kind": kind, "change": change, "change_ci95": [change - 0.01, change + 0.01],
                    "base_score": base_nll}
        write_task(d, make_record(f"heldout:mbpp-validation:{kind}", "nll", nll_items, higher_is_better=False,
                                  settings=settings), [{"id": str(i), "score": s} for i, s in enumerate(nll_items)])


def test_build_frontier_on_hand_made_records(tmp_path):
    from forgetless.report.frontier import build_frontier, write_frontier

    n = 100
    base_acc = [1.0] * 60 + [0.0] * 40
    _records(tmp_path / "base", base_acc, [0.0] * n, [1.0] * n, 1.0)
    # sft: lr 1e-4 learns 0.2 nats, loses 10 items; lr 1e-3 learns 0.4, loses 20.
    # stm: lr 1e-4 learns 0.1, loses nothing; lr 1e-3 learns 0.3, loses 5.
    spec = {("sft", 1e-4): (0.2, 10), ("sft", 1e-3): (0.4, 20), ("stm", 1e-4): (0.1, 0), ("stm", 1e-3): (0.3, 5)}
    grid = []
    for (method, lr), (gain, lost) in spec.items():
        label = f"{method}@lr{lr:g}"
        acc = [0.0] * lost + base_acc[lost:]
        _records(tmp_path / label, acc, [0.1 * lost / 10] * n, [1.0 - gain] * n, 1.0)
        grid.append({"label": label, "method": method, "lr": lr, "retention_dir": tmp_path / label, "train_dir": None})
    data = build_frontier(grid, tmp_path / "base", gain="gain_all", retention="mc_retention", n_gains=2)
    # common range of gain: [0, 0.3]; base margin 0.6 - 0.25 = 0.35
    assert data["gains"] == pytest.approx([0.3])
    sft = data["matched"]["sft"][str(data["gains"][0])]
    stm = data["matched"]["stm"][str(data["gains"][0])]
    # sft at gain 0.3: halfway between 10 and 20 lost items = 15 items -> 1 - 0.15 / 0.35
    assert sft["retention"] == pytest.approx(1 - 0.15 / 0.35)
    assert sft["ci95"][0] < sft["retention"] < sft["ci95"][1]
    assert stm["retention"] == pytest.approx(1 - 0.05 / 0.35)
    assert stm["lr"] == pytest.approx(1e-3) and sft["lr"] == pytest.approx(10 ** -3.5)
    same_lr = [r for r in data["paired"]
               if r["a"] == "stm@lr0.001" and r["b"] == "sft@lr0.001" and r["measure"] == "arc_easy"]
    assert same_lr and same_lr[0]["mean"] == pytest.approx(0.15) and "stm@lr0.001 is better" in same_lr[0]["sentence"]
    md = write_frontier(tmp_path / "report", data)
    text = md.read_text()
    assert "matched target gain" in text and "resolved by the item count" in text
    assert (tmp_path / "report" / "frontier.png").stat().st_size > 0
    assert json.loads((tmp_path / "report" / "frontier.json").read_text())["gains"] == pytest.approx([0.3])


def test_probes_refuse_a_multi_process_launch(tmp_path):
    from types import SimpleNamespace

    from forgetless.train.probe import ProbeCallback

    callback = ProbeCallback(tmp_path / "probes.jsonl", lambda model, step: {"x": 1.0}, every=1)
    with pytest.raises(ValueError, match="one process, not across 2"):
        callback.on_train_begin(SimpleNamespace(world_size=2), SimpleNamespace(global_step=0), None, model=object())
    assert not (tmp_path / "probes.jsonl").exists()
