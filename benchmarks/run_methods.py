"""Short run of every training method on bundled MBPP with the embedded model: adapter, loss curve, dW diagnostics.

    PYTHONPATH=src python benchmarks/run_methods.py --examples 4 --steps 2 --out /tmp/forgetless-methods

The mask tables are built here with simple stand-ins for the masking stage (base NLL from
``forgetless.core.logits.token_nll``; tau = 2.5): ``stm`` drops tokens with ppl > tau, ``random-mask`` drops the same
number of response tokens at random, ``inverse-mask`` keeps only the tokens STM drops, ``soft`` weights each
token by ``min(1, tau / ppl)``; ``kl`` trains the SFT table with ``kl_coef`` 0.1.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch


def mask_tables(rows: list[dict], model, tau: float, seed: int) -> dict[str, list[dict]]:
    from forgetless.core.logits import token_nll

    tables = {"sft": rows, "stm": [], "random-mask": [], "inverse-mask": [], "soft": []}
    rng = random.Random(seed)
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        labels = torch.tensor([r["labels"]])
        with torch.no_grad():
            nll = token_nll(model, ids, torch.ones_like(ids), labels != -100)[0].tolist()
        trained = [i for i, y in enumerate(r["labels"]) if y != -100]
        high = {i for i in trained if nll[i] > math.log(tau)}
        dropped = {
            "stm": high, "inverse-mask": set(trained) - high,
            "random-mask": set(rng.sample(trained, len(high))), "soft": set(),
        }
        for name, drop in dropped.items():
            labels_ = [(-100 if i in drop else y) for i, y in enumerate(r["labels"])]
            weight = [0.0 if y == -100 else 1.0 for y in labels_]
            if name == "soft":
                weight = [0.0 if y == -100 else min(1.0, tau / math.exp(nll[i])) for i, y in enumerate(labels_)]
            tables[name].append(dict(r, labels=labels_, loss_weight=weight, nll=nll))
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default="/tmp/forgetless-methods")
    parser.add_argument("--methods", default="sft,stm,random-mask,inverse-mask,soft,kl")
    args = parser.parse_args()

    from forgetless.train.collate import build_sft_table, write_table
    from forgetless.lm.data import load_examples
    from forgetless.lm.modeling import load_model_and_tokenizer
    from forgetless.train.stage import TrainConfig, run_train

    out = Path(args.out)
    model, tokenizer = load_model_and_tokenizer("embedded", device="cpu")
    rows = build_sft_table(load_examples("mbpp-train", limit=args.examples), tokenizer, args.max_length)
    tables = mask_tables(rows, model, tau=2.5, seed=0)
    del model
    results = {}
    for method in args.methods.split(","):
        table = write_table(tables["sft" if method == "kl" else method], out / "tables" / f"{method}.parquet")
        run = run_train(TrainConfig(data=str(table), output_dir=str(out / method), method=method,
                                    kl_coef=0.1 if method == "kl" else 0.0, max_steps=args.steps, batch_size=1,
                                    learning_rate=1e-3, device="cpu"))
        summary = json.loads((run / "train_summary.json").read_text())
        diag = json.loads((run / "diagnostics.json").read_text())
        curve = [json.loads(x) for x in (run / "loss.jsonl").read_text().splitlines()]
        results[method] = {"masked_fraction": summary["table"]["masked_fraction"],
                           "trained_tokens": summary["trained_tokens_seen"], "loss": [c["loss"] for c in curve],
                           "dW_total_frobenius": diag["total_frobenius"], "wall_s": summary["wall_time_s"],
                           "adapter": (run / "adapter" / "adapter_model.safetensors").is_file()}
        print(method, json.dumps(results[method]), flush=True)
    (out / "methods.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
