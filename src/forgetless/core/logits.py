"""Per-token log-probabilities without materialising batch x seq x vocab logits.

Alignment convention (the one place it is written down): the score of token ``i`` is
``nll[i] = -log p(input_ids[i] | input_ids[:i])``, computed from the hidden state at position
``i - 1`` and *stored at position* ``i``. Position 0 has no context and is never scored (NaN).

The decoder runs once; the LM head runs only on the rows that are scored, in chunks, so memory
is ``rows_per_chunk x vocab`` instead of ``batch x seq x vocab`` and masked or prompt positions
cost no LM-head FLOPs at all.
"""

from __future__ import annotations

import torch

# Rows of fp32 logits per LM-head chunk are sized to about this many bytes.
_CHUNK_BYTES = 1 << 28


def split_causal_lm(model):
    """(decoder, lm_head, final_logit_softcap) of a causal LM, unwrapping PEFT models."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(inner, inner.base_model_prefix)
    head = inner.get_output_embeddings()
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    return decoder, head, softcap


def head_logits(head, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 logits of hidden rows ``(N, H) -> (N, V)``, with Gemma-style soft-capping if set."""
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def chunk_rows(vocab_size: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * max(vocab_size, 1)))


def head_rows(head) -> int:
    """Vocabulary rows of an LM head, read from the module: under ZeRO-3 / FSDP ``head.weight`` may be a ``[0]``
    partition or a shard outside the forward, but ``out_features`` stays the full size."""
    return getattr(head, "out_features", None) or head.weight.shape[0]


def target_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log softmax(logits)[target]`` per row: ``(N, V), (N,) -> (N,)``."""
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None]).squeeze(1)


def rows_nll(head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """``-log p(target)`` for each hidden row: ``(N, H), (N,) -> (N,)`` fp32, chunked over N."""
    out = []
    step = chunk_rows(head_rows(head))
    for s in range(0, hidden.shape[0], step):
        logits = head_logits(head, hidden[s : s + step], softcap)  # (n, V)
        out.append(target_nll(logits, targets[s : s + step]))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, score_mask: torch.Tensor,
              position_ids: torch.Tensor | None = None, past_key_values=None) -> torch.Tensor:
    """NLL of each token where ``score_mask`` is set, NaN elsewhere: ``(B, T) -> (B, T)`` fp32.

    Position 0 is never scored. Padding-free rows (:mod:`forgetless.core.packing`) pass ``attention_mask=None`` and
    ``position_ids`` restarting at 0: a token at position 0 starts a sequence and is not scored either (the row
    before it belongs to the previous sequence). ``past_key_values``: the KV cache of ``P`` tokens every row
    continues (a shared prompt prefix, :class:`forgetless.lm.scoring.SharedPrefix`), batch size ``B``; the rows
    are the tokens after it (positions ``P..``), ``attention_mask`` covers those only, and position 0 here is
    token ``P``, still not scored. Differentiable when called with grad enabled.
    """
    decoder, head, softcap = split_causal_lm(model)
    if past_key_values is None:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state  # (B, T, H)
    else:
        seen = past_key_values.get_seq_length()
        full = attention_mask if attention_mask is None else torch.cat(
            [attention_mask.new_ones(attention_mask.shape[0], seen), attention_mask], dim=1)
        hidden = decoder(input_ids=input_ids, attention_mask=full, past_key_values=past_key_values,
                         use_cache=True).last_hidden_state
    predict = score_mask[:, 1:].bool()  # token i predicted from row i-1
    if attention_mask is not None:
        predict = predict & attention_mask[:, 1:].bool()
    if position_ids is not None:
        predict = predict & (position_ids[:, 1:] > 0)
    rows = hidden[:, :-1][predict]  # (N, H)
    targets = input_ids[:, 1:][predict]  # (N,)
    nll = rows_nll(head, rows, targets, softcap)
    out = torch.full(input_ids.shape, float("nan"), dtype=torch.float32, device=input_ids.device)
    shifted = out[:, 1:].clone()
    shifted[predict] = nll
    return torch.cat([out[:, :1], shifted], dim=1)
