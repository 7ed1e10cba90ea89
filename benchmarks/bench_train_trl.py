"""End-to-end LoRA training throughput: forgetless against TRL's ``SFTTrainer``, what a user would run instead.

Run from the repository root (about 7 minutes on an idle 2-core CPU at the defaults)::

    .venv/bin/python benchmarks/bench_train_trl.py [--examples 32] [--batch 8] [--max-length 320] [--steps 4]
        [--repeats 1] [--json benchmarks/results/bench_train_trl.json]

Every variant trains the embedded model on the same data (the first ``--examples`` of the bundled ``mbpp-train``,
chat messages), with the same LoRA (forgetless's ``TrainConfig`` defaults: r=16, alpha=32, dropout 0.05, every linear
layer but the LM head), max length, examples per optimizer step (``--batch``; accumulation only in the -accumK
variants), learning rate, AdamW, linear schedule, clipping and seed, in fp32:

* ``trl-padded``: ``SFTTrainer`` on a conversational prompt/completion dataset with ``completion_only_loss=True``;
  TRL tokenizes and truncates to ``max_length`` itself.
* ``trl-padding-free``: the same with ``padding_free=True`` (no packing). TRL refuses ``padding_free`` with a
  ``max_length`` unless it packs ("provide already truncated inputs"), so this one gets TRL's own tokenized and
  truncated dataset (made by a throwaway padded ``SFTTrainer``) with ``max_length=None``.
* ``forgetless-sft`` / ``forgetless-sft-packed``: ``run_train`` on the table ``forgetless run`` trains on,
  ``run_score`` -> ``run_mask(policy="none")``, padded or ``padding_free=True``.
* ``forgetless-stm`` / ``forgetless-stm-packed``: the same on ``run_mask(policy="threshold", tau=2.5)``.
* ``forgetless-{sft,stm}-accum2`` / ``-accum4``: padded, each step's ``--batch`` examples in 2 (4) micro-batches
  (``batch_size=batch/k, grad_accum=k``: the same examples and loss per step, normalised over the whole step; 1/k of
  the activations held at once). ``-ftz``: the same with ``torch.set_flush_denormal(True)``.

TRL runs at its best CPU settings: activation (gradient) checkpointing off and ``bf16=False`` (SFTConfig defaults
both to True), TRL's default chunked log-prob LM head, sdpa attention (flash attention needs CUDA; TRL 1.16 says
nothing about padding_free on sdpa, and transformers keeps packed examples apart by ``position_ids``: checked with
:func:`forgetless.core.packing.packing_isolates`), no Liger (CUDA only), no ``torch_compile`` (its compile time would
not pay back in a few steps). ``assistant_only_loss`` is no option: TRL has no training chat template for SmolLM2's
ChatML and raises, so completion-only loss on prompt/completion data is what a user of this model runs.

Each variant runs in a fresh subprocess; rounds interleave the variants. Timed: each optimizer step from
``on_step_begin`` to ``on_step_end`` (forward, loss, backward, clipping, AdamW; model loading, scoring and data
preparation excluded), step 1 left out as warm-up when there are more. Tokens/s counts real tokens (prompt and
response, no padding); trained tokens/s the tokens in the loss. Peak RSS is sampled every 10 ms while training. The
step-1 loss is the base model's (LoRA's B starts at zero), so recipes that train the same tokens must agree on it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from forgetless.core.labels import IGNORE_INDEX as IGNORE

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("trl-padding-free", "trl-padded", "forgetless-sft", "forgetless-sft-packed", "forgetless-stm",
            "forgetless-stm-packed", "forgetless-sft-accum2", "forgetless-stm-accum2", "forgetless-sft-accum4",
            "forgetless-stm-accum4", "forgetless-sft-accum4-ftz", "forgetless-stm-accum4-ftz")


def rss_gib(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its high-water mark (``VmHWM``), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Times each optimizer step, counts the tokens the model is handed in it, samples RSS while training and
        keeps the step-1 loss. Works the same in any HF Trainer: it hooks the model's forward, not the trainer."""

        def __init__(self):
            self.steps, self.loss1, self.rss_peak, self.now = [], None, 0.0, {}

        def _count(self, _module, _args, kwargs):
            ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
            self.now["tokens"] = self.now.get("tokens", 0) + int(mask.sum() if mask is not None else ids.numel())
            self.now["computed"] = self.now.get("computed", 0) + ids.numel()  # padding included
            if labels is not None:  # TRL hands the labels to the model; forgetless's loss.jsonl counts its own
                self.now["trained"] = self.now.get("trained", 0) + int((labels[:, 1:] != IGNORE).sum())

        def _sample(self):
            while self.running:
                self.rss_peak = max(self.rss_peak, rss_gib())
                time.sleep(0.01)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.rss_before, self.running = rss_gib(), True
            self.watcher = threading.Thread(target=self._sample, daemon=True)
            self.watcher.start()

        def on_step_begin(self, args, state, control, **kwargs):
            self.now, self.start = {}, time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append({"step": state.global_step, "seconds": time.perf_counter() - self.start, **self.now})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and state.global_step == 1:
                self.loss1 = logs["loss"]

        def on_train_end(self, args, state, control, **kwargs):
            self.running = False
            self.watcher.join()
            self.hook.remove()

    return StepClock()


