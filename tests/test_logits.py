"""The alignment convention: nll[i] scores token i, and matches the model's own loss."""

import math

import pytest
import torch

from conftest import build_model, build_tokenizer
from forgetless.core.logits import rows_nll, token_nll
from forgetless.lm.templates import encode_conversation

MESSAGES = [
    {"role": "user", "content": "Write a python function to add two numbers."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
]


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma"])
def test_response_nll_sum_equals_model_loss(template):
    tok = build_tokenizer(template)
    model = build_model(len(tok))
    enc = encode_conversation(tok, MESSAGES)
    ids = torch.tensor([enc.input_ids])
    response = torch.tensor([enc.response_mask])
    nll = token_nll(model, ids, torch.ones_like(ids), response)
    labels = ids.masked_fill(response == 0, -100)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss  # mean over shifted response tokens
    n = int(response[0, 1:].sum())
    scored = nll[response.bool()]
    assert torch.isnan(nll[~response.bool()]).all()
    assert scored.numel() == n and not torch.isnan(scored).any()
    assert scored.sum().item() == pytest.approx(loss.item() * n, rel=1e-5)


def test_each_position_scores_its_own_token():
    """Hand-built logits: the decoder's hidden state at i-1 decides the score stored at i."""
    torch.manual_seed(0)
    model = build_model(16)
    ids = torch.tensor([[3, 5, 7, 2]])
    nll = token_nll(model, ids, torch.ones_like(ids), torch.ones_like(ids))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    expected = [math.nan] + [-torch.log_softmax(logits[i - 1], -1)[ids[0, i]].item() for i in range(1, 4)]
    assert math.isnan(nll[0, 0])
    assert nll[0, 1:].tolist() == pytest.approx(expected[1:], rel=1e-5)


def test_padding_does_not_change_scores():
    model = build_model(16)
    ids = torch.tensor([[3, 5, 7, 2, 0, 0], [4, 4, 9, 1, 6, 8]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    both = token_nll(model, ids, attention, torch.ones_like(ids))
    alone = token_nll(model, ids[:1, :4], attention[:1, :4], torch.ones_like(ids[:1, :4]))
    assert both[0, 1:4].tolist() == pytest.approx(alone[0, 1:].tolist(), rel=1e-5)
    assert torch.isnan(both[0, 4:]).all()


def test_rows_nll_by_hand():
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    hidden = torch.tensor([[2.0, 0.0]])  # logits (2, 0, 0)
    got = rows_nll(head, hidden, torch.tensor([1]))
    assert got.item() == pytest.approx(math.log(math.exp(2) + 2) - 0.0)
    capped = rows_nll(head, hidden, torch.tensor([0]), softcap=1.0)  # logits tanh(2), 0, 0
    t = math.tanh(2.0)
    assert capped.item() == pytest.approx(math.log(math.exp(t) + 2) - t)


def test_gradients_flow_only_through_scored_rows():
    """Tokens 2 and 3 are scored from hidden rows 1 and 2; rows 0 and 3 never meet the LM head."""
    model = build_model(16)
    hidden = []

    def keep_final_hidden(module, args, out):  # the decoder's output, which token_nll indexes
        out.last_hidden_state.retain_grad()
        hidden.append(out.last_hidden_state)

    model.model.register_forward_hook(keep_final_hidden)
    ids = torch.tensor([[3, 5, 7, 2]])
    nll = token_nll(model, ids, torch.ones_like(ids), torch.tensor([[0, 0, 1, 1]]))
    nll[0, 2:].sum().backward()
    grad = hidden[0].grad[0]  # (T, H): d loss / d final hidden state
    assert torch.count_nonzero(grad[[0, 3]]) == 0  # exactly zero, not merely small
    assert (grad[[1, 2]].abs().sum(dim=-1) > 0).all()
    # The LM head's gradient is that of the two scored rows alone: sum_r (softmax_r - onehot_r) h_r^T.
    with torch.no_grad():
        rows = hidden[0][0, [1, 2]]
        probs = torch.softmax(model.lm_head(rows), dim=-1)
        probs[0, 7] -= 1
        probs[1, 2] -= 1
    torch.testing.assert_close(model.lm_head.weight.grad, probs.T @ rows, rtol=1e-5, atol=1e-6)
