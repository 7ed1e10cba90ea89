"""Scoring speed and memory: forgetless vs a plain forward (the limit) vs the reference approach.

    .venv/bin/python benchmarks/bench_score.py [--examples 32] [--repeats 3] [--batch-tokens 4096]

Side by side in one process, same model (the embedded SmolLM2-135M-Instruct), same examples:
  forgetless  -- length-bucketed batches, decoder once, LM head only on response rows (chunked)
  plain       -- the same batches through model(...).logits, no log-softmax: the cost of a forward
  reference   -- one example at a time, full-vocabulary fp32 log_softmax, gather, exp per token
Times are medians over repeats, interleaved so machine load hits all three alike. Peak memory is
measured in a fresh subprocess per method (peak RSS, sampled every 5 ms, above the RSS after loading).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch


def setup(n_examples: int):
    from forgetless.lm.data import load_examples
    from forgetless.lm.modeling import load_model_and_tokenizer
    from forgetless.lm.templates import encode_conversation

    model, tok = load_model_and_tokenizer("embedded", device="cpu")
    encoded = [encode_conversation(tok, ex.messages, 1024) for ex in load_examples("mbpp-train", limit=n_examples)]
    return model, tok, encoded


def run_forgetless(model, tok, encoded, batch_tokens):
    from forgetless.lm.scoring import score_encoded

    return score_encoded(model, encoded, tok.pad_token_id, batch_tokens)


@torch.no_grad()
def run_plain(model, tok, encoded, batch_tokens):
    from forgetless.lm.batching import length_buckets
    from forgetless.score.stage import pad_batch

    for batch in length_buckets([len(e) for e in encoded], batch_tokens):
        ids, attention, _ = pad_batch([encoded[i] for i in batch], tok.pad_token_id)
        model(input_ids=ids, attention_mask=attention).logits


@torch.no_grad()
def run_reference(model, tok, encoded, batch_tokens):
    out = []
    for e in encoded:
        ids = torch.tensor([e.input_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]  # (T, V)
        token_logp = logp[:-1].gather(1, ids[0, 1:, None]).squeeze(1)
        ppl = torch.exp(-token_logp)
        out.append(ppl[torch.tensor(e.response_mask[1:], dtype=torch.bool)])
    return out


METHODS = {"forgetless": run_forgetless, "plain": run_plain, "reference": run_reference}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak(method: str, n_examples: int, batch_tokens: int, queue) -> None:
    import threading

    torch.set_num_threads(2)
    model, tok, encoded = setup(n_examples)
    base, peak, running = rss_mib(), [0.0], [True]

    def sample():  # ru_maxrss would report the model load's peak; sample RSS during the method instead
        while running[0]:
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.005)

    watcher = threading.Thread(target=sample)
    watcher.start()
    METHODS[method](model, tok, encoded, batch_tokens)
    running[0] = False
    watcher.join()
    queue.put(peak[0] - base)


def peak_mib(method: str, n_examples: int, batch_tokens: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak, args=(method, n_examples, batch_tokens, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    model, tok, encoded = setup(args.examples)
    tokens = sum(len(e) for e in encoded)
    response = sum(sum(e.response_mask) for e in encoded)
    # Check before timing: forgetless and the reference agree on every response token.
    ours = torch.cat([torch.from_numpy(n[1:][torch.tensor(e.response_mask[1:], dtype=torch.bool).numpy()]) for n, e in zip(run_forgetless(model, tok, encoded, args.batch_tokens), encoded)])
    ref = torch.cat(run_reference(model, tok, encoded, args.batch_tokens))
    max_diff = (torch.exp(ours.double()) - ref.double()).abs().div(ref.double()).max().item()
    times = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for name, fn in METHODS.items():
            start = time.perf_counter()
            fn(model, tok, encoded, args.batch_tokens)
            times[name].append(time.perf_counter() - start)
    med = {m: statistics.median(t) for m, t in times.items()}
    result = {
        "examples": args.examples, "tokens": tokens, "response_tokens": response, "batch_tokens": args.batch_tokens,
        "threads": torch.get_num_threads(), "max_rel_ppl_diff_vs_reference": max_diff,
        "tokens_per_s": {m: tokens / t for m, t in med.items()},
        "forgetless_vs_plain": med["plain"] / med["forgetless"],
        "forgetless_vs_reference": med["reference"] / med["forgetless"],
    }
    if not args.no_memory:
        result["peak_mib_above_model"] = {m: peak_mib(m, args.examples, args.batch_tokens) for m in METHODS}
    print(f"{'method':<12}{'tokens/s':>10}{'speed vs forgetless':>22}{'peak MiB':>10}")
    for m in METHODS:
        mem = result.get("peak_mib_above_model", {}).get(m, float("nan"))
        print(f"{m:<12}{result['tokens_per_s'][m]:>10.0f}{med[m] / med['forgetless']:>21.2f}x{mem:>10.0f}")
    print(f"forgetless is {result['forgetless_vs_plain']:.2f}x the plain forward's speed (goal >= 0.9) and "
          f"{result['forgetless_vs_reference']:.2f}x the reference (goal >= 5); max relative ppl difference {max_diff:.1e}")
    with open("benchmarks/results/bench_score.json", "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
