"""Scoring speed: forgetless padded and padding-free vs a plain forward (padded and packed) vs the batch-1 reference.

    .venv/bin/python benchmarks/bench_score.py [--examples 8 24 96] [--repeats 3] [--batch-tokens 4096]

Side by side in one process, same model (the embedded SmolLM2-135M-Instruct), same examples (the first N of
mbpp-train), interleaved so that machine load hits every method alike; times are medians over repeats:
  forgetless          the default: length buckets with <= 5% padding, the prompt prefix every example shares run once
                      (its KV cache continued by each batch), LM head only on response rows (chunked)
  forgetless-noprefix the same buckets without the shared prefix (what the prefix buys)
  forgetless-packed   the same buckets laid end to end in one row (``score.padding_free``, position ids restarting:
                      under sdpa it falls back to padded batches, this column shows why)
  plain               ``model(...).logits`` on right-padded batches filling the token budget (as one would batch)
  plain-packed        the same batches laid end to end in one row through ``model(...).logits``
  reference           one example at a time, full-vocabulary fp32 log_softmax, gather (the authors' way)
Before timing, every method's per-token NLLs are checked against the reference (max relative ppl difference).
Then where forgetless's time goes: the decoder, the LM head (response rows only) and the log-softmax + gather,
timed apart on the padded batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def setup(n_examples: int):
    from forgetless.lm.data import load_examples
    from forgetless.lm.modeling import load_model_and_tokenizer
    from forgetless.lm.templates import encode_conversation

    model, tok = load_model_and_tokenizer("embedded", device="cpu")
    encoded = [encode_conversation(tok, ex.messages, 1024) for ex in load_examples("mbpp-train", limit=n_examples)]
    return model, tok, encoded


def response_ppl(nlls, encoded) -> torch.Tensor:
    """exp(NLL) of every response token after position 0, in example order."""
    return torch.cat([torch.from_numpy(n[1:][torch.tensor(e.response_mask[1:], dtype=torch.bool).numpy()])
                      .double().exp()
                      for n, e in zip(nlls, encoded)])


def run_forgetless(model, tok, encoded, batch_tokens):
    from forgetless.lm.scoring import score_encoded

    return score_encoded(model, encoded, tok.pad_token_id, batch_tokens, shared=False)


def run_layout(model, tok, encoded, batch_tokens, padding_free=False):
    """forgetless's buckets without the shared prefix, padded or packed (score_batch itself: no fallback)."""
    from forgetless.lm.scoring import score_batch, score_buckets

    nll = {}
    for batch in score_buckets([len(e) for e in encoded], batch_tokens):
        nll.update(score_batch(model, encoded, batch, tok.pad_token_id, padding_free=padding_free))
    return [nll[i] for i in range(len(encoded))]


@torch.no_grad()
def run_plain(model, tok, encoded, batch_tokens, packed=False):
    from forgetless.lm.batching import length_buckets
    from forgetless.lm.scoring import flat_batch, pad_batch

    for batch in length_buckets([len(e) for e in encoded], batch_tokens):
        chosen = [encoded[i] for i in batch]
        if packed:
            ids, positions, _ = flat_batch(chosen)
            model(input_ids=ids, position_ids=positions)
        else:
            ids, attention, _ = pad_batch(chosen, tok.pad_token_id)
            model(input_ids=ids, attention_mask=attention)