def lora_defaults() -> dict:
    """forgetless's training defaults (TrainConfig), so both trainers get the same recipe."""
    from dataclasses import fields

    from forgetless.train.config import TrainConfig

    return {f.name: f.default for f in fields(TrainConfig) if f.name in (
        "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "lr_scheduler", "optim",
        "max_grad_norm", "weight_decay", "seed")}


def trl_config(args, out: Path, padding_free: bool, max_length: int | None):
    from trl import SFTConfig

    d = lora_defaults()
    return SFTConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=d["learning_rate"], lr_scheduler_type=d["lr_scheduler"], warmup_steps=0,
        weight_decay=d["weight_decay"], optim=d["optim"], max_grad_norm=d["max_grad_norm"], seed=d["seed"],
        data_seed=d["seed"], logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        fp16=False, activation_checkpointing=False, dataloader_num_workers=0, average_tokens_across_devices=True,
        max_length=max_length, completion_only_loss=True, padding_free=padding_free, packing=False,
    )


def train_trl(name: str, args, work: Path, clock) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import SFTTrainer

    from forgetless.core.packing import packing_isolates
    from forgetless.lm.modeling import load_model, load_tokenizer

    padding_free = name == "trl-padding-free"
    d = lora_defaults()
    model, tokenizer = load_model("embedded", dtype="float32", device="cpu"), load_tokenizer("embedded")
    model.config.use_cache = False
    isolates = packing_isolates(model) if padding_free else None
    data = datasets.load_from_disk(str(work / ("trl-tokens" if padding_free else "trl-messages")))
    peft_config = LoraConfig(r=d["lora_r"], lora_alpha=d["lora_alpha"], lora_dropout=d["lora_dropout"],
                             target_modules=d["target_modules"], task_type="CAUSAL_LM")
    config = trl_config(args, work / f"{name}-{args.round}", padding_free, None if padding_free else args.max_length)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])
    trainer.train()
    return {"train_examples": len(trainer.train_dataset), "attention": model.config._attn_implementation,
            "packing_isolates": isolates}


