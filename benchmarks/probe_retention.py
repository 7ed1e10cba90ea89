"""Re-run the EMBEDDED.md probe with the retention measures: what each method does to a small model.

    PYTHONPATH=src python benchmarks/probe_retention.py --out /tmp/probe [--mc arc_easy,piqa,sciq]

64 MBPP training examples, LoRA r=16 alpha=32 on every linear layer, lr 2e-4, 2 epochs, batch 4,
on the embedded SmolLM2-135M-Instruct. Methods: ground truth (all response tokens), STM at
tau=2.5, STM at the tau that masks ~20% of response tokens on this model, and a random mask of
the same fraction as STM tau=2.5 (seeded). Each run is evaluated with MC accuracy, drift from
the base (adapter disabled) on GSM8K / MATH / ARC-Challenge prompts, and the MBPP validation
NLL split by kind; ``retention.report`` then builds the table. A self-contained training loop
(not the project's trainer) so the measures can be checked on their own.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from forgetless.core.logits import token_nll
from forgetless.lm.modeling import load_model_and_tokenizer, model_fingerprint
from forgetless.retention.drift import evaluate_drift
from forgetless.retention.heldout import evaluate_heldout, response_nll
from forgetless.retention.mc import evaluate_mc
from forgetless.lm.templates import encode_conversation

logger = logging.getLogger("probe")


def train_lora(model, encoded, keep_masks, epochs=2, batch_size=4, lr=2e-4, seed=0):
    """Mean NLL over the kept tokens of each batch; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    pad = 0
    for epoch in range(epochs):
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for s in range(0, len(order), batch_size):
            batch = order[s : s + batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attn, keep = torch.zeros_like(ids), torch.zeros_like(ids)
            for b, i in enumerate(batch):
                ids[b, : len(encoded[i])] = torch.tensor(encoded[i].input_ids)
                attn[b, : len(encoded[i])] = 1
                keep[b, : len(encoded[i])] = keep_masks[i]
            nll = token_nll(peft_model, ids, attn, keep)
            kept = ~nll.isnan()
            if not kept.any():
                continue
            loss = nll[kept].sum() / kept.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        logger.info("epoch %d done, last loss %.3f", epoch, float(loss.detach()))
    peft_model.eval()
    return peft_model


def keep_masks_for(method, encoded, base_nll, seed=0):
    """Per example, a 0/1 tensor over its tokens: response tokens that are trained on."""
    masks = []
    gen = torch.Generator().manual_seed(seed)
    for enc, nll in zip(encoded, base_nll):
        resp = torch.tensor(enc.response_mask).bool()
        keep = resp.clone()
        if method["kind"] == "stm":
            keep[resp] = nll <= math.log(method["tau"])
        elif method["kind"] == "random":
            keep[resp] = torch.rand(int(resp.sum()), generator=gen) >= method["fraction"]
        masks.append(keep.long())
    return masks


def evaluate_all(model, tokenizer, out_dir, args, base_id):
    t = time.time()
    for task in args.mc.split(","):
        evaluate_mc(model, tokenizer, task, args.mc_items, out_dir=out_dir)
    for source in ("gsm8k", "math-test", "arc_challenge-test"):
        evaluate_drift(model, tokenizer, None, source, args.drift_items, args.cache, out_dir=out_dir,
                       max_new_tokens=args.max_new_tokens, base_id=base_id)
    evaluate_heldout(model, tokenizer, None, "mbpp-validation", args.heldout_items, args.cache, out_dir=out_dir,
                     tau=2.5, base_id=base_id)
    logger.info("evaluated %s in %.0f s", out_dir, time.time() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mc", default="arc_easy,piqa,sciq")
    parser.add_argument("--mc-items", type=int, default=150)
    parser.add_argument("--drift-items", type=int, default=20)
    parser.add_argument("--heldout-items", type=int, default=45)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--train-examples", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--methods", default="base,gt,stm2.5,random,stm20")
    parser.add_argument("--report-only", action="store_true", help="only build the table from finished runs")
    args = parser.parse_args()
    if args.report_only:
        write_probe_report(args.out)
        return
    args.cache = args.out / "cache"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from peft import LoraConfig, get_peft_model
    from forgetless.lm.data import load_examples

    model, tokenizer = load_model_and_tokenizer("embedded", device="cpu")
    base_id = model_fingerprint("embedded")
    encoded = [encode_conversation(tokenizer, ex.messages, 512)
               for ex in load_examples("mbpp-train", args.train_examples)]
    base_nll = response_nll(model, encoded, tokenizer.pad_token_id)
    flat = torch.cat(base_nll)
    tau20 = float(math.exp(torch.quantile(flat.double(), 0.8)))  # masks the top 20% of base NLLs
    frac25 = float((flat > math.log(2.5)).double().mean())
    methods = {"gt": {"kind": "gt"}, "stm2.5": {"kind": "stm", "tau": 2.5},
               "stm20": {"kind": "stm", "tau": tau20}, "random": {"kind": "random", "fraction": frac25}}
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "methods.json").write_text(json.dumps({"tau20": tau20, "masked_fraction_tau2.5": frac25,
                                                       "methods": methods,
                                                       "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    logger.info("tau masking 20%%: %.2f; tau=2.5 masks %.3f", tau20, frac25)
    for name in args.methods.split(","):
        out_dir = args.out / name
        if (out_dir / "done").exists():
            continue
        if name == "base":
            # The base measured through the same PEFT path (a zero-init adapter) as the runs.
            probe = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj"]))
            evaluate_all(probe, tokenizer, out_dir, args, base_id)
        else:
            t = time.time()
            keep = keep_masks_for(methods[name], encoded, base_nll, seed=0)
            probe = train_lora(model, encoded, keep, lr=args.lr)
            logger.info("%s trained in %.0f s (kept %.3f of response tokens)", name, time.time() - t,
                        float(sum(int(k.sum()) for k in keep)) / sum(sum(e.response_mask) for e in encoded))
            evaluate_all(probe, tokenizer, out_dir, args, base_id)
        model = probe.unload()  # drop the adapter: the next method starts from the base again
        (out_dir / "done").write_text("ok\n")
    write_probe_report(args.out)


def write_probe_report(out: Path) -> None:
    """table.md (summary + per-task detail) and drift_vs_gain.png from the finished runs."""
    from forgetless.retention.records import list_tasks, read_task
    from forgetless.report.retention import markdown_table, plot_drift_vs_gain, summarize_run

    names = {"gt": "ground truth", "stm2.5": "STM tau=2.5", "stm20": "STM tau@20% masked", "random": "random mask"}
    runs = {names[d.name]: d for d in sorted(out.iterdir()) if d.name in names and (d / "done").exists()}
    summaries = {name: summarize_run(out / "base", d) for name, d in runs.items()}
    lines = [markdown_table(summaries), "", "| method | task | base | tuned | change [95% CI] |",
             "|---|---|---|---|---|"]
    for name, s in summaries.items():
        for task, row in s["tasks"].items():
            lines.append(f"| {name} | {task} | {row['base']:.3f} | {row['tuned']:.3f} | "
                         f"{row['change']:+.3f} [{row['change_ci95'][0]:+.3f}, {row['change_ci95'][1]:+.3f}] |")
        d = runs[name]
        for task in sorted(t for t in list_tasks(d) if t.startswith(("drift:", "heldout:"))):
            rec = read_task(d, task)[0]
            extra = f" (base {rec['settings']['base_score']:.3f})" if task.startswith("heldout:") else ""
            lines.append(f"| {name} | {task} ({rec['metric']}) | | {rec['score']:.4f}{extra} | "
                         f"[{rec['ci95'][0]:.4f}, {rec['ci95'][1]:.4f}] |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "summaries.json").write_text(json.dumps(summaries, indent=2))
    plot_drift_vs_gain(summaries, out / "drift_vs_gain.png")
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
