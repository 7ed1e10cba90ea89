"""Drift from the base model on non-target inputs: how far the next-token distributions moved.

For each non-target prompt the base model's greedy answer is generated once (cached, and
shared with the behaviour measure: :mod:`.answers`). On the
sequence ``prompt + base answer`` every position ``i`` (predicting token ``i+1``) gives a base
distribution ``p`` and a tuned distribution ``q``; per position we measure

* ``KL(p‖q)`` (forward: mass the base put where the tuned model no longer does) and ``KL(q‖p)``;
* the entropy change ``H(q) - H(p)`` (negative: the tuned model is sharper);
* top-1 agreement (the tuned argmax is the base argmax);
* on answer positions, the change of the NLL of the base's own answer token.
A position is a *prompt* position when the token it predicts is a prompt token, an *answer*
position otherwise. Each item's value is the mean over its positions; a task's score is the mean
over items with a normal 95% interval. An unchanged model scores exactly 0 KL.

The base distributions are cached as their top-k (ids, log-probs), entropy, argmax and target
NLL, so a tuned model costs one forward per item. KL is computed over the partition {each of
the base's top-k tokens, all other tokens lumped together}: by the data-processing inequality
this is a lower bound on the exact KL, equal to it when the tail carries no mass (k=128 on a
49k vocabulary loses well under 1% here; see tests).
"""

from __future__ import annotations

import logging
import math

import torch

from forgetless.core.logits import chunk_rows, head_logits, head_rows, split_causal_lm
from forgetless.lm import distributed
from forgetless.lm.batching import length_buckets, right_pad
from forgetless.retention.answers import base_answers, with_stop
from forgetless.retention.basecache import base_view, cache_path, load_cached, save_cached

logger = logging.getLogger(__name__)
_TINY = 1e-30