@torch.no_grad()
def run_reference(model, tok, encoded, batch_tokens):
    out = []
    for e in encoded:
        ids = torch.tensor([e.input_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]  # (T, V)
        nll = torch.full((len(e),), float("nan"))
        nll[1:] = -logp[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
        nll[~torch.tensor(e.response_mask, dtype=torch.bool)] = float("nan")
        out.append(nll.numpy())
    return out


METHODS = {
    "forgetless": run_forgetless,
    "forgetless-noprefix": run_layout,
    "forgetless-packed": lambda m, t, e, b: run_layout(m, t, e, b, padding_free=True),
    "plain": run_plain,
    "plain-packed": lambda m, t, e, b: run_plain(m, t, e, b, packed=True),
    "reference": run_reference,
}


@torch.no_grad()
def breakdown(model, tok, encoded, batch_tokens) -> dict[str, float]:
    """Seconds of the default path in the decoder (the shared prefix's once, then each batch's rows continuing its
    cache), the LM head on response rows, and log-softmax + gather."""
    from forgetless.core.logits import chunk_rows, head_logits, split_causal_lm, target_nll
    from forgetless.lm.scoring import SharedPrefix, pad_batch, score_buckets
    from forgetless.lm.templates import Encoded

    decoder, head, softcap = split_causal_lm(model)
    prefix = SharedPrefix()
    spent = {"decoder": 0.0, "lm_head": 0.0, "log_softmax": 0.0}
    for batch in score_buckets([len(e) for e in encoded], batch_tokens):
        t0 = time.perf_counter()
        skip, cache = prefix.cache_for(model, [encoded[i] for i in batch])
        ids, attention, response = pad_batch([Encoded(encoded[i].input_ids[skip:], encoded[i].response_mask[skip:])
                                              for i in batch], tok.pad_token_id)
        full = torch.cat([attention.new_ones(len(batch), skip), attention], dim=1)
        hidden = decoder(input_ids=ids, attention_mask=full, past_key_values=cache,
                         use_cache=cache is not None).last_hidden_state
        t1 = time.perf_counter()
        predict = response[:, 1:].bool() & attention[:, 1:].bool()
        rows, targets = hidden[:, :-1][predict], ids[:, 1:][predict]
        step = chunk_rows(head.out_features)
        for start in range(0, len(rows), step):
            t2 = time.perf_counter()
            logits = head_logits(head, rows[start:start + step], softcap)
            t3 = time.perf_counter()
            target_nll(logits, targets[start:start + step])
            t4 = time.perf_counter()
            spent["lm_head"] += t3 - t2
            spent["log_softmax"] += t4 - t3
        spent["decoder"] += t1 - t0
    return spent


def layout(encoded, batch_tokens) -> dict:
    """What the default path computes: batches, padding share, tokens the shared prefix saves."""
    from forgetless.lm.scoring import common_prefix, prefix_limit, score_buckets

    batches = score_buckets([len(e) for e in encoded], batch_tokens)
    padded = sum(len(b) * len(encoded[b[0]]) for b in batches)
    shared = common_prefix([e.input_ids for e in encoded], [prefix_limit(e) for e in encoded])
    return {"batches": len(batches), "padding_share": 1 - sum(len(e) for e in encoded) / padded,
            "shared_prefix_tokens": shared,
            "prefix_share_of_tokens": shared * (len(encoded) - 1) / sum(len(e) for e in encoded)}


def bench(n_examples: int, repeats: int, batch_tokens: int) -> dict:
    model, tok, encoded = setup(n_examples)
    tokens = sum(len(e) for e in encoded)
    reference = response_ppl(run_reference(model, tok, encoded, batch_tokens), encoded)
    diffs = {}
    for name in ("forgetless", "forgetless-noprefix", "forgetless-packed"):
        ppl = response_ppl(METHODS[name](model, tok, encoded, batch_tokens), encoded)
        diffs[name] = (ppl - reference).abs().div(reference).max().item()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for name, fn in METHODS.items():
            start = time.perf_counter()
            fn(model, tok, encoded, batch_tokens)
            times[name].append(time.perf_counter() - start)
    med = {m: statistics.median(t) for m, t in times.items()}
    parts = breakdown(model, tok, encoded, batch_tokens)
    return {"examples": n_examples, "tokens": tokens, "response_tokens": sum(sum(e.response_mask) for e in encoded),
            "batch_tokens": batch_tokens, "threads": torch.get_num_threads(), "repeats": repeats,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "max_rel_ppl_diff_vs_reference": diffs, "seconds": med,
            "tokens_per_s": {m: tokens / t for m, t in med.items()},
            "speed_vs_reference": {m: med["reference"] / t for m, t in med.items()},
            "forgetless_vs_plain": {"padded": med["plain"] / med["forgetless"],
                                    "packed": med["plain-packed"] / med["forgetless"],
                                    "best": min(med["plain"], med["plain-packed"]) / med["forgetless"]},
            "layout": layout(encoded, batch_tokens),
            "share_of_time": {k: v / sum(parts.values()) for k, v in parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, nargs="+", default=[8, 24, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--out", default="benchmarks/results/bench_score.json")
    args = parser.parse_args()
    results = []
    for n in args.examples:
        r = bench(n, args.repeats, args.batch_tokens)
        results.append(r)
        print(f"\n{n} examples, {r['tokens']} tokens ({r['attn_implementation']} attention, {r['threads']} threads); "
              f"max relative ppl difference vs reference: "
              + ", ".join(f"{k} {v:.1e}" for k, v in r["max_rel_ppl_diff_vs_reference"].items()))
        print(f"{'method':<20}{'seconds':>9}{'tokens/s':>10}{'vs reference':>14}")
        for m in METHODS:
            print(f"{m:<20}{r['seconds'][m]:>9.2f}{r['tokens_per_s'][m]:>10.0f}{r['speed_vs_reference'][m]:>13.2f}x")
        print("forgetless vs plain forward: padded {padded:.2f}x, packed {packed:.2f}x, "
              "the faster of the two {best:.2f}x".format(**r["forgetless_vs_plain"]))
        print("default layout: {batches} batches, {padding_share:.1%} padding, shared prefix {shared_prefix_tokens} "
              "tokens ({prefix_share_of_tokens:.0%} of all tokens computed once)".format(**r["layout"]))
        print("share of forgetless's time: " + ", ".join(f"{k} {v:.0%}" for k, v in r["share_of_time"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