def train_forgetless(name: str, args, work: Path, clock) -> dict:
    import torch

    from forgetless.train.config import TrainConfig
    from forgetless.train.stage import run_train

    recipe, out = ("stm" if "stm" in name else "sft"), work / f"{name}-{args.round}"
    accum = int(re.search(r"-accum(\d+)", name).group(1)) if "-accum" in name else 1
    if name.endswith("-ftz"):  # flush denormals to zero (x86 FTZ/DAZ): tiny softmax tails cost no slow path
        torch.set_flush_denormal(True)
    config = TrainConfig(data=str(work / "masks" / recipe / "data.parquet"), output_dir=str(out), method=recipe,
                         max_steps=args.steps, batch_size=args.batch // accum, grad_accum=accum,
                         padding_free=name.endswith("-packed"),
                         dtype="float32", device="cpu", logging_steps=1)
    run_train(config, callbacks=[clock])
    trained = {r["step"]: r["trained_tokens"] for r in map(json.loads, (out / "loss.jsonl").read_text().splitlines())}
    for step in clock.steps:
        step["trained"] = trained.get(step["step"])
    summary = json.loads((out / "train_summary.json").read_text())
    return {"train_examples": summary["table"]["examples"], "masked_fraction": summary["table"]["masked_fraction"]}


def worker(args) -> None:
    """One variant, one round, in this (fresh) process; writes its measurements to ``args.out``."""
    clock = step_clock()
    train = train_trl if args.worker.startswith("trl") else train_forgetless
    info = train(args.worker, args, Path(args.work), clock)
    result = {"variant": args.worker, "round": args.round, "steps": clock.steps, "loss1": clock.loss1,
              "rss_before_gib": clock.rss_before, "rss_peak_gib": clock.rss_peak, "hwm_gib": rss_gib("VmHWM"), **info}
    Path(args.out).write_text(json.dumps(result))


def trl_tokenize(args, messages):
    """TRL's own preparation of ``messages`` (tokenize, completion-only labels, truncate, drop empty), by a
    throwaway padded SFTTrainer: the pre-truncated input that TRL's padding_free without packing asks for."""
    from trl import SFTTrainer

    from forgetless.lm.modeling import load_model, load_tokenizer

    model, tokenizer = load_model("embedded", dtype="float32", device="cpu"), load_tokenizer("embedded")
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(model=model, args=trl_config(args, Path(out), False, args.max_length),
                             train_dataset=messages, processing_class=tokenizer)
        return trainer.train_dataset.select_columns(["input_ids", "labels"]), tokenizer


def compare_tokens(trl_rows: list[dict], ours: list[dict], tokenizer) -> dict:
    """Do TRL and forgetless train the same tokens? Counts, and the tokens only one of them trains."""
    report = {"trl_examples": len(trl_rows), "forgetless_examples": len(ours)}
    if len(trl_rows) != len(ours):
        return report  # TRL dropped examples truncation left with no completion: rows no longer line up
    only = {"trl": collections.Counter(), "forgetless": collections.Counter()}
    for a, b in zip(trl_rows, ours):
        if a["input_ids"] != b["input_ids"]:
            continue
        for tok, ya, yb in zip(a["input_ids"][1:], a["labels"][1:], b["labels"][1:]):
            if (ya != IGNORE) != (yb != IGNORE):
                only["trl" if ya != IGNORE else "forgetless"][tokenizer.decode([tok])] += 1
    report.update({
        "same_input_ids": sum(a["input_ids"] == b["input_ids"] for a, b in zip(trl_rows, ours)),
        "trl_trained": sum(sum(y != IGNORE for y in r["labels"][1:]) for r in trl_rows),
        "forgetless_trained": sum(sum(y != IGNORE for y in r["labels"][1:]) for r in ours),
        "trained_only_by": {k: dict(v.most_common(5)) for k, v in only.items()},
    })
    return report


def prepare(args, work: Path) -> dict:
    """Score and mask as ``forgetless run`` does, and write TRL's two datasets; returns the token comparison."""
    import datasets

    from forgetless.lm.data import load_examples
    from forgetless.mask.stage import MaskConfig, run_mask
    from forgetless.score.stage import ScoreConfig, run_score
    from forgetless.train.collate import read_table

    scores = run_score(ScoreConfig(data="mbpp-train", limit=args.examples, max_length=args.max_length, device="cpu",
                                   dtype="float32", out_dir=str(work / "scores")))
    for recipe, policy in (("sft", "none"), ("stm", "threshold")):
        run_mask(MaskConfig(scores=str(scores), policy=policy, tau=2.5, out_dir=str(work / "masks" / recipe)))
    examples = load_examples("mbpp-train", limit=args.examples)
    messages = datasets.Dataset.from_list([{"prompt": ex.messages[:-1], "completion": ex.messages[-1:]}
                                           for ex in examples])
    messages.save_to_disk(str(work / "trl-messages"))
    tokens, tokenizer = trl_tokenize(args, messages)
    tokens.save_to_disk(str(work / "trl-tokens"))
    return compare_tokens(tokens.to_list(), read_table(work / "masks" / "sft" / "data.parquet"), tokenizer)


