"""Where the response starts and ends under each chat template."""

import pytest

from conftest import build_tokenizer
from forgetless.lm.templates import (PLAIN_TEMPLATE, TemplateError, encode_conversation, encode_prompt,
                                     ensure_chat_template)

MESSAGES = [
    {"role": "user", "content": "Write a python function to add two numbers."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
]

# Hand-written: the exact response text (content + end-of-turn marker) under each template.
EXPECTED_RESPONSE = {
    "chatml": "def add(a, b):\n    return a + b<|im_end|>",
    "llama3": "def add(a, b):\n    return a + b<|eot_id|>",
    "gemma": "def add(a, b):\n    return a + b<end_of_turn>",
}
EXPECTED_PROMPT_END = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>model\n",
}


def split(tok, enc):
    response = tok.decode([i for i, m in zip(enc.input_ids, enc.response_mask) if m])
    first = enc.response_mask.index(1)
    return tok.decode(enc.input_ids[:first]), response, enc.response_mask[first:]


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma"])
def test_response_span_is_content_plus_end_of_turn(template):
    tok = build_tokenizer(template)
    enc = encode_conversation(tok, MESSAGES)
    prompt, response, tail = split(tok, enc)
    assert response == EXPECTED_RESPONSE[template]
    assert prompt.endswith(EXPECTED_PROMPT_END[template])
    # One contiguous response block: after it only template trailer tokens (e.g. ChatML's "\n").
    n_resp = sum(enc.response_mask)
    assert tail[:n_resp] == [1] * n_resp and 1 not in tail[n_resp:]


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma"])
def test_prompt_tokens_equal_generation_prompt(template):
    tok = build_tokenizer(template)
    enc = encode_conversation(tok, MESSAGES)
    first = enc.response_mask.index(1)
    assert enc.input_ids[:first] == encode_prompt(tok, MESSAGES[:1])


def test_trailing_whitespace_kept_when_template_keeps_it():
    tok = build_tokenizer("chatml")
    messages = [MESSAGES[0], {"role": "assistant", "content": "def add(a, b):\n    return a + b\n"}]
    _, response, _ = split(tok, encode_conversation(tok, messages))
    assert response == "def add(a, b):\n    return a + b\n<|im_end|>"


def test_multi_turn_marks_every_assistant_turn():
    tok = build_tokenizer("chatml")
    messages = [MESSAGES[0], {"role": "assistant", "content": "print('hello')"},
                {"role": "user", "content": "add"}, {"role": "assistant", "content": "return a + b"}]
    enc = encode_conversation(tok, messages)
    blocks, prev = [], 0
    for i, m in enumerate(enc.response_mask):
        if m and not prev:
            blocks.append([])
        if m:
            blocks[-1].append(enc.input_ids[i])
        prev = m
    assert [tok.decode(b) for b in blocks] == ["print('hello')<|im_end|>", "return a + b<|im_end|>"]


def test_truncation_cuts_from_the_right_and_reports():
    tok = build_tokenizer("chatml")
    full = encode_conversation(tok, MESSAGES)
    cut = encode_conversation(tok, MESSAGES, max_length=len(full) - 3)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[: len(full) - 3]
    assert cut.response_mask == full.response_mask[: len(full) - 3]


def test_missing_chat_template_falls_back_to_plain(caplog):
    tok = build_tokenizer("chatml")
    tok.chat_template = None
    ensure_chat_template(tok)
    assert tok.chat_template == PLAIN_TEMPLATE
    _, response, _ = split(tok, encode_conversation(tok, MESSAGES))
    assert response == "def add(a, b):\n    return a + b<|im_end|>"
    assert "no chat template" in caplog.text


def test_template_that_drops_content_is_an_error():
    tok = build_tokenizer("chatml")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(TemplateError):
        encode_conversation(tok, MESSAGES)
