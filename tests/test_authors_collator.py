"""forgetless's STM labels against the authors' collator rule, token by token.

The authors (appier-research/robust-llm-finetunes) build labels in ``collate_fn.py``
(``CustomizedDataCollatorForChatML``, ``apply="highest"``, the default that ``train_with_mask.py`` uses):

* the whole conversation is rendered with the chat template and tokenized at once
  (``add_special_tokens=False``);
* the response starts after as many tokens as the prompt (every message but the last, rendered with
  ``add_generation_prompt=True``) tokenizes to: every token from there to the end is a label;
* with ``threshold > 0``, a label becomes -100 where the stored per-token perplexity is above the
  threshold. ``generate_stm_training_data.py`` stores ``ppl[i] = exp(nll of token i)`` under the base
  model, with a placeholder 10 at position 0.

It is re-implemented here in plain Python from that description (no forgetless import), on a
conversation with hand-set perplexities, and compared with forgetless's labels from
:func:`forgetless.core.masking.stm_labels` and from the mask stage. The only difference is the
newline the template writes after the end-of-turn token (ChatML, Gemma): the authors' rule trains
everything after the prompt, forgetless's response ends at the end-of-turn token.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import build_tokenizer

MESSAGES = [{"role": "user", "content": "Write a python function to add two numbers."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]
# The response's 13 tokens under every test tokenizer: def| add|(|a|,| b|):|\n   | return| a| +| b|<end of turn>.
RESPONSE_PPL = [1.3, 4.0, 1.1, 2.6, 1.05, 1.2, 1.4, 3.5, 1.1, 1.6, 2.2, 1.01, 1.7]
MASKED_OFFSETS = {1, 3, 7}  # ppl 4.0, 2.6, 3.5: the ones above tau = 2.5
PROMPT_PPL = 30.0  # prompt tokens: never labels on either side, whatever their perplexity
TAU = 2.5


def authors_tokens(tokenizer, messages) -> tuple[list[int], int]:
    """(input_ids of the whole rendered conversation, index where their labels start)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return (tokenizer(text, add_special_tokens=False)["input_ids"],
            len(tokenizer(prompt, add_special_tokens=False)["input_ids"]))


def authors_labels(tokenizer, messages, ppl, threshold=TAU):
    """(input_ids, labels) by the authors' rule (see the module docstring)."""
    input_ids, start = authors_tokens(tokenizer, messages)
    labels = [-100] * start + input_ids[start:]
    if threshold > 0:
        labels = [-100 if p > threshold else y for y, p in zip(labels, ppl)]
    return input_ids, labels


def authors_ppl(n_tokens: int, start: int, newline_ppl: float | None) -> list[float]:
    """Per-token perplexities as the authors store them: 10 at position 0, then one per token."""
    ppl = [10.0] + [PROMPT_PPL] * (start - 1) + RESPONSE_PPL + ([newline_ppl] if newline_ppl is not None else [])
    assert len(ppl) == n_tokens
    return ppl


def forgetless_labels(tokenizer, ppl: list[float], tmp_path) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels from stm_labels, labels from the mask stage) for MESSAGES."""
    from forgetless.core.masking import stm_labels
    from forgetless.lm import artifacts
    from forgetless.lm.data import Example
    from forgetless.mask.stage import MaskConfig, run_mask
    from forgetless.train.collate import build_sft_table

    (row,) = build_sft_table([Example(id="0", messages=MESSAGES)], tokenizer)
    ids, response = row["input_ids"], row["response_mask"]
    # Scores as `forgetless score` writes them: log ppl on response tokens, NaN elsewhere and at 0.
    nll = [math.log(p) if r and i > 0 else math.nan for i, (p, r) in enumerate(zip(ppl, response))]
    from_loop = stm_labels(torch.tensor([row["labels"]]), torch.tensor([nll], dtype=torch.float64), TAU)[0].tolist()
    scores = tmp_path / "scores"
    artifacts.write_parquet(scores / "scores.parquet", pa.table({
        "id": ["0"], "input_ids": [ids], "response_mask": [response], "nll": [nll], "truncated": [False]}))
    artifacts.write_manifest(scores, {"stage": "score", "fixture": True}, {})
    out = run_mask(MaskConfig(scores=str(scores), policy="threshold", tau=TAU, out_dir=str(tmp_path / "mask")))
    from_stage = pq.read_table(out / "data.parquet").column("labels").to_pylist()[0]
    return ids, from_loop, from_stage


@pytest.mark.parametrize("template, newline_after_turn", [("chatml", True), ("gemma", True), ("llama3", False)])
def test_stm_labels_equal_the_authors_but_for_the_newline_after_end_of_turn(template, newline_after_turn, tmp_path):
    tok = build_tokenizer(template)
    ids, start = authors_tokens(tok, MESSAGES)
    ppl = authors_ppl(len(ids), start, newline_ppl=1.02 if newline_after_turn else None)

    theirs_ids, theirs = authors_labels(tok, MESSAGES, ppl)
    ours_ids, ours, ours_stage = forgetless_labels(tok, ppl, tmp_path)

    assert ours_ids == theirs_ids  # the same tokens: whole-text and per-segment tokenization agree here
    assert ours == ours_stage  # the training-loop helper and the mask stage agree
    end = start + len(RESPONSE_PPL)  # one past the end-of-turn token
    masked = {start + k for k in MASKED_OFFSETS}
    for i in range(end):  # every prompt and response token: the same label
        assert ours[i] == theirs[i], i
        assert ours[i] == (-100 if i < start or i in masked else ids[i]), i
    assert tok.convert_ids_to_tokens(ids[end - 1]) == tok.eos_token  # the end-of-turn token: trained on both sides
    if newline_after_turn:  # the one difference: the template's "\n" after the end-of-turn token
        assert len(ids) == end + 1 and tok.decode([ids[end]]) == "\n"
        assert theirs[end] == ids[end] and ours[end] == -100
    else:
        assert len(ids) == end


def test_a_newline_above_tau_is_masked_by_the_authors_too(tmp_path):
    tok = build_tokenizer("chatml")
    ids, start = authors_tokens(tok, MESSAGES)
    ppl = authors_ppl(len(ids), start, newline_ppl=3.0)
    _, theirs = authors_labels(tok, MESSAGES, ppl)
    _, ours, _ = forgetless_labels(tok, ppl, tmp_path)
    assert ours == theirs
