"""New tokens/s of greedy generation with a LoRA adapter: unmerged (PEFT's wrapped layers, how the measures run a
tuned model today) against the same adapter merged into the weights, with the base model as the floor.

    PYTHONPATH=src python benchmarks/bench_lora_generation.py --adapter runs/recipes-pilot/train/sft@lr0.001/adapter \
        --out benchmarks/results/bench_lora_generation.json

One process; the variants take turns (``--rounds`` rounds of base, unmerged, merged on the same prompts) so that
load from other work on the machine falls on each alike; each variant's figure is its median round. Workload: the
first ``--prompts`` GSM8K behaviour prompts, ``--max-new-tokens`` new tokens, continuous batching as shipped. The
merged model's answers are compared with the unmerged one's item by item (a merge changes float rounding, so a
greedy path may part; the count of identical answers says how often).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from forgetless.lm.decode import DecodingSettings, decode_ids
from forgetless.lm.modeling import load_adapter, load_model_and_tokenizer
from forgetless.lm.templates import encode_prompt
from forgetless.retention.answers import prompt_set


def timed(model, tokenizer, ids, settings) -> tuple[float, int, list]:
    started = time.perf_counter()
    results = decode_ids(model, tokenizer, ids, settings, show_progress=False)
    seconds = time.perf_counter() - started
    return seconds, sum(len(r[0]) for r in results), [list(r[0]) for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_model_and_tokenizer("embedded", device="cpu")
    unmerged = load_adapter(copy.deepcopy(base), args.adapter, "embedded")
    merged = load_adapter(copy.deepcopy(base), args.adapter, "embedded").merge_and_unload().eval()
    ids = [encode_prompt(tokenizer, m) for m in prompt_set("gsm8k", args.prompts)[1]]
    settings = DecodingSettings(max_new_tokens=args.max_new_tokens)
    variants = {"base": base, "lora-unmerged": unmerged, "lora-merged": merged}
    decode_ids(base, tokenizer, ids[:2], DecodingSettings(max_new_tokens=4), show_progress=False)  # warm-up
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    answers: dict[str, list] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, model in variants.items():
                seconds, tokens, out = timed(model, tokenizer, ids, settings)
                rounds[name].append(tokens / seconds)
                answers[name] = out
                print(f"{name}: {tokens} new tokens in {seconds:.1f} s ({tokens / seconds:.1f} tokens/s)", flush=True)
    same = sum(a == b for a, b in zip(answers["lora-merged"], answers["lora-unmerged"]))
    summary = {name: round(statistics.median(r), 1) for name, r in rounds.items()}
    result = {"tokens_per_s_median": summary, "rounds": rounds, "prompts": len(ids),
              "max_new_tokens": args.max_new_tokens, "merged_identical_to_unmerged": f"{same}/{len(ids)}",
              "merged_over_unmerged": round(summary["lora-merged"] / summary["lora-unmerged"], 3),
              "adapter": args.adapter, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine()}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
