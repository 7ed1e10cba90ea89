"""How scoring and training cost grow with sequence length and data-set size (embedded model, CPU or CUDA).

    .venv/bin/python benchmarks/bench_score_scale.py [--lengths 256 512 1024 2048] [--tokens 8192] [--train-tokens 4096]

Synthetic sequences (random token ids; the second half of each is the "response") so every
length gets the same number of tokens: tokens/s per length shows where attention's quadratic
term starts to matter. Training is one LoRA (r=16, all linear layers) forward + backward
through forgetless's loss (``token_nll`` on response rows) at ``--train-tokens`` tokens per step.
Data-set size enters only as more batches of the same cost, so time grows linearly with the
number of tokens; the last table checks that on 1x, 2x, 4x copies.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from forgetless.lm.modeling import load_model_and_tokenizer
from forgetless.lm.scoring import score_encoded
from forgetless.lm.templates import Encoded


def synthetic(n: int, length: int, vocab: int, seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (n, length), generator=g).tolist()
    mask = [0] * (length // 2) + [1] * (length - length // 2)
    return [Encoded(input_ids=row, response_mask=mask) for row in ids]


def timed(model, tok, encoded, batch_tokens) -> float:
    start = time.perf_counter()
    score_encoded(model, encoded, tok.pad_token_id, batch_tokens)
    return time.perf_counter() - start


def timed_train_step(model, tok, encoded) -> float:
    """Seconds of one forward + backward of the masked loss over ``encoded`` as one batch."""
    from forgetless.core.logits import token_nll

    ids = torch.tensor([e.input_ids for e in encoded])  # (B, T), equal lengths
    keep = torch.tensor([e.response_mask for e in encoded], dtype=torch.bool)
    start = time.perf_counter()
    nll = token_nll(model, ids, torch.ones_like(ids), keep)
    loss = nll[keep].sum() / keep.sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def train_scale(model, tok, lengths: list[int], tokens: int) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    lora.train()
    timed_train_step(lora, tok, synthetic(2, 128, len(tok)))  # warm-up
    rows = []
    for length in lengths:
        enc = synthetic(max(1, tokens // length), length, len(tok), seed=1)
        seconds = timed_train_step(lora, tok, enc)
        rows.append({"length": length, "examples": len(enc), "tokens_per_s": len(enc) * length / seconds})
    lora.unload()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens scored per length")
    parser.add_argument("--train-tokens", type=int, default=4096, help="tokens per training step per length (0: skip)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    model, tok = load_model_and_tokenizer("embedded", device=args.device)
    device = str(next(model.parameters()).device)
    timed(model, tok, synthetic(2, 128, len(tok)), 4096)  # warm-up
    rows = []
    for length in args.lengths:
        enc = synthetic(max(1, args.tokens // length), length, len(tok))
        seconds = timed(model, tok, enc, max(length, 4096))
        rows.append({"length": length, "examples": len(enc), "tokens_per_s": len(enc) * length / seconds})
    base = synthetic(max(1, args.tokens // 512), 512, len(tok))
    sizes = []
    for copies in (1, 2, 4):
        seconds = timed(model, tok, base * copies, 4096)
        sizes.append({"examples": len(base) * copies, "seconds": seconds})
    train = train_scale(model, tok, args.lengths, args.train_tokens) if args.train_tokens else []
    print(f"device {device}, dtype {next(model.parameters()).dtype}, threads {torch.get_num_threads()}")
    print(f"{'length':>8}{'score ex':>10}{'score tok/s':>13}{'train ex':>10}{'train tok/s':>13}")
    for r, t in zip(rows, train or [None] * len(rows)):
        train_cells = f"{t['examples']:>10}{t['tokens_per_s']:>13.0f}" if t else f"{'-':>10}{'-':>13}"
        print(f"{r['length']:>8}{r['examples']:>10}{r['tokens_per_s']:>13.0f}{train_cells}")
    print(f"{'examples':>10}{'seconds':>10}{'s/example':>11}")
    for s in sizes:
        print(f"{s['examples']:>10}{s['seconds']:>10.1f}{s['seconds'] / s['examples']:>11.3f}")
    with open(f"benchmarks/results/bench_score_scale_{device.split(':')[0]}.json", "w") as f:
        json.dump({"device": device, "lengths": rows, "train_lengths": train, "sizes": sizes}, f, indent=2)


if __name__ == "__main__":
    main()