def launch(name: str, args, work: Path, round_: int) -> dict:
    out, log = work / f"result-{name}-{round_}.json", work / f"log-{name}-{round_}.txt"
    cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), "--out", str(out), "--round", str(round_),
           "--examples", str(args.examples), "--batch", str(args.batch), "--max-length", str(args.max_length),
           "--steps", str(args.steps)]
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "".join(log.read_text().splitlines(True)[-25:])
        sys.exit(f"{name} failed (exit {code}); last lines of {log}:\n{tail}")
    result = json.loads(out.read_text())
    # What TRL / transformers said about padding-free or attention, verbatim (deduplicated).
    result["notes"] = sorted({ln.strip() for ln in log.read_text().splitlines()
                              if any(w in ln.lower() for w in ("padding", "flash", "attn", "attention"))})
    return result


def summarize(runs: list[dict]) -> dict:
    """Medians over rounds of s/step, tokens/s and trained tokens/s (steps after the warm-up one)."""
    per_run = []
    for r in runs:
        timed = r["steps"][1:] or r["steps"]
        seconds = sum(s["seconds"] for s in timed)
        trained = [s.get("trained") for s in timed]
        per_run.append({"s_per_step": seconds / len(timed), "tokens_per_s": sum(s["tokens"] for s in timed) / seconds,
                        "trained_per_s": None if None in trained else sum(trained) / seconds})
    med = {k: statistics.median(p[k] for p in per_run) if per_run[0][k] is not None else None for k in per_run[0]}
    first = runs[0]["steps"][0]
    return {**med, "rss_peak_gib": max(r["rss_peak_gib"] for r in runs), "hwm_gib": max(r["hwm_gib"] for r in runs),
            "loss1": runs[0]["loss1"], "step1_tokens": first["tokens"], "step1_trained": first.get("trained"),
            "warmup_excluded": len(runs[0]["steps"]) > 1, "train_examples": runs[0]["train_examples"],
            "packing_isolates": runs[0].get("packing_isolates"), "notes": runs[0]["notes"]}


def loss_checks(v: dict) -> list[tuple[str, float]]:
    """Step-1 loss differences between variants that should agree, and TRL vs forgetless SFT, which differ in
    trained tokens (TRL also trains the newline after ``<|im_end|>``): the ``rescaled`` line spreads forgetless's
    loss over TRL's token count, i.e. prices TRL's extra tokens at 0 nats."""
    pairs = [("trl-padding-free", "trl-padded"), ("forgetless-sft-packed", "forgetless-sft"),
             ("forgetless-stm-packed", "forgetless-stm"), ("forgetless-sft-accum2", "forgetless-sft"),
             ("forgetless-stm-accum2", "forgetless-stm"), ("forgetless-sft-accum4", "forgetless-sft"),
             ("forgetless-stm-accum4", "forgetless-stm"), ("forgetless-sft", "trl-padded")]
    out = [(f"{a} - {b}", v[a]["loss1"] - v[b]["loss1"]) for a, b in pairs if a in v and b in v]
    if "forgetless-sft" in v and "trl-padded" in v and v["trl-padded"]["step1_trained"]:
        ours, trl = v["forgetless-sft"], v["trl-padded"]
        rescaled = ours["loss1"] * ours["step1_trained"] / trl["step1_trained"]
        out.append(("forgetless-sft rescaled to TRL's trained-token count - trl-padded", rescaled - trl["loss1"]))
    return out


