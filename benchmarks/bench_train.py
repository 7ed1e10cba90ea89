"""Train-step time of the masked loss (STM, SFT) against a plain HF Trainer step, same batch, one process.

Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_train.py --batch 4 --length 256 --steps 5 [--threads 1] [--json out.json]

Each variant is a real ``Trainer.training_step`` (forward, loss, backward) on the embedded model with a LoRA
adapter (r=16, all linear layers), on the same batch of MBPP examples cut to ``--length`` tokens:

* ``stm``: forgetless's loss, the tau=2.5 mask (response tokens with base NLL > log 2.5 dropped);
* ``sft``: forgetless's loss, every response token;
* ``plain-sft``: a stock HF ``Trainer`` (the model's own loss over full ``B x T x V`` logits), every response token;
* ``plain-stm``: the stock Trainer on the STM labels (shows where the time goes: the full logits).

Variants are interleaved round by round (the machine may be shared) and the median is reported, with tokens/s
and the bytes autograd saves for backward (activations + logits; parameters excluded) -- a per-variant memory
figure on CPU, where allocator statistics do not exist. On CUDA the peak allocated memory is reported as well.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time

import torch


def saved_bytes(step, params: set[int]) -> tuple[float, int]:
    """Run ``step()`` counting the unique storages autograd saves for backward; returns (seconds, bytes)."""
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return time.perf_counter() - start, sum(seen.values())


def build_batch(tokenizer, batch: int, length: int, model):
    from forgetless.train.collate import MaskedBatchCollator, build_sft_table
    from forgetless.lm.data import load_examples
    from forgetless.core.logits import token_nll

    rows = build_sft_table(load_examples("mbpp-train", limit=batch), tokenizer, max_length=length)
    sft = MaskedBatchCollator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        nll = token_nll(model, sft["input_ids"], sft["attention_mask"], sft["labels"] != -100)
    stm = {k: v.clone() for k, v in sft.items()}
    drop = (stm["labels"] != -100) & (nll > math.log(2.5))  # ppl > 2.5, the paper's tau
    stm["labels"][drop] = -100
    stm["loss_weight"][drop] = 0.0
    return sft, stm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); "
                        "1 avoids spinning threads on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from forgetless.lm.modeling import load_model_and_tokenizer
    from forgetless.train.stage import _trainer_class

    model, tokenizer = load_model_and_tokenizer("embedded", dtype="auto", device=args.device)
    sft, stm = build_batch(tokenizer, args.batch, args.length, model)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    targs = TrainingArguments(output_dir="/tmp/forgetless-bench", report_to=[], use_cpu=args.device == "cpu",
                              remove_unused_columns=False, label_names=["labels"],
                              bf16=next(model.parameters()).dtype == torch.bfloat16)
    ours, plain = _trainer_class()(model=model, args=targs), Trainer(model=model, args=targs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def count(batch):
        return (batch["labels"][:, 1:] != -100).sum().to(args.device)

    def plain_inputs(batch):
        return {k: v for k, v in batch.items() if k != "loss_weight"}

    variants = {
        "stm": lambda: ours.training_step(model, stm, count(stm)),
        "sft": lambda: ours.training_step(model, sft, count(sft)),
        "plain-sft": lambda: plain.training_step(model, plain_inputs(sft), count(sft)),
        "plain-stm": lambda: plain.training_step(model, plain_inputs(stm), count(stm)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    memory: dict[str, int] = {}
    for round_ in range(args.steps + 1):  # round 0 warms up
        for name, step in variants.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            seconds, nbytes = saved_bytes(step, params)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
                memory[f"{name}_cuda_peak"] = torch.cuda.max_memory_allocated()
            model.zero_grad(set_to_none=True)
            memory[name] = nbytes
            if round_:
                times[name].append(seconds)
        print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v), flush=True)

    tokens = int(sft["attention_mask"].sum())
    response = int((sft["labels"][:, 1:] != -100).sum())
    report = {
        "device": args.device, "batch": args.batch, "length": args.length, "steps": args.steps,
        "tokens": tokens, "response_tokens": response,
        "stm_trained_tokens": int((stm["labels"][:, 1:] != -100).sum()),
        "stm_masked_fraction_of_response": 1 - int((stm["labels"][:, 1:] != -100).sum()) / max(response, 1),
        "threads": torch.get_num_threads(), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "variants": {},
    }
    base = statistics.median(times["sft"])
    for name, ts in times.items():
        median = statistics.median(ts)
        report["variants"][name] = {
            "median_s": median, "all_s": ts, "tokens_per_s": tokens / median, "vs_sft": median / base,
            "saved_for_backward_mib": memory[name] / 2**20,
            **({"cuda_peak_mib": memory[f"{name}_cuda_peak"] / 2**20} if f"{name}_cuda_peak" in memory else {}),
        }
    print(f"{'variant':<10} {'median s':>9} {'x sft':>6} {'tok/s':>7} {'saved MiB':>10}")
    for name, v in report["variants"].items():
        print(f"{name:<10} {v['median_s']:>9.3f} {v['vs_sft']:>6.3f} {v['tokens_per_s']:>7.1f} "
              f"{v['saved_for_backward_mib']:>10.1f}")
    print(f"batch {args.batch} x {args.length}: {tokens} tokens, {response} response tokens, STM masks "
          f"{report['stm_masked_fraction_of_response']:.1%} of them; peak RSS {report['peak_rss_mib']:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
