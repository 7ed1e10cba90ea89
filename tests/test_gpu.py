"""bf16 on CUDA against fp32 on the CPU: per-token scores, the masked loss and its gradient agree within
bf16's precision. Marked ``gpu``: tests/conftest.py skips it where ``torch.cuda.is_available()`` is false."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model, conversations, drop_every
from forgetless.core.logits import token_nll
from forgetless.train.collate import MaskedBatchCollator, build_sft_table
from forgetless.train.loss import compute_masked_loss

pytestmark = pytest.mark.gpu

# bf16 keeps 8 significant bits (a relative step of 2^-8, 0.4%). Through two layers and a 400-way softmax the
# NLL of one token (3.5 to 9 nats here) moves by a few hundredths of a nat, the mean over 89 tokens by far less.
# Measured with bf16 on the CPU (the same rounding, other kernels): at most 0.043 nat, 0.05%, cosine 0.99994.
# The bounds leave room for CUDA's own kernels (accumulation order, attention) at about 5x those.
NLL_ATOL = 0.2  # nats, any one token
LOSS_RTOL = 0.01  # the masked mean NLL
GRAD_COSINE = 0.99  # the LM head's gradient, as a direction


def scores_loss_and_grad(batch: dict, device: str, dtype: torch.dtype):
    """Per-token NLL of the trained tokens, the masked loss, and the LM head's gradient, as fp32 on the CPU."""
    model = build_model(batch["vocab_size"], initializer_range=0.2).to(device, dtype)  # token losses spread out
    inputs = {k: v.to(device) for k, v in batch.items() if k != "vocab_size"}
    with torch.no_grad():
        nll = token_nll(model, inputs["input_ids"], inputs["attention_mask"], (inputs["labels"] != -100).long())
    model.train()
    loss, _ = compute_masked_loss(model, inputs)
    loss.backward()
    return nll.cpu(), loss.detach().float().cpu(), model.lm_head.weight.grad.float().cpu()


def test_bf16_on_cuda_agrees_with_fp32_on_cpu(tokenizer):
    rows = drop_every(build_sft_table(conversations(8), tokenizer), 3)  # an STM-like table: some tokens masked
    batch = {**MaskedBatchCollator(tokenizer.pad_token_id)(rows), "vocab_size": len(tokenizer)}
    ref_nll, ref_loss, ref_grad = scores_loss_and_grad(batch, "cpu", torch.float32)
    nll, loss, grad = scores_loss_and_grad(batch, "cuda", torch.bfloat16)
    scored = ~torch.isnan(ref_nll)
    assert nll.dtype == torch.float32 and torch.equal(scored, ~torch.isnan(nll)) and scored.sum() == 89
    assert (nll[scored] - ref_nll[scored]).abs().max().item() < NLL_ATOL
    assert loss.item() == pytest.approx(ref_loss.item(), rel=LOSS_RTOL)
    assert loss.item() == pytest.approx(nll[scored].mean().item(), rel=LOSS_RTOL)  # the loss is the scores' mean
    assert torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0).item() > GRAD_COSINE