def report(v: dict, tokens: dict) -> dict:
    print(f"\n{'variant':<22} {'s/step':>7} {'tok/s':>7} {'trained/s':>9} {'RSS GiB':>7} {'HWM GiB':>7} "
          f"{'step-1 loss':>11}")
    for name, s in v.items():
        trained = f"{s['trained_per_s']:>9.1f}" if s["trained_per_s"] is not None else f"{'-':>9}"
        print(f"{name:<22} {s['s_per_step']:>7.2f} {s['tokens_per_s']:>7.1f} {trained} {s['rss_peak_gib']:>7.2f} "
              f"{s['hwm_gib']:>7.2f} {s['loss1']:>11.6f}")
    ratios = {}
    sft = [n for n in ("forgetless-sft", "forgetless-sft-packed", "forgetless-sft-accum2", "forgetless-sft-accum4")
           if n in v]
    if sft:
        best = max(sft, key=lambda n: v[n]["tokens_per_s"])
        for trl in ("trl-padding-free", "trl-padded"):
            if trl in v:
                ratios[f"{best} / {trl}"] = v[best]["tokens_per_s"] / v[trl]["tokens_per_s"]
    for stm, base in (("forgetless-stm", "forgetless-sft"), ("forgetless-stm-packed", "forgetless-sft-packed"),
                      ("forgetless-stm-accum2", "forgetless-sft-accum2"),
                      ("forgetless-stm-accum4", "forgetless-sft-accum4"),
                      ("forgetless-sft-accum2", "forgetless-sft"), ("forgetless-sft-accum4", "forgetless-sft")):
        if stm in v and base in v:
            ratios[f"{stm} / {base}"] = v[stm]["tokens_per_s"] / v[base]["tokens_per_s"]
    print("\nthroughput ratios (tokens/s):")
    for k, r in ratios.items():
        print(f"  {k:<42} {r:.3f}")
    checks = loss_checks(v)
    print("step-1 loss differences:")
    for k, d in checks:
        print(f"  {k:<68} {d:+.2e}")
    print(f"tokens: {json.dumps(tokens)}")
    for name, s in v.items():
        if s["packing_isolates"] is not None:
            print(f"{name}: packed examples kept apart by its attention (forgetless.core.packing.packing_isolates): "
                  f"{s['packing_isolates']}")
    if not all(s["warmup_excluded"] for s in v.values()):
        print("note: one step only, so the timed step includes the warm-up")
    for name, s in v.items():
        for note in s["notes"]:
            print(f"{name} said: {note[:300]}")
    return {"ratios": ratios, "loss_checks": dict(checks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step (divisible by 4: the -accumK "
                        "variants split it in K micro-batches)")
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run; step 1 is the warm-up")
    parser.add_argument("--repeats", type=int, default=1, help="rounds, variants interleaved in each")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", default=None, help="work folder to keep (tables, TRL datasets, runs, logs); "
                        "default: a temporary one, removed")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="bench-train-trl-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tokens = prepare(args, work)
        print(f"prepared (scored, masked, TRL-tokenized) in {time.perf_counter() - start:.0f}s", flush=True)
        runs = collections.defaultdict(list)
        for round_ in range(args.repeats):
            for name in args.variants:
                r = launch(name, args, work, round_)
                runs[name].append(r)
                print(f"round {round_} {name}: " + ", ".join(f"{s['seconds']:.2f}s" for s in r["steps"]), flush=True)
    variants = {name: summarize(rs) for name, rs in runs.items()}
    result = {"examples": args.examples, "batch": args.batch, "max_length": args.max_length, "steps": args.steps,
              "repeats": args.repeats, "versions": versions(), "tokens": tokens, "variants": variants,
              "runs": dict(runs), **report(variants, tokens)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def versions() -> dict:
    import peft
    import torch
    import transformers
    import trl

    return {"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    main()