def coarse_kl(logp_top: torch.Tensor, logq_top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p‖q), KL(q‖p)) per row over {k named tokens, the rest lumped}: ``(N, k) -> (N,)``.

    ``logp_top``/``logq_top`` are both distributions' log-probs at the same k tokens.
    """
    logp, logq = logp_top.double(), logq_top.double()
    p, q = logp.exp(), logq.exp()
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - q.sum(-1)).clamp_min(0)
    kl_pq = (p * (logp - logq)).sum(-1) + torch.xlogy(p_tail, p_tail) - torch.xlogy(p_tail, q_tail.clamp_min(_TINY))
    kl_qp = (q * (logq - logp)).sum(-1) + torch.xlogy(q_tail, q_tail) - torch.xlogy(q_tail, p_tail.clamp_min(_TINY))
    return kl_pq.clamp_min(0), kl_qp.clamp_min(0)


def exact_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row from full logits ``(N, V) -> (N,)`` (the reference coarse_kl bounds)."""
    logp = torch.log_softmax(logits_p.double(), -1)
    logq = torch.log_softmax(logits_q.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def row_stats(head, hidden: torch.Tensor, targets: torch.Tensor, softcap=None, top_k: int = 128,
              ref_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Next-token statistics of hidden rows ``(N, H)``: entropy, argmax, NLL of ``targets``,
    and log-probs at ``ref_ids (N, k)`` when given, else the top-k ids and log-probs."""
    out: dict[str, list] = {"entropy": [], "argmax": [], "nll": [], "top_ids": [], "top_logp": []}
    step = chunk_rows(head_rows(head))
    for s in range(0, hidden.shape[0], step):
        logp = torch.log_softmax(head_logits(head, hidden[s : s + step], softcap), -1)  # (n, V)
        out["entropy"].append(-(logp.exp() * logp).sum(-1))
        out["argmax"].append(logp.argmax(-1))
        out["nll"].append(-logp.gather(1, targets[s : s + step, None]).squeeze(1))
        if ref_ids is None:
            top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            out["top_ids"].append(top.indices)
            out["top_logp"].append(top.values)
        else:
            out["top_logp"].append(logp.gather(1, ref_ids[s : s + step]))
    return {k: torch.cat(v).cpu() for k, v in out.items() if v}


@torch.no_grad()
def sequence_stats(model, seqs: list[list[int]], pad_id: int, top_k: int = 128,
                   ref_ids: list[torch.Tensor] | None = None, batch_tokens: int = 4096) -> list[dict]:
    """:func:`row_stats` of positions ``0..T-2`` of each sequence (one decoder pass per batch)."""
    decoder, head, softcap = split_causal_lm(model)
    device = next(model.parameters()).device
    lengths = [len(s) for s in seqs]
    results: dict[int, dict] = {}
    for batch in distributed.share(length_buckets(lengths, batch_tokens), lengths):
        ids, attn = right_pad([seqs[i] for i in batch], pad_id)
        hidden = decoder(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
        rows = torch.cat([hidden[b, : len(seqs[i]) - 1] for b, i in enumerate(batch)])
        targets = torch.cat([ids[b, 1 : len(seqs[i])] for b, i in enumerate(batch)]).to(device)
        ref = torch.cat([ref_ids[i] for i in batch]).to(device) if ref_ids is not None else None
        stats = row_stats(head, rows, targets, softcap, top_k, ref)
        offset = 0
        for i in batch:
            n = len(seqs[i]) - 1
            results[i] = {k: v[offset : offset + n].clone() for k, v in stats.items()}  # own storage: gathered alone
            offset += n
    return distributed.gather(results, len(seqs))


def item_drift(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], n_prompt: int) -> dict[str, float]:
    """Per-item means of the drift quantities (see the module docstring). Row i predicts token i+1."""
    kl_bt, kl_tb = coarse_kl(base["top_logp"], tuned["top_logp"])
    answer = torch.arange(kl_bt.shape[0]) >= n_prompt - 1
    mean = lambda x, m=None: float(x[m].double().mean()) if m is None or m.any() else math.nan  # noqa: E731
    return {
        "kl_base_tuned": mean(kl_bt),
        "kl_tuned_base": mean(kl_tb),
        "kl_base_tuned_prompt": mean(kl_bt, ~answer),
        "kl_base_tuned_answer": mean(kl_bt, answer),
        "entropy_change": mean(tuned["entropy"] - base["entropy"]),
        "top1_agreement": mean((tuned["argmax"] == base["argmax"]).double()),
        "answer_nll_change": mean(tuned["nll"] - base["nll"], answer),
        "n_positions": int(kl_bt.shape[0]),
        "n_answer": int(answer.sum()),
    }


def base_reference(model, tokenizer, base_model, source: str, limit: int | None, cache_dir,
                   max_new_tokens: int = 128, top_k: int = 128, base_id: str | None = None) -> dict:
    """Prompts, base answers (shared with the behaviour measure) and base statistics, cached."""
    answers = base_answers(model, tokenizer, base_model, source, limit, cache_dir, max_new_tokens, base_id)
    key = {**answers["key"], "kind": "drift", "top_k": top_k}
    path = cache_path(cache_dir, "drift", key) if cache_dir is not None else None
    cached = load_cached(path, key) if path is not None else None
    if cached is not None:
        logger.info("drift %s: base statistics from cache %s", source, path)
        return cached
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = [p + with_stop(a, s) for p, a, s in zip(answers["prompts"], answers["answers"], answers["stops"])]
    was_training = model.training
    model.eval()
    with base_view(model, base_model) as base:
        stats = sequence_stats(base, seqs, pad, top_k)
    model.train(was_training)
    payload = {"ids": answers["ids"], "seqs": seqs, "n_prompt": [len(p) for p in answers["prompts"]], "stats": stats}
    if path is not None:
        save_cached(path, key, payload)
    return {**payload, "key": key}


DRIFT_METRICS = {  # metric -> higher_is_better; each gets its own record "drift:<source>[:metric]"
    "kl_base_tuned": False,
    "kl_tuned_base": False,
    "top1_agreement": True,
    "answer_nll_change": False,
}


def evaluate_drift(model, tokenizer, base_model=None, source: str = "gsm8k", limit: int | None = 25,
                   cache_dir=None, out_dir=None, max_new_tokens: int = 128, top_k: int = 128,
                   base_id: str | None = None) -> dict[str, dict]:
    """Drift of ``model`` from its base on the prompts of ``source`` (one forward per item).

    ``base_model=None`` uses the PEFT adapter-disabled view of ``model``. ``base_id`` names the
    base for the cache key (e.g. ``modeling.model_fingerprint(name)``); without it a digest of
    the base weights is used. Returns records ``drift:<source>`` (metric kl_base_tuned) and
    ``drift:<source>:<metric>`` for the others; entropy change and the prompt/answer split of
    KL are in the main record's ``settings["details"]``.
    """
    from forgetless.retention.records import make_record, write_task
    from forgetless.core.intervals import mean_interval

    ref = base_reference(model, tokenizer, base_model, source, limit, cache_dir, max_new_tokens, top_k, base_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    tuned = sequence_stats(model, ref["seqs"], pad, ref_ids=[s["top_ids"] for s in ref["stats"]])
    model.train(was_training)
    rows = [{"id": i, **item_drift(b, t, n)} for i, b, t, n in zip(ref["ids"], ref["stats"], tuned, ref["n_prompt"])]
    details = {}
    for name in ("entropy_change", "kl_base_tuned_prompt", "kl_base_tuned_answer"):
        mean, lo, hi = mean_interval([r[name] for r in rows if not math.isnan(r[name])])
        details[name] = {"score": mean, "ci95": [lo, hi]}
    settings = {"source": source, "limit": limit, "max_new_tokens": max_new_tokens, "top_k": top_k,
                "base": ref["key"]["base"], "positions": sum(r["n_positions"] for r in rows),
                "answer_tokens": sum(r["n_answer"] for r in rows)}
    records = {}
    for metric, higher in DRIFT_METRICS.items():
        name = f"drift:{source}" if metric == "kl_base_tuned" else f"drift:{source}:{metric}"
        extra = {"details": details} if metric == "kl_base_tuned" else {}
        values = [r[metric] for r in rows if not math.isnan(r[metric])]
        records[name] = make_record(name, metric, values, higher_is_better=higher, settings={**settings, **extra})
        if out_dir is not None:
            write_task(out_dir, records[name], [{**r, "score": r[metric]} for r in rows])
    return records
