"""The masked loss: hand-computed values, equality with the model's own loss, accumulation invariance, KL."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import batch
from forgetless.core.logits import token_nll
from forgetless.train.collate import MaskedBatchCollator
from forgetless.train.loss import compute_masked_loss, masked_loss, rows_kl, trained_rows


def test_masked_loss_hand_computed():
    assert masked_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.5]), 4).item() == pytest.approx(0.625)
    assert masked_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]), torch.tensor(2)).item() == 2.0
    # nothing trained anywhere in the step: 0, not NaN
    assert masked_loss(torch.zeros(0), torch.zeros(0), 0).item() == 0.0


def test_rows_kl_hand_computed():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.25, 0.75]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.14384
    assert rows_kl(p, q).item() == pytest.approx(expected, abs=1e-6)
    assert rows_kl(q, q).item() == pytest.approx(0.0, abs=1e-7)


def test_trained_rows_shift():
    labels = torch.tensor([[-100, -100, 7, 8, -100]])
    assert trained_rows(labels).tolist() == [[False, True, True, False]]  # rows 1, 2 predict tokens 2, 3


def test_all_response_tokens_equals_model_loss(tokenizer, tiny_model):
    """tau = inf (every response token trained) is exactly the model's own SFT loss."""
    _, b = batch(tokenizer)
    loss, stats = compute_masked_loss(tiny_model, b)
    reference = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert stats["trained_tokens"].item() == (b["labels"][:, 1:] != -100).sum().item()


def test_masked_loss_matches_token_nll(tokenizer, tiny_model):
    rows, b = batch(tokenizer, mask_every=3)
    b["loss_weight"][b["labels"] != -100] = 0.5  # a soft policy: every trained token at half weight
    loss, _ = compute_masked_loss(tiny_model, b)
    with torch.no_grad():
        nll = token_nll(tiny_model, b["input_ids"], b["attention_mask"], b["labels"] != -100)
    kept = ~nll.isnan()
    expected = (0.5 * nll[kept]).sum() / kept.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_example_without_trained_tokens_adds_zero(tokenizer, tiny_model):
    _, b = batch(tokenizer, n=2)
    only_first = {k: v[:1] for k, v in b.items()}
    n_first = (only_first["labels"][:, 1:] != -100).sum()
    b["labels"][1] = -100
    b["loss_weight"][1] = 0.0
    loss, _ = compute_masked_loss(tiny_model, b)
    alone, _ = compute_masked_loss(tiny_model, only_first, num_items=n_first)
    assert loss.item() == pytest.approx(alone.item(), rel=1e-5)
    b["labels"][:] = -100
    empty, _ = compute_masked_loss(tiny_model, b)
    assert empty.item() == 0.0 and not torch.isnan(empty)
    empty.backward()  # the graph stays connected: every rank can still run backward


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_accumulation_1x4_equals_4x1(tokenizer, tiny_model):
    """Micro-batches normalised by the step-wide count sum to the full-batch loss and gradients."""
    rows, full = batch(tokenizer, n=4, mask_every=4)
    total = (full["labels"][:, 1:] != -100).sum()
    loss_full, _ = compute_masked_loss(tiny_model, full)
    loss_full.backward()
    g_full = grads(tiny_model).clone()
    tiny_model.zero_grad()
    collate = MaskedBatchCollator(tokenizer.pad_token_id)
    loss_sum = 0.0
    for r in rows:
        loss, _ = compute_masked_loss(tiny_model, collate([r]), num_items=total)
        loss.backward()
        loss_sum += loss.item()
    assert loss_sum == pytest.approx(loss_full.item(), rel=1e-5)
    torch.testing.assert_close(grads(tiny_model), g_full, rtol=1e-4, atol=1e-6)


def test_kl_zero_at_init_positive_after_change_and_pulls_back(tokenizer, tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    _, b = batch(tokenizer, n=2)
    n = (b["labels"][:, 1:] != -100).sum()
    sft, _ = compute_masked_loss(model, b)
    with_kl, stats = compute_masked_loss(model, b, kl_coef=1.0)
    assert stats["kl_sum"].item() == pytest.approx(0.0, abs=1e-6)  # B = 0: the adapter is the identity
    assert with_kl.item() == pytest.approx(sft.item(), abs=1e-6)
    torch.manual_seed(1)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0, 0.3)
    base_b = [p.detach().clone() for p in lora_b]  # the displacement from the base (B was 0)

    def kl_only():
        full, s = compute_masked_loss(model, b, kl_coef=1.0)
        plain, _ = compute_masked_loss(model, b)
        return full - plain, s

    kl, stats = kl_only()
    assert kl.item() > 1e-4 and stats["kl_sum"].item() / n.item() == pytest.approx(kl.item(), rel=1e-4)
    model.zero_grad()
    kl.backward()
    # The gradient points away from the base: moving against it (descent) reduces the drift.
    assert sum((p.grad * d).sum() for p, d in zip(lora_b, base_b)).item() > 0
    with torch.no_grad():
        for p in lora_b:
            p -= 0.5 * p.grad
    assert kl_only()[0].item() < kl.item()
