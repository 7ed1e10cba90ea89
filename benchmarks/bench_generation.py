"""New tokens/s of greedy generation: the default path (continuous batching) against the paths it replaces.

    PYTHONPATH=src python benchmarks/bench_generation.py --out benchmarks/results/bench_generation.json

Two workloads of the embedded model, each at a token budget the measures use:
- ``mixed``: GSM8K (the behaviour prompts), MBPP test problems and IFEval prompts, interleaved, one budget;
  answers of very different lengths, as a measure run meets them;
- ``uniform``: GSM8K prompts only, a short budget most answers reach.
Variants, all in this one process, one after another on the same prompts:
- ``default``: ``decode_ids`` as shipped (continuous batching, :data:`forgetless.lm.decode.DEFAULT_ROWS` rows);
- ``slots-R``: continuous batching with R live rows (the sweep that chose the default);
- ``generate-B``: left-padded ``model.generate`` batches of B, longest prompts first (B = 8: the path before);
- ``single``: ``model.generate`` one prompt at a time (the reference for identical outputs);
- ``hf-continuous``: transformers' own ``generate_batch`` (paged attention), on the uniform workload.
New tokens are the tokens written up to each stop (the stop token counted); a padded batch also computes rows
that have stopped, and ``stopped_row_share`` is the share of its decode row-steps spent on them (0 for continuous
batching, where it is measured from the decoder's own count of row-steps). Outputs are compared item by item
with ``single``: the count that are identical, and for the others where their text first differs. Prints a table;
``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import time
from pathlib import Path

import torch

from forgetless.lm import continuous, decode
from forgetless.lm.decode import DecodingSettings, decode_ids, stop_token_ids
from forgetless.lm.modeling import load_model_and_tokenizer
from forgetless.lm.templates import encode_prompt

IFEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifeval" / "input_data.jsonl.gz"


def ifeval_prompts(n: int) -> list[list[dict]]:
    from importlib import resources

    packaged = resources.files("forgetless") / "datasets" / "ifeval_input_data.jsonl.gz"
    path = packaged if packaged.is_file() else IFEVAL
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(n))]
    return [[{"role": "user", "content": r["prompt"]}] for r in rows]


def workload(name: str, n: int) -> list[list[dict]]:
    """``n`` prompts (chat messages) of each source of the workload, interleaved."""
    from forgetless.eval.tasks import get_task
    from forgetless.retention.answers import prompt_set

    gsm8k = prompt_set("gsm8k", n)[1]
    if name == "uniform":
        return gsm8k
    mbpp = [item.messages for item in get_task("mbpp-test").load()[:n]]
    return [p for trio in zip(gsm8k, mbpp, ifeval_prompts(n)) for p in trio]


def padded(model, tokenizer, prompts, settings, batch_size):
    """``model.generate`` in left-padded batches of ``batch_size``, longest prompts first (the path before)."""
    out: dict[int, tuple] = {}
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    decode._decode_padded(model, tokenizer, [prompts[i] for i in order], order, settings, batch_size,
                          lambda i, new, stop: out.__setitem__(i, (new, stop)))
    return [out[i] for i in range(len(prompts))], order


def stopped_row_share(results, order, batch_size) -> float:
    """Share of a padded run's decode row-steps spent on rows whose answer had already stopped."""
    spent = wasted = 0
    for b in range(0, len(order), batch_size):
        written = [len(results[i][0]) + (results[i][1] is not None) for i in order[b:b + batch_size]]
        spent += max(written) * len(written)
        wasted += sum(max(written) - w for w in written)
    return wasted / spent


def hf_continuous(model, tokenizer, prompts, settings):
    """transformers' continuous batching (``generate_batch``), cut at the first stop like the other paths."""
    stops = set(stop_token_ids(tokenizer))
    outputs = model.generate_batch(inputs=prompts, generation_config=decode._generation_config(tokenizer, settings),
                                   warmup=False)
    results = []
    for key in sorted(outputs, key=lambda k: int(k.rsplit("_", 1)[-1])):
        new, found = decode.cut_at_stop(list(outputs[key].generated_tokens), stops)
        results.append((new, outputs[key].generated_tokens[len(new)] if found else None))
    return results


