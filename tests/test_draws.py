"""Training draws (``draw_size`` with ``seeds``): each seed trains every recipe on its own seeded subset of the
training examples, so the draw of examples varies between runs and not only the seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgetless.config import ConfigError, build
from forgetless.grid import MethodSpec
from forgetless.lm.data import load_examples
from forgetless.run import RunConfig, check_settings, method_data, run_layout, score_settings, training_data
from forgetless.target import draw_path, write_draw


def ids(path) -> list[str]:
    return [json.loads(line)["id"] for line in Path(path).read_text().splitlines()]


def test_a_draw_is_a_seeded_subset_in_file_order(tmp_path):
    first = [e.id for e in load_examples("mbpp-train", 10)]
    a = write_draw("mbpp-train", 4, seed=0, out_dir=tmp_path, limit=10)
    assert a == draw_path(tmp_path, 0)
    drawn = ids(a)
    assert len(drawn) == len(set(drawn)) == 4
    assert set(drawn) <= set(first)  # `limit` applies before the draw
    assert drawn == [i for i in first if i in drawn]  # file order kept
    assert ids(write_draw("mbpp-train", 4, seed=1, out_dir=tmp_path, limit=10)) != drawn
    stamp = a.stat().st_mtime_ns
    assert ids(write_draw("mbpp-train", 4, seed=0, out_dir=tmp_path, limit=10)) == drawn
    assert a.stat().st_mtime_ns == stamp  # unchanged content is not rewritten: a resumed run reuses its stages
    # the drawn examples are the source's, message for message
    source = {e.id: e.messages for e in load_examples("mbpp-train", 10)}
    assert all(e.messages == source[e.id] for e in load_examples(str(a)))
    with pytest.raises(ConfigError, match=r"draw_size 11: mbpp-train has 10 examples"):
        write_draw("mbpp-train", 11, seed=0, out_dir=tmp_path, limit=10)


def config(tmp_path, **kw) -> RunConfig:
    values = {"out_dir": str(tmp_path), "data": "mbpp-train", "limit": 10, "seeds": [0, 1], "draw_size": 6,
              "methods": [{"method": "sft"}, {"method": "stm"},
                          {"method": "replay", "replay_fraction": 0.25}], "retention": None, "eval": None} | kw
    return build(RunConfig, values)


def test_every_recipe_at_a_seed_trains_on_that_seeds_draw(tmp_path):
    cfg = config(tmp_path)
    out = Path(cfg.out_dir)
    layout = run_layout(cfg, out)
    assert training_data(cfg, 0) == str(draw_path(out, 0)) and training_data(cfg) == "mbpp-train"
    sft, stm = MethodSpec("sft"), MethodSpec("stm")
    assert method_data(cfg, sft, out, 0) == method_data(cfg, stm, out, 0) != method_data(cfg, sft, out, 1)
    assert layout.scores[method_data(cfg, sft, out, 0)] == out / "scores" / "draw-s0"
    # replay mixes each draw with the base's answers: one mix per draw
    replay = MethodSpec("replay", replay_fraction=0.25)
    assert Path(method_data(cfg, replay, out, 1)).parent.name == "naturalqs-f0.25-s1"
    # a draw is scored whole: `limit` already made it
    assert score_settings(cfg, training_data(cfg, 0), "-", whole=True)["limit"] is None
    assert layout.masks["sft@s0"] != layout.masks["sft@s1"]
    assert set(layout.ppl_sources) >= {"ground truth"}


def test_draw_settings_fail_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="needs `seeds`"):
        config(tmp_path, seeds=[])
    with pytest.raises(ConfigError, match="draw_size 11: mbpp-train has 10 examples"):
        check_settings(config(tmp_path, draw_size=11))
    check_settings(config(tmp_path))  # 6 of 10: fine


def test_run_with_draws_scores_masks_and_trains_each_draw(tiny_run_config):
    """End to end on the tiny model: two seeds, each its draw of 3 of the first 4 examples; every stage of a draw
    reads that draw, and the seeds' measures are pooled item by item."""
    from forgetless.cli import main
    from forgetless.lm.stamps import STAMP

    config, out = tiny_run_config
    assert main(["run", str(config), "seeds=[0, 1]", "draw_size=3", "eval=null"]) == 0
    for seed in (0, 1):
        assert len(ids(out / "draws" / f"draw-s{seed}.jsonl")) == 3
        assert (out / "scores" / f"draw-s{seed}").is_dir()
        stamp = json.loads((out / "train" / f"sft@s{seed}" / STAMP).read_text())
        assert f"draw-s{seed}-sft" in json.dumps(stamp)
    assert ids(out / "draws" / "draw-s0.jsonl") != ids(out / "draws" / "draw-s1.jsonl")
    pooled = out / "retention" / "sft"
    assert pooled.is_dir() and any('"seeds"' in p.read_text() for p in pooled.rglob("*.json"))
