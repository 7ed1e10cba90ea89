"""Target gain without rewarding (or punishing) sharpening: held-out gold NLL split by kind.

The mean gold-token NLL of a held-out target set is dominated by its rare surprising tokens.
STM never trains on those (base ppl > τ), so one mean mixes what STM learns with what it masks
by design. Here each held-out response token is classed by the *base* model's perplexity:

* *kept kind*: base ``exp(nll) <= τ`` (the tokens STM would train on);
* *masked kind*: base ``exp(nll) > τ``;
and the tuned model's mean NLL is reported on each kind separately, with the base's value and
the paired change. Per item the value is the mean over its tokens of that kind (items without
any are left out of that kind); a task's score is the mean over items with a normal 95%
interval, the paired change tuned − base has a paired bootstrap interval. The base NLL is cached (key: base fingerprint,
token ids), so a tuned model costs one forward per item.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from forgetless.core.masking import above_tau
from forgetless.retention.basecache import base_fingerprint, base_view, cache_path, ids_hash, load_cached, save_cached
from forgetless.lm.scoring import score_encoded

logger = logging.getLogger(__name__)


def split_by_kind(base_nll: torch.Tensor, tuned_nll: torch.Tensor, tau: float) -> dict[str, float]:
    """Means of one item's scored tokens ``(T,)`` by kind: ``{kind}_{base|tuned}`` and counts."""
    kept = ~above_tau(base_nll, tau)
    out: dict[str, float] = {}
    for kind, sel in (("kept", kept), ("masked", ~kept), ("all", torch.ones_like(kept))):
        n = int(sel.sum())
        out[f"n_{kind}"] = n
        out[f"{kind}_base"] = float(base_nll[sel].double().mean()) if n else math.nan
        out[f"{kind}_tuned"] = float(tuned_nll[sel].double().mean()) if n else math.nan
    return out


def response_nll(model, encoded: list, pad_id: int, batch_tokens: int = 4096) -> list[torch.Tensor]:
    """NLL of each sequence's scored response tokens, in order (the score stage's own scoring)."""
    nlls = score_encoded(model, encoded, pad_id, batch_tokens, description="held-out NLL")
    return [torch.from_numpy(n[~np.isnan(n)]) for n in nlls]


def evaluate_heldout(model, tokenizer, base_model=None, source: str = "mbpp-validation", limit: int | None = None,
                     cache_dir=None, out_dir=None, tau: float = 2.5, max_length: int = 1024,
                     base_id: str | None = None) -> dict[str, dict]:
    """Held-out target NLL by kind: records ``heldout:<source>:{kept,masked,all}`` (metric nll).

    ``settings`` holds the base value, the paired change (tuned − base) with its interval,
    and the fraction of tokens of the masked kind.
    """
    from forgetless.lm.data import load_examples
    from forgetless.lm.templates import encode_conversation
    from forgetless.retention.records import make_record, write_task
    from forgetless.core.intervals import mean_difference, mean_interval

    examples = load_examples(source, limit)
    encoded = [encode_conversation(tokenizer, ex.messages, max_length) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    key = {"kind": "heldout", "base": base_fingerprint(model, base_model, base_id),
           "seqs": ids_hash([e.input_ids for e in encoded]), "masks": ids_hash([e.response_mask for e in encoded])}
    path = cache_path(cache_dir, "heldout", key) if cache_dir is not None else None
    cached = load_cached(path, key) if path is not None else None
    was_training = model.training
    model.eval()
    if cached is None:
        with base_view(model, base_model) as base:
            cached = {"nll": response_nll(base, encoded, pad)}
        if path is not None:
            save_cached(path, key, cached)
    tuned = response_nll(model, encoded, pad)
    model.train(was_training)
    rows = [{"id": str(ex.id), **split_by_kind(b, t, tau)} for ex, b, t in zip(examples, cached["nll"], tuned)]
    n_tokens = sum(r["n_all"] for r in rows)
    records = {}
    for kind in ("kept", "masked", "all"):
        name = f"heldout:{source}:{kind}"
        have = [r for r in rows if r[f"n_{kind}"]]
        change = mean_difference([r[f"{kind}_tuned"] - r[f"{kind}_base"] for r in have])
        settings = {"source": source, "limit": limit, "tau": tau, "kind": kind, "base": key["base"],
                    "base_score": mean_interval([r[f"{kind}_base"] for r in have])[0],
                    "change": change["mean"] if have else math.nan,
                    "change_ci95": change["ci95"] or [math.nan, math.nan],
                    "masked_fraction": sum(r["n_masked"] for r in rows) / max(n_tokens, 1),
                    "tokens": sum(r[f"n_{kind}"] for r in rows)}
        records[name] = make_record(name, "nll", [r[f"{kind}_tuned"] for r in have],
                                    higher_is_better=False, settings=settings)
        if out_dir is not None:
            write_task(out_dir, records[name], [{**r, "score": r[f"{kind}_tuned"]} for r in have])
    return records
