"""Chat templates: turn messages into token ids and mark which tokens are response tokens.

The convention, used everywhere in forgetless:

* The conversation is rendered with the tokenizer's chat template and cut into segments:
  each assistant response (its content and the end-of-turn special token that follows it) is a
  *response segment*; everything else (system, user turns, role headers) is a prompt segment.
* Each segment is tokenized on its own (``add_special_tokens=False``: the template already
  holds any BOS) and the ids are concatenated. The prompt segment therefore tokenizes exactly
  as it does at generation time, when the model is handed the prompt and
  ``add_generation_prompt=True``.
* ``response_mask[i] == 1`` marks token ``i`` as a response token: a token that is scored for
  masking and trained on.

A tokenizer without a chat template falls back to :data:`PLAIN_TEMPLATE` with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from forgetless.core.errors import ForgetlessError

logger = logging.getLogger(__name__)

# Used only when the tokenizer has no chat template. Documented in the README.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


class TemplateError(ForgetlessError, ValueError):
    """The chat template does not render a conversation the way forgetless needs."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    response_mask: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the documented plain one (with a warning)."""
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("tokenizer has no chat template; using forgetless's plain '### User/### Assistant' template")
        tokenizer.chat_template = PLAIN_TEMPLATE
    if tokenizer.eos_token is None:
        raise TemplateError("the tokenizer has no eos_token: responses would have no end marker")


def template_hash(tokenizer) -> str:
    """Hash of what decides tokenization: chat template, vocabulary size and special tokens."""
    ensure_chat_template(tokenizer)
    key = "\x00".join(
        [tokenizer.chat_template, str(len(tokenizer)), repr(sorted(tokenizer.all_special_tokens))]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def tokenizer_differences(a, b) -> list[str]:
    """What differs between two tokenizers that must give the same tokens: [] when none.

    Compared: the vocabulary (token -> id), the chat template, and the special tokens (the pad
    token aside: padding never enters a scored or trained token).
    """
    ensure_chat_template(a)
    ensure_chat_template(b)

    def specials(tok):
        return tok.bos_token, tok.eos_token, sorted(set(tok.all_special_tokens) - {tok.pad_token})

    checks = {"vocabulary": a.get_vocab() == b.get_vocab(), "chat template": a.chat_template == b.chat_template,
              "special tokens": specials(a) == specials(b)}
    return [name for name, same in checks.items() if not same]


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def response_char_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return the text and the [start, end) span of each response."""
    ensure_chat_template(tokenizer)
    text = render(tokenizer, messages)
    special = sorted(set(tokenizer.all_special_tokens), key=len, reverse=True)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:k], add_generation_prompt=True)
        if not text.startswith(prefix):
            raise TemplateError(
                f"the chat template renders turn {k}'s prompt differently inside the full conversation; "
                "cannot locate the response"
            )
        content = message["content"].strip()
        start = text.find(content, len(prefix))
        if start < 0:
            raise TemplateError(f"assistant turn {k} content not found in the rendered conversation")
        # Templates that strip content leave whitespace out; the response starts at its first
        # character, so the prompt keeps exactly what the generation prompt ends with.
        start = len(prefix) if text[len(prefix):start].strip() == "" else start
        end = start + len(text[start:].split(content, 1)[0]) + len(content)
        # Keep the response's own trailing whitespace where the template kept it too.
        raw = message["content"]
        tail = raw[len(raw.rstrip()):]
        if tail and text.startswith(tail, end):
            end += len(tail)
        # The end-of-turn marker is the special token right after the content (<|im_end|>,
        # <|eot_id|>, <end_of_turn>, eos): the model must learn to emit it.
        after = text[end:]
        marker = next((s for s in special if after.startswith(s)), None)
        if marker is not None:
            end += len(marker)
        spans.append((start, end))
    return text, spans


def encode_conversation(tokenizer, messages: list[dict[str, str]], max_length: int | None = None) -> Encoded:
    """Token ids and response mask of a conversation (see the module docstring).

    Over ``max_length`` tokens the sequence is cut from the right and ``truncated`` is set.
    """
    text, spans = response_char_spans(tokenizer, messages)
    input_ids: list[int] = []
    response_mask: list[int] = []
    cursor = 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, is_response in ((text[cursor:start], 0), (text[start:end], 1)):
            if piece:
                ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                input_ids.extend(ids)
                response_mask.extend([is_response] * len(ids))
        cursor = end
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, response_mask = input_ids[:max_length], response_mask[:max_length]
    return Encoded(input_ids=input_ids, response_mask=response_mask, truncated=truncated)


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt for generation: the template with ``add_generation_prompt=True``."""
    ensure_chat_template(tokenizer)
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