def slots(model, tokenizer, ids, settings, rows=None):
    """``decode_ids`` (continuous batching), and what its decoder did: decode steps, row-steps, KV cache size."""
    seen = []
    real = continuous.SlotDecoder.run

    def run(self, *args):
        seen.append(self)
        return real(self, *args)

    continuous.SlotDecoder.run = run
    try:
        results = decode_ids(model, tokenizer, ids, settings, rows, show_progress=False)
    finally:
        continuous.SlotDecoder.run = real
    (decoder,) = seen
    written = sum(len(new) + (stop is not None) for new, stop in results)
    cache = sum(t.numel() * t.element_size() for t in decoder.cache.keys + decoder.cache.values)
    return results, {"decode_steps": decoder.steps, "row_steps": decoder.row_steps, "prefix_tokens": decoder.prefix,
                     # every token after a row's first (which its prefill gives) is one row-step:
                     # none is spent after a stop
                     "stopped_row_share": round(1 - (written - len(results)) / max(decoder.row_steps, 1), 3),
                     "kv_cache_mib": round(cache / 2**20)}


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_variant(name, fn, tokenizer, reference):
    start = time.perf_counter()
    results, extra = fn()
    seconds = time.perf_counter() - start
    tokens = sum(len(new) + (stop is not None) for new, stop in results)
    row = {"variant": name, "seconds": round(seconds, 2), "items": len(results), "new_tokens": tokens,
           "tokens_per_s": round(tokens / seconds, 1), "items_per_s": round(len(results) / seconds, 3), **extra}
    if reference is not None:
        texts = [tokenizer.decode(new) for new, _ in results]
        ref = [tokenizer.decode(new) for new, _ in reference]
        row["identical"] = sum(a == b for a, b in zip(results, reference))
        row["first_differences"] = [{"item": i, "char": first_difference(a, b)}
                                    for i, (a, b) in enumerate(zip(texts, ref)) if a != b]
    print(json.dumps(row), flush=True)
    return row, results


def bench(model, tokenizer, name, prompts, settings, args) -> dict:
    ids = [encode_prompt(tokenizer, m) for m in prompts]
    rows, reference = [], None
    if not args.skip_single:
        row, reference = run_variant("single", lambda: (padded(model, tokenizer, ids, settings, 1)[0], {}), tokenizer,
                                     None)
        rows.append(row)
    variants = [("default", lambda: slots(model, tokenizer, ids, settings))]
    variants += [(f"slots-{r}", lambda r=r: slots(model, tokenizer, ids, settings, r)) for r in args.rows]
    for b in args.generate:
        def gen(b=b):
            results, order = padded(model, tokenizer, ids, settings, b)
            return results, {"stopped_row_share": round(stopped_row_share(results, order, b), 3)}
        variants.append((f"generate-{b}", gen))
    if name == "uniform" and args.hf_continuous:
        variants.append(("hf-continuous", lambda: (hf_continuous(model, tokenizer, ids, settings), {})))
    for variant, fn in variants:
        rows.append(run_variant(variant, fn, tokenizer, reference)[0])
    by = {r["variant"]: r for r in rows}
    before = by.get("generate-8")
    best_generate = max((r for r in rows if r["variant"].startswith("generate-")), key=lambda r: r["tokens_per_s"],
                        default=None)
    summary = {"workload": name, "prompts": len(ids), "max_new_tokens": settings.max_new_tokens,
               "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids), 1), "variants": rows}
    if before:
        summary["default_vs_generate8"] = round(by["default"]["tokens_per_s"] / before["tokens_per_s"], 2)
    if best_generate:
        summary["best_generate"] = best_generate["variant"]
        summary["default_vs_best_generate"] = round(by["default"]["tokens_per_s"] / best_generate["tokens_per_s"], 2)
    if "single" in by:
        summary["default_vs_single"] = round(by["default"]["tokens_per_s"] / by["single"]["tokens_per_s"], 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--per-source", type=int, default=16, help="mixed: prompts of each of GSM8K, MBPP, IFEval")
    parser.add_argument("--mixed-tokens", type=int, default=256, help="mixed: max new tokens")
    parser.add_argument("--uniform-items", type=int, default=32)
    parser.add_argument("--uniform-tokens", type=int, default=96)
    parser.add_argument("--rows", type=int, nargs="*", default=[8, 16, 32, 64], help="continuous batching sweep")
    parser.add_argument("--generate", type=int, nargs="*", default=[8, 16, 32], help="padded generate sweep")
    parser.add_argument("--workloads", nargs="*", default=["mixed", "uniform"])
    parser.add_argument("--skip-single", action="store_true")
    parser.add_argument("--hf-continuous", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model)
    decode_ids(model, tokenizer, [encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}])],
               DecodingSettings(max_new_tokens=2), show_progress=False)  # warm-up
    results = {"model": args.model, "device": str(next(model.parameters()).device), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "default_rows": decode.DEFAULT_ROWS, "workloads": []}
    for name in args.workloads:
        n, budget = ((args.per_source, args.mixed_tokens) if name == "mixed"
                     else (args.uniform_items, args.uniform_tokens))
        results["workloads"].append(bench(model, tokenizer, name, workload(name, n),
                                          DecodingSettings(max_new_tokens=budget), args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    for w in results["workloads"]:
        print(f"\n{w['workload']}: {w['prompts']} prompts, {w['max_new_tokens']} new tokens at most")
        print(f"{'variant':<15} {'tokens/s':>9} {'items/s':>8} {'seconds':>8} {'stopped rows':>12} {'identical':>10}")
        for r in w["variants"]:
            share = r.get("stopped_row_share")
            print(f"{r['variant']:<15} {r['tokens_per_s']:>9} {r['items_per_s']:>8} {r['seconds']:>8} "
                  f"{'' if share is None else f'{share:.1%}':>12} {r.get('identical', ''):>10}")
        print({k: v for k, v in w.items() if k.startswith("default_vs") or k == "best_generate"})


if __name__ == "__main__":
    main()
