"""The real embedded SmolLM2-135M-Instruct: template boundaries and scoring alignment."""

import pytest
import torch

from forgetless.lm.data import load_examples
from forgetless.core.logits import token_nll
from forgetless.lm.templates import encode_conversation, encode_prompt

pytestmark = pytest.mark.slow


def test_embedded_response_boundaries(embedded):
    _, tok = embedded
    ex = load_examples("mbpp-train", limit=1)[0]
    enc = encode_conversation(tok, ex.messages)
    first = enc.response_mask.index(1)
    assert tok.decode(enc.input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert enc.input_ids[:first] == encode_prompt(tok, ex.prompt_messages)
    response = tok.decode([i for i, m in zip(enc.input_ids, enc.response_mask) if m])
    assert response == ex.response.strip() + "<|im_end|>" or response == ex.response + "<|im_end|>"
    assert enc.input_ids[first + sum(enc.response_mask) - 1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_embedded_scores_match_model_loss(embedded):
    model, tok = embedded
    for ex in load_examples("mbpp-train", limit=2):
        enc = encode_conversation(tok, ex.messages)
        ids = torch.tensor([enc.input_ids])
        response = torch.tensor([enc.response_mask])
        with torch.no_grad():
            nll = token_nll(model, ids, torch.ones_like(ids), response)
            loss = model(input_ids=ids, labels=ids.masked_fill(response == 0, -100)).loss
        n = int(response[0, 1:].sum())
        assert nll[response.bool()].sum().item() == pytest.approx(loss.item() * n, rel=1e-4)
