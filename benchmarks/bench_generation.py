"""Items/s of batched generation vs one item at a time: same items, same model, one process.

    PYTHONPATH=src python benchmarks/bench_generation.py --task gsm8k --items 8 --batch-size 8 --max-new-tokens 48

Greedy decoding; the batched outputs are also checked to equal the one-at-a-time outputs
(left padding must not change what the model writes). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from forgetless.lm.decode import DecodingSettings, generate
from forgetless.lm.modeling import load_model_and_tokenizer
from forgetless.eval.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    prompts = [it.messages for it in get_task(args.task).load()[: args.items]]
    settings = DecodingSettings(max_new_tokens=args.max_new_tokens)
    generate(model, tokenizer, prompts[:1], DecodingSettings(max_new_tokens=2), 1, show_progress=False)  # warm-up
    timings, outputs = {}, {}
    for name, batch_size in (("batched", args.batch_size), ("single", 1)):
        start = time.perf_counter()
        outputs[name] = generate(model, tokenizer, prompts, settings, batch_size, show_progress=False)
        timings[name] = time.perf_counter() - start
    same = sum(a == b for a, b in zip(outputs["batched"], outputs["single"]))
    print(json.dumps({
        "task": args.task, "items": len(prompts), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "device": str(next(model.parameters()).device), "threads": torch.get_num_threads(),
        "batched_items_per_s": round(len(prompts) / timings["batched"], 3),
        "single_items_per_s": round(len(prompts) / timings["single"], 3),
        "speedup": round(timings["single"] / timings["batched"], 2),
        "identical_outputs": f"{same}/{len(prompts)}",
    }))


if __name__ == "__main__":
    main()
