"""How scoring cost grows with sequence length and data-set size (embedded model, CPU or CUDA).

    .venv/bin/python benchmarks/bench_score_scale.py [--lengths 256 512 1024 2048] [--tokens 8192]

Synthetic sequences (random token ids; the second half of each is the "response") so every
length gets the same number of tokens: tokens/s per length shows where attention's quadratic
term starts to matter. Data-set size enters only as more batches of the same cost, so time grows
linearly with the number of response tokens; the second table checks that on 1x, 2x, 4x copies.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from forgetless.modeling import load_model_and_tokenizer
from forgetless.scoring import score_encoded
from forgetless.templates import Encoded


def synthetic(n: int, length: int, vocab: int, seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (n, length), generator=g).tolist()
    mask = [0] * (length // 2) + [1] * (length - length // 2)
    return [Encoded(input_ids=row, response_mask=mask) for row in ids]


def timed(model, tok, encoded, batch_tokens) -> float:
    start = time.perf_counter()
    score_encoded(model, encoded, tok.pad_token_id, batch_tokens)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens scored per length")
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
    print(f"device {device}, dtype {next(model.parameters()).dtype}")
    print(f"{'length':>8}{'examples':>10}{'tokens/s':>10}")
    for r in rows:
        print(f"{r['length']:>8}{r['examples']:>10}{r['tokens_per_s']:>10.0f}")
    print(f"{'examples':>10}{'seconds':>10}{'s/example':>11}")
    for s in sizes:
        print(f"{s['examples']:>10}{s['seconds']:>10.1f}{s['seconds'] / s['examples']:>11.3f}")
    with open(f"benchmarks/results/bench_score_scale_{device.split(':')[0]}.json", "w") as f:
        json.dump({"device": device, "lengths": rows, "sizes": sizes}, f, indent=2)


if __name__ == "__main__":
    main()
