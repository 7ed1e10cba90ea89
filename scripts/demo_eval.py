"""End-to-end check of the eval and report stages on CPU: base vs a quickly fine-tuned
SmolLM2-135M-Instruct (LoRA, a few steps on MBPP training examples) on small subsets of every
task (MBPP, GSM8K, MATH, ARC-Challenge generative, text-to-SQL on a tiny SQLite fixture).

    PYTHONPATH=src python scripts/demo_eval.py --out runs/demo-eval --limit 3 --max-new-tokens 48

The adapter is a smoke-test stand-in for a real training run; the numbers it gives on a few items
say nothing about forgetting (see /work/shared/EMBEDDED.md for why this model sits at the floor).
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import time
from pathlib import Path

import torch

from forgetless.lm.data import load_examples
from forgetless.eval.stage import EvalConfig, print_eval_summary, run_eval
from forgetless.lm.modeling import load_model_and_tokenizer
from forgetless.report.stage import ReportConfig, print_report, run_report
from forgetless.lm.templates import encode_conversation


def quick_adapter(out: Path, examples: int, steps: int, lr: float) -> Path:
    """LoRA r=8 on q/v projections, a few AdamW steps on MBPP training responses."""
    from peft import LoraConfig, get_peft_model

    if (out / "adapter_config.json").is_file():
        return out
    model, tokenizer = load_model_and_tokenizer("embedded", device="cpu", dtype="float32")
    model = get_peft_model(model,
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    data = [encode_conversation(tokenizer, ex.messages, max_length=384) for ex in load_examples("mbpp-train", examples)]
    for step in range(steps):
        enc = data[step % len(data)]
        ids = torch.tensor([enc.input_ids])
        labels = torch.where(torch.tensor([enc.response_mask]) == 1, ids, torch.full_like(ids, -100))
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logging.info("adapter step %d/%d loss %.3f", step + 1, steps, loss.item())
    model.save_pretrained(out)
    return out


def sql_fixture(root: Path) -> Path:
    """A tiny shop database and three questions, as a user task definition (metric: sql)."""
    db_dir = root / "dbs" / "shop"
    db_dir.mkdir(parents=True, exist_ok=True)
    db = db_dir / "shop.sqlite"
    if not db.exists():
        conn = sqlite3.connect(db)
        conn.executescript("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, stock INTEGER);"
                           "INSERT INTO items VALUES "
                           "(1,'pen',1.5,100),(2,'book',12.0,7),(3,'bag',30.0,0),(4,'ink',4.0,12);")
        conn.commit()
        conn.close()
    questions = [("q1", "How many items are there?", "SELECT COUNT(*) FROM items"),
                 ("q2", "What is the name of the most expensive item?",
                  "SELECT name FROM items ORDER BY price DESC LIMIT 1"),
                 ("q3", "Which items are out of stock?", "SELECT name FROM items WHERE stock = 0")]
    (root / "sql_dev.json").write_text(json.dumps([{"question_id": q, "db_id": "shop", "question": text, "SQL": sql}
                                                   for q, text, sql in questions]))
    definition = root / "shop_sql.yaml"
    definition.write_text(f"name: sql_shop\ndata: {root / 'sql_dev.json'}\ndb_root: {root / 'dbs'}\n"
                          "metric: sql\nmax_new_tokens: 64\n")
    return definition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo-eval")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--train-steps", type=int, default=12)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = quick_adapter(out / "adapter", examples=args.train_steps, steps=args.train_steps, lr=1e-3)
    tasks = ("mbpp", "gsm8k", "math", "arc_challenge", str(sql_fixture(out)))
    timings = {}
    for label, extra in (("base", {}), ("tuned", {"adapter": str(adapter)})):
        start = time.monotonic()
        cfg = EvalConfig(output_dir=str(out / label), tasks=tasks, limit=args.limit, seed=0,
                         max_new_tokens=args.max_new_tokens, batch_size=args.limit, device="cpu", **extra)
        print_eval_summary(run_eval(cfg))
        timings[label] = round(time.monotonic() - start, 1)
    print_report(run_report(ReportConfig(runs=(f"base={out / 'base'}", f"lora-sft={out / 'tuned'}"),
                                         output_dir=str(out / "report"))))
    print(f"eval seconds: {timings}")


if __name__ == "__main__":
    main()
