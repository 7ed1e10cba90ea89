"""Packed multiple-choice scoring vs one forward per choice, same items, one process.

    PYTHONPATH=src python benchmarks/bench_mc.py [--task hellaswag] [--items 50] [--model embedded]

Prints items/s of both and the largest log-prob difference (must be below 1e-4).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from forgetless.lm.modeling import load_model_and_tokenizer
from forgetless.retention.mc import pack_item, score_item_naive, score_items
from forgetless.retention.olmo_tasks import load_mc_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="hellaswag")
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model, device="cpu")
    items = load_mc_items(args.task, args.items)
    with torch.no_grad():
        score_items(model, tokenizer, items[:2], args.batch_tokens)  # warm-up (allocator, kernels)
        t0 = time.perf_counter()
        packed = score_items(model, tokenizer, items, args.batch_tokens)
        t_packed = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive = [score_item_naive(model, tokenizer, it) for it in items]
        t_naive = time.perf_counter() - t0
    diff = max(abs(a[0] - b[0]) for pa, pn in zip(packed, naive) for a, b in zip(pa, pn))
    tokens_packed = sum(pack_item(tokenizer, it).length for it in items)
    tokens_naive = sum(len(s) + len(p.prefix) for it in items for p in [pack_item(tokenizer, it)] for s in p.suffixes)
    print(json.dumps({
        "task": args.task, "items": len(items), "threads": torch.get_num_threads(),
        "packed_items_per_s": round(len(items) / t_packed, 2), "naive_items_per_s": round(len(items) / t_naive, 2),
        "speedup": round(t_naive / t_packed, 2), "tokens_packed": tokens_packed, "tokens_naive": tokens_naive,
        "max_abs_logprob_diff": diff, "same_to_1e-4": diff < 1e-4,
    }))


if __name__ == "__main__":
    main()
