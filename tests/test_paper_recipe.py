"""The shipped `paper` configs hold the authors' recipe per method (their public code:
appier-research/robust-llm-finetunes, train_with_mask.py and training/axolotl_configs/), and the
embedded run differs from it only where a 2-core CPU forces it."""

from __future__ import annotations

import dataclasses

import pytest

from forgetless.cli import resolve_config_path
from forgetless.config import load_config
from forgetless.run import RunConfig, train_config, train_runs

# The authors' recipes, written out from their code (not read from the config under test).
STM_RECIPE = {"adapter": "dora", "lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "target_modules": "all-linear",
              "learning_rate": 2e-5, "epochs": 3.0, "batch_size": 1, "grad_accum": 1, "lr_scheduler": "cosine",
              "warmup_ratio": 20.0, "optim": "adamw_8bit", "gradient_checkpointing": True, "dtype": "auto",
              "keep": "best-epoch", "select_on": "mbpp"}
GROUND_TRUTH_RECIPE = {**STM_RECIPE, "adapter": "lora", "lora_r": 32, "lora_alpha": 16.0, "batch_size": 2,
                       "warmup_ratio": 10.0}
# What the embedded run changes, and nothing else: 1 epoch (3 take ~45 min per DoRA method here),
# fp32 AdamW (8-bit AdamW needs bitsandbytes on CUDA), no gradient checkpointing (no memory to save),
# the last checkpoint (one epoch leaves nothing to select).
CPU_FORCED = {"epochs": 1.0, "optim": "adamw_torch", "gradient_checkpointing": False, "keep": "last"}


def trained(name: str) -> dict[str, object]:
    config = load_config(RunConfig, resolve_config_path(name))
    return {p.label: train_config(config, p.label, p.method, p.lr, "-", p.seed) for p in train_runs(config)}


def recipe_of(label: str) -> dict:
    return GROUND_TRUTH_RECIPE if label in ("sft", "weight-decay-0.1", "self-output", "rephrase") else STM_RECIPE


def fields(cfg, names) -> dict:
    return {k: getattr(cfg, k) for k in names}


def test_paper_config_is_the_authors_recipe_per_method():
    runs = trained("paper")
    assert {"sft", "stm-tau2.5", "random-mask-tau2.5", "inverse-mask-tau2.5", "self-output", "rephrase"} <= set(runs)
    for label, cfg in runs.items():
        assert fields(cfg, recipe_of(label)) == recipe_of(label), label
    assert runs["kl"].kl_coef == 0.1 and runs["weight-decay-0.1"].weight_decay == 0.1
    config = load_config(RunConfig, resolve_config_path("paper"))
    assert config.max_length == 2048 and config.data == "mbpp-train" and config.limit is None


def test_paper_fair_gives_every_method_the_stm_recipe():
    for label, cfg in trained("paper-fair").items():
        assert fields(cfg, STM_RECIPE) == STM_RECIPE, label


@pytest.mark.parametrize("label", ["sft", "stm-tau2.5", "stm-q0.21", "random-mask-tau2.5"])
def test_embedded_run_changes_only_what_the_cpu_forces(label):
    paper, embedded = trained("paper")[label], trained("paper-embedded")[label]
    differ = {f.name for f in dataclasses.fields(paper)
              if getattr(paper, f.name) != getattr(embedded, f.name)
              and f.name not in ("output_dir", "model", "save_steps")}
    assert differ == set(CPU_FORCED)
    assert fields(embedded, CPU_FORCED) == CPU_FORCED


def test_embedded_run_uses_all_training_examples_and_both_stm_points():
    config = load_config(RunConfig, resolve_config_path("paper-embedded"))
    assert config.limit is None and config.max_length == 2048
    taus = {m.label: (m.method, m.tau, m.fraction) for m in config.methods}
    assert taus == {"sft": ("sft", 2.5, None), "stm-tau2.5": ("stm", 2.5, None),
                    "stm-q0.21": ("auto-tau", 2.5, 0.21), "random-mask-tau2.5": ("random-mask", 2.5, None)}
