"""One recipe table (forgetless.core.recipes): every list of methods is read from it, and ``forgetless run --help``
shows every recipe with its description."""

from __future__ import annotations

import pytest

from forgetless import cli, grid, run
from forgetless.core.masking import POLICIES
from forgetless.core.recipes import GENERATED, RECIPES, TRAIN_METHODS, Recipe
from forgetless.generate.config import DEFAULT_SAMPLES, GenerateConfig
from forgetless.generate.config import METHODS as GENERATE_METHODS
from forgetless.train.config import METHODS as TRAIN_CONFIG_METHODS
from forgetless.train.config import TrainConfig
from forgetless.train.loss import LOSS_TYPES


def method_spec(name: str) -> grid.MethodSpec:
    return grid.MethodSpec(name, replay_fraction=0.25 if RECIPES[name].data == "replay" else None)


def test_the_grid_reads_every_recipe_and_what_each_implies():
    assert list(grid.METHOD_POLICIES) == list(RECIPES)
    assert grid.METHOD_POLICIES == {
        "sft": ("none", {}), "stm": ("threshold", {}), "auto-tau": ("auto-tau", {"method": "stm"}),
        "random-mask": ("random", {}), "inverse-mask": ("inverse", {}), "soft": ("inverse-ppl", {}),
        "dft": ("none", {"loss_type": "dft"}), "kl": ("none", {}), "weight-decay": ("none", {"method": "sft"}),
        "replay": ("none", {}), "self-output": ("none", {}), "rephrase": ("none", {})}
    for name in RECIPES:
        assert method_spec(name).recipe is RECIPES[name]


def test_train_methods_are_the_recipes_that_train_as_themselves():
    assert TRAIN_CONFIG_METHODS == TRAIN_METHODS
    assert set(TRAIN_METHODS) == {r.train.get("method", r.name) for r in RECIPES.values()}
    assert {r.trains_as for r in RECIPES.values() if r.trains_as} <= set(TRAIN_METHODS)
    assert {r.name for r in RECIPES.values() if r.trains_as} == {"auto-tau", "weight-decay"}


def test_the_generators_are_the_generated_recipes_and_the_authors_generations_of_each():
    assert GENERATED == {"self-output": "self_output", "rephrase": "rephrase"}
    assert grid.GENERATED is run.GENERATED is GENERATED  # one table, read by every consumer
    assert GENERATE_METHODS == ("self_output", "rephrase", "paper_self_output", "paper_rephrase")
    assert set(DEFAULT_SAMPLES) == set(GENERATED.values())


def test_each_recipe_names_a_masking_policy_and_a_loss_the_stages_know():
    assert {r.policy for r in RECIPES.values()} <= set(POLICIES)
    assert {r.loss for r in RECIPES.values()} <= set(LOSS_TYPES)


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_builds_its_train_config(name, tmp_path):
    """What the grid passes the train stage for a recipe (method, then the settings it implies) is a valid
    TrainConfig; kl needs its coefficient, as the run's train section gives it."""
    recipe = RECIPES[name]
    kl = {"kl_coef": 0.1} if recipe.kl else {}
    cfg = TrainConfig(data="x", output_dir=str(tmp_path), **{"method": name, **recipe.train, **kl})
    assert cfg.method == (recipe.trains_as or name) and cfg.loss_type == recipe.loss


def test_a_bad_recipe_is_refused():
    with pytest.raises(ValueError, match="masking policy"):
        Recipe("x", "-", policy="nope")
    with pytest.raises(ValueError, match="generator"):
        Recipe("x", "-", data="generated")
    with pytest.raises(ValueError, match="generator"):
        Recipe("x", "-", generator="self_output")
    with pytest.raises(ValueError, match="data must be one of"):
        Recipe("x", "-", data="web")


def test_unknown_methods_name_the_choices():
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of sft, stm, auto-tau, .*, rephrase$"):
        grid.MethodSpec("nope")
    with pytest.raises(ValueError, match="method must be one of .*'sft'.*, got 'auto-tau'"):
        TrainConfig(data="x", output_dir="-", method="auto-tau")
    with pytest.raises(ValueError, match="method must be one of self_output, .*, got 'self-output'"):
        GenerateConfig(method="self-output")


def test_run_help_lists_every_recipe_with_its_description(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    shown = capsys.readouterr().out
    lines = shown[shown.index("recipes (methods:"):].splitlines()[1:]
    assert [line.split()[0] for line in lines] == list(RECIPES)
    assert all(r.description in " ".join(line.split()) for r, line in zip(RECIPES.values(), lines))
    methods_help = run.RunConfig.__dataclass_fields__["methods"].metadata["help"]
    assert "|".join(RECIPES) in methods_help
