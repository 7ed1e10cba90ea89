"""Weight-update diagnostics against hand-computed values and PEFT's own merged weights."""

from __future__ import annotations

import math

import pytest
import torch

from forgetless.core.diagnostics import (adapter_updates, effective_rank, full_updates, lora_delta,
                                    lowrank_singular_values, update_stats)


def test_effective_rank_hand_computed():
    assert effective_rank(torch.tensor([2.0, 2.0, 0.0])) == pytest.approx(2.0)
    assert effective_rank(torch.tensor([5.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    # p = (0.75, 0.25): H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(0.5623351446), rel=1e-6)


def test_rank_one_update_of_known_norm():
    u = torch.tensor([0.0, 3.0, 0.0])  # ||u|| = 3
    v = torch.tensor([0.0, 0.0, 4.0, 0.0])  # ||v|| = 4
    stats = update_stats(torch.outer(u, v), top_k=2)
    assert stats["frobenius"] == pytest.approx(12.0)
    assert stats["top_singular_values"] == pytest.approx([12.0, 0.0], abs=1e-5)
    assert stats["effective_rank"] == pytest.approx(1.0, abs=1e-4)


def test_lowrank_singular_values_match_full_svd():
    torch.manual_seed(0)
    a, b = torch.randn(4, 10), torch.randn(7, 4)
    delta = lora_delta(a, b, 2.0)
    torch.testing.assert_close(delta, 2.0 * b @ a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lowrank_singular_values(a, b, 2.0), torch.linalg.svdvals(delta)[:4], rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_updates_equal_merged_minus_base(tiny_model, use_dora):
    from peft import LoraConfig, get_peft_model

    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
    diag = adapter_updates(model)
    merged = model.merge_and_unload().state_dict()
    expected = {k[: -len(".weight")]: torch.linalg.norm(merged[k] - base[k]).item()
                for k in base if k.endswith("proj.weight")}
    assert diag["num_modules"] == len(expected) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name, stats in diag["modules"].items():
        short = name.replace("base_model.model.", "")
        assert stats["frobenius"] == pytest.approx(expected[short], rel=1e-4)
    assert diag["total_frobenius"] == pytest.approx(math.sqrt(sum(v * v for v in expected.values())), rel=1e-4)


def test_full_updates_see_only_the_changed_module(tiny_model):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    w = tiny_model.model.layers[1].mlp.down_proj.weight  # (32, 64)
    with torch.no_grad():
        w += torch.outer(torch.full((32,), 0.5), torch.full((64,), 0.25))  # ||dW|| = 0.5*sqrt(32)*0.25*sqrt(64)
    diag = full_updates(tiny_model, base)
    assert diag["modules"]["model.layers.1.mlp.down_proj"]["frobenius"] == pytest.approx(0.5 * 32**0.5 * 2.0, rel=1e-5)
    assert diag["modules"]["model.layers.1.mlp.down_proj"]["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert diag["largest_module"] == "model.layers.1.mlp.down_proj"
    assert diag["total_frobenius"] == pytest.approx(0.5 * 32**0.5 * 2.0, rel=1e-5)
    assert "lm_head" not in diag["modules"]
